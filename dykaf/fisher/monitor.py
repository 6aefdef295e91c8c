"""``FisherMonitor``: probes a few layers of a model during training (see docs/CONTRACTS.md).

Usage, every step::

    loss.backward()
    monitor.observe()          # cheap: copy probed grads, one shadow factor update per method
    optimizer.step()
    if step % fisher_every == 0:
        sink.log_fisher(monitor.report(step))

The monitor only reads gradients and optimizer state: training is bit-identical with or without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dykaf.fisher.probe import DEFAULT_BETA, DEFAULT_WINDOW, LayerProbe
from dykaf.fisher.rows import SHADOW_METHODS, FisherRow
from dykaf.fisher.selection import select_layers

# Layers the monitor probes by default ("auto"): the attention input projection and the MLP
# up-projection of the first block. Each probed layer costs about 5 SOAP factor updates per step
# (3 with a DyKAF run's own factors reused); see README "Cost".
DEFAULT_MONITOR_LAYERS = 2


def optimizer_beta(optimizer: torch.optim.Optimizer | None, param: Tensor) -> float:
    """The factor decay the optimizer uses for ``param``: ``shampoo_beta``, else ``betas[1]``, else 0.95.

    Measuring against the Fisher the optimizer itself tries to track makes "own" comparable to
    the shadows.
    """
    if optimizer is None:
        return DEFAULT_BETA
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            if group.get("shampoo_beta") is not None:
                return float(group["shampoo_beta"])
            betas = group.get("betas")
            if isinstance(betas, Sequence) and len(betas) > 1:
                return float(betas[1])
            return DEFAULT_BETA
    return DEFAULT_BETA


class FisherMonitor:
    """Fisher-fidelity diagnostics for selected layers of ``model``.

    ``layers``: ``"auto"`` (at most ``max_layers`` representative hidden matrices) or parameter
    names. ``beta`` defaults per layer to the optimizer's factor decay. ``methods`` are the shadow
    estimators run on the side (all of ``SHADOW_METHODS`` by default).

    ``reuse_own`` (default True): when the training optimizer's factors for a probed layer are
    exactly what one shadow would compute (DyKAF with ``kron`` init → ``dykaf``/``dykaf_seq``, SOAP →
    ``soap_shampoo``; same β, shape and history, see ``LayerProbe.link``), that shadow is not run
    and its rows are computed from the optimizer's factors. Rows and values are unchanged; False
    forces every shadow to run (for checking that equality).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        layers: str | Sequence[str] = "auto",
        window: int = DEFAULT_WINDOW,
        beta: float | None = None,
        *,
        max_layers: int = DEFAULT_MONITOR_LAYERS,
        methods: Iterable[str] = SHADOW_METHODS,
        tol: float | None = None,
        max_iter: int = 100,
        reuse_own: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.reuse_own = reuse_own
        params = dict(model.named_parameters())
        methods = tuple(methods)
        self.probes: dict[str, LayerProbe] = {
            name: LayerProbe(
                params[name],
                name,
                window=window,
                beta=optimizer_beta(optimizer, params[name]) if beta is None else beta,
                methods=methods,
                tol=tol,
                max_iter=max_iter,
            )
            for name in select_layers(model, layers, max_layers)
        }

    @property
    def layers(self) -> list[str]:
        """Names of the probed parameters."""
        return list(self.probes)

    @torch.no_grad()
    def observe(self) -> None:
        """Record this step's gradients of the probed layers; call after backward, before step()."""
        state_of = getattr(self.optimizer, "preconditioner_state", None) if self.reuse_own else None
        for probe in self.probes.values():
            if callable(state_of) and not probe.link_decided:
                probe.link(state_of(probe.param))
            probe.observe()

    @torch.no_grad()
    def report(self, step: int) -> list[FisherRow]:
        """All diagnostics of all probed layers at ``step`` (heavy; call every ``fisher_every``)."""
        state_of = getattr(self.optimizer, "preconditioner_state", None)
        rows: list[FisherRow] = []
        for probe in self.probes.values():
            own = state_of(probe.param) if callable(state_of) else None
            rows.extend(probe.report(step, own))
        return rows

    def state_dict(self) -> dict[str, Any]:
        """Per-layer probe state, for checkpoints."""
        return {name: probe.state_dict() for name, probe in self.probes.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore probe state saved by ``state_dict`` (layers not probed now are ignored)."""
        for name, probe_state in state.items():
            if name in self.probes:
                self.probes[name].load_state_dict(probe_state)
