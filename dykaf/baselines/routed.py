"""Several optimizers over disjoint parameter sets, presented as one ``torch.optim.Optimizer``.

Muon for hidden matrices plus AdamW for the rest is how Muon is run in practice; a training loop,
an LR scheduler and a checkpoint should still see a single optimizer. The param groups exposed
here are the children's own group dicts, so a scheduler writing ``group["lr"]`` reaches the child.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class _MergedState(Mapping[Tensor, dict[str, Any]]):
    """Read view over the children's per-parameter state (for memory accounting, diagnostics)."""

    def __init__(self, parts: Mapping[str, Optimizer]) -> None:
        self._parts = parts

    def __getitem__(self, param: Tensor) -> dict[str, Any]:
        for part in self._parts.values():
            if param in part.state:
                return part.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[Tensor]:
        return chain.from_iterable(iter(part.state) for part in self._parts.values())

    def __len__(self) -> int:
        return sum(len(part.state) for part in self._parts.values())


class RoutedOptimizer(Optimizer):
    """Delegates ``step``, checkpoints and introspection to named child optimizers."""

    def __init__(self, parts: Mapping[str, Optimizer]) -> None:
        if not parts:
            raise ValueError("RoutedOptimizer needs at least one child optimizer")
        all_params = [p for part in parts.values() for g in part.param_groups for p in g["params"]]
        super().__init__(all_params, {})
        self.parts = dict(parts)
        self.param_groups = [group for part in self.parts.values() for group in part.param_groups]

    @property  # type: ignore[override]
    def state(self) -> Mapping[Tensor, dict[str, Any]]:
        return _MergedState(self.parts) if hasattr(self, "parts") else {}

    @state.setter
    def state(self, value: Any) -> None:
        """``Optimizer.__init__`` assigns an empty state; the children own the real one."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"parts": {name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved = state_dict["parts"]
        if set(saved) != set(self.parts):
            raise ValueError(f"checkpoint has optimizer parts {sorted(saved)}, expected {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])
        self.param_groups = [group for part in self.parts.values() for group in part.param_groups]

    def preconditioner_state(self, param: Tensor) -> Any:
        """Forward to whichever child owns ``param`` and can describe its preconditioner."""
        for part in self.parts.values():
            getter = getattr(part, "preconditioner_state", None)
            if getter is not None and any(p is param for g in part.param_groups for p in g["params"]):
                return getter(param)
        return None
