"""A probe on one matrix parameter: a ring of recent gradients, shadow estimators, and the metrics.

``observe`` is the per-step part and is kept cheap (one copy into the ring, one factor update per
shadow method); ``metrics``/``report`` do the heavy, implicit Fisher algebra on request only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor

from dykaf.fisher import rows as names
from dykaf.fisher.replay import StaticShadowStep, resolve_replay
from dykaf.fisher.rows import FisherRow
from dykaf.fisher.shadow import SHADOW_RULES, ShadowFactors
from dykaf.fisher.weighted_fisher import (
    WeightedFisher,
    full_precision,
    relative_error,
    spectral,
    window_weights,
)

DEFAULT_WINDOW = 32
DEFAULT_BETA = 0.95


class OwnState(Protocol):
    """What the probe reads from ``optimizer.preconditioner_state(p)``: ``PreconditionerState``'s fields.

    Read-only properties, so any dataclass with these fields (narrower types included) conforms.
    """

    @property
    def left(self) -> Tensor | None: ...
    @property
    def right(self) -> Tensor | None: ...
    @property
    def left_basis(self) -> Tensor | None: ...
    @property
    def right_basis(self) -> Tensor | None: ...
    @property
    def second_moment(self) -> Tensor | None: ...
    @property
    def matrix_shape(self) -> tuple[int, ...]: ...


def _own_field(own: object, name: str) -> object:
    """An optional ``PreconditionerState`` field (``factor_rule``, ``beta``, ``init``, ``updates``)."""
    return getattr(own, name, None)


def probe_shape(param: Tensor) -> tuple[int, int]:
    """The matrix a parameter is probed as: ``(shape[0], prod(rest))``; needs ≥ 2 dimensions."""
    if param.ndim < 2:
        raise ValueError(f"only parameters with ≥ 2 dimensions can be probed, got shape {tuple(param.shape)}")
    return param.shape[0], math.prod(param.shape[1:])


class LayerProbe:
    """Fisher-fidelity probe of one parameter.

    Keeps the last ``window`` gradients (float32 copies; float64 for float64 parameters) in a ring
    buffer and feeds every gradient to one shadow estimator per method in ``methods``. The Fisher it
    measures against is ``H = Σ_i w_i vec(G_i)vec(G_i)ᵀ`` over the ring with ``w_i ∝ β^age``.
    It reads ``param.grad`` and never writes to the parameter, its gradient or any RNG.

    ``replay`` (``auto``/``off``/``plain``/``cuda_graph``, see ``dykaf.fisher.replay``): how the
    per-step shadow updates run once the shadows are initialised; ``auto`` captures them in a
    CUDA graph on a GPU (one launch per step instead of dozens) and runs them eagerly elsewhere.
    """

    def __init__(
        self,
        param: Tensor,
        name: str = "",
        *,
        window: int = DEFAULT_WINDOW,
        beta: float = DEFAULT_BETA,
        methods: Iterable[str] = names.SHADOW_METHODS,
        tol: float | None = None,
        max_iter: int = 100,
        replay: str = "auto",
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be ≥ 1, got {window}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        unknown = [m for m in methods if m not in SHADOW_RULES]
        if unknown:
            raise ValueError(f"unknown shadow methods {unknown}; available: {sorted(SHADOW_RULES)}")
        self.param = param
        self.name = name
        self.shape = probe_shape(param)
        self.window = window
        self.beta = float(beta)
        self.dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.tol = tol
        self.max_iter = max_iter
        self.shadows = {m: ShadowFactors(SHADOW_RULES[m]) for m in methods}
        self.replay = resolve_replay(replay, param.device)
        self._static: StaticShadowStep | None = None
        # The shadow whose factors are the optimizer's own (see ``link``): not updated here, its
        # metrics are computed from ``own.left``/``own.right`` at report time.
        self.linked: str | None = None
        self.link_decided = False
        self.ring: Tensor | None = None
        self.head = 0  # next slot to write
        self.count = 0  # filled slots
        self.observed = 0  # gradients seen in total
        self.last_power_iterations = 0

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def observe(self, grad: Tensor | None = None, *, record: bool = True, feed_shadows: bool = True) -> None:
        """Record ``grad`` (default ``param.grad``; None → nothing to record this step).

        ``record`` writes it into the ring, ``feed_shadows`` updates the shadows that run; a caller
        that knows when the next report is (``FisherMonitor`` with ``report_every``) turns either
        off on steps whose gradient cannot influence that report (see ``shadow_horizon``).
        """
        grad = self.param.grad if grad is None else grad
        if grad is None or not (record or feed_shadows):
            return
        matrix = grad.detach().reshape(self.shape)
        if record:
            if self.ring is None:
                self.ring = torch.zeros(self.window, *self.shape, dtype=self.dtype, device=grad.device)
            slot = self.ring[self.head]
            slot.copy_(matrix)
            matrix = slot
            self.head = (self.head + 1) % self.window
            self.count = min(self.count + 1, self.window)
            self.observed += 1
        elif matrix.dtype != self.dtype:
            matrix = matrix.to(self.dtype)
        if feed_shadows:
            self._feed_shadows(matrix)

    def _feed_shadows(self, matrix: Tensor) -> None:
        """One update of every running (not linked) shadow: eagerly while any of them still has to
        initialise, else through the static step (``replay``), which adopts factors replaced since
        its last step (re-initialised after a restart, loaded from a checkpoint)."""
        running = {m: s for m, s in self.shadows.items() if m != self.linked}
        if not running:
            return
        if self.replay == "off" or any(s.left is None or s.right is None for s in running.values()):
            for shadow in running.values():
                shadow.update(matrix, self.beta)
            return
        static = self._static
        if static is None or static.methods != tuple(running):
            static = StaticShadowStep(tuple(running), list(running.values()), matrix, self.beta, self.replay)
            self._static = static
        else:
            static.adopt()
        static.step(matrix)
        if static.failure is not None:
            self.replay, self._static = "off", None

    def shadow_horizon(self, tail: float) -> int:
        """Steps a shadow must see before a report so that older gradients weigh at most ``tail``.

        The shadows' factors are β-decayed sums (exactly for the EMA rule; the projector-splitting
        rules track the same decayed sum and forget their start the same way), so history older
        than ``k`` steps carries weight ``β^k``: restarting the shadows ``k = log(tail)/log β``
        steps before each report changes their factors by at most ``tail`` of their mass, while
        sparing the per-step shadow updates on the other ``fisher_every − k`` steps. Never shorter
        than the window, so the shadows always cover every gradient of ``H``.
        """
        if not 0.0 < tail < 1.0:
            raise ValueError(f"tail must be in (0, 1), got {tail}")
        if self.beta == 0.0:
            return self.window
        return max(self.window, math.ceil(math.log(tail) / math.log(self.beta)))

    def restart_shadows(self) -> None:
        """Drop the running shadows' factors; the next fed gradient starts them afresh."""
        for method, shadow in self.shadows.items():
            if method != self.linked:
                shadow.left = shadow.right = None
                shadow.steps = 0

    def link(self, own: OwnState | None) -> bool:
        """Stop updating the shadow whose factors the optimizer already holds; True once linked.

        Call before ``observe`` with the optimizer's state for this parameter (both must have seen
        the same gradients so far). A shadow is linked when the optimizer's factors are two-sided,
        in the probe's matrix shape and dtype, produced by the same rule with the same β (and the
        ``kron`` initialisation for the projector-splitting rules) from exactly as many gradients
        as the shadow has seen: the same pure functions of the same inputs, so the factors are
        equal and updating the shadow would only repeat the optimizer's work. Decided once: a
        mismatching optimizer state never links. ``None`` (optimizer not initialised yet) waits.
        """
        if self.link_decided or own is None:
            return self.linked is not None
        self.link_decided = True
        rule = _own_field(own, "factor_rule")
        method = next((m for m, s in self.shadows.items() if s.rule == rule), None)
        if method is None or own.left is None or own.right is None:
            return False
        shadow = self.shadows[method]
        beta = _own_field(own, "beta")
        init = _own_field(own, "init")
        if (
            tuple(int(d) for d in own.matrix_shape) != self.shape
            or own.left.dtype != self.dtype
            or beta is None
            or float(beta) != self.beta  # type: ignore[arg-type]
            or (rule != "ema" and init != "kron")
            or _own_field(own, "updates") != shadow.steps
        ):
            return False
        self.linked = method
        shadow.left = shadow.right = None  # the optimizer's factors stand in from now on
        return True

    # ------------------------------------------------------------------ on request
    def fisher(self) -> WeightedFisher | None:
        """The window's weighted Fisher (None before the first gradient)."""
        if self.ring is None or self.count == 0:
            return None
        slots = torch.arange(self.count, device=self.ring.device)
        ages = (self.head - 1 - slots) % self.window
        return WeightedFisher(self.ring[: self.count], window_weights(ages, self.beta))

    def latest_grad(self) -> Tensor | None:
        """The most recently recorded gradient (a view into the ring)."""
        return None if self.ring is None or self.count == 0 else self.ring[(self.head - 1) % self.window]

    @torch.no_grad()
    def metrics(self, own: OwnState | None = None) -> list[tuple[str, str, float]]:
        """``(method, metric, value)`` triples; undefined values (zero Fisher, no factors) are left out."""
        with full_precision():
            return self._metrics(own)

    def _metrics(self, own: OwnState | None) -> list[tuple[str, str, float]]:
        fisher = self.fisher()
        latest = self.latest_grad()
        if fisher is None or latest is None:
            return []
        out = [
            (names.WINDOW, names.FISHER_NORM, fisher.norm()),
            (names.WINDOW, names.GRAD_NORM, float(torch.linalg.norm(latest.double()))),
        ]
        if fisher.norm_sq() > 0.0:
            out += self._optimal_metrics(fisher)
            shadow_rows: list[tuple[str, str, float]] = []
            linked_err: float | None = None
            rows, cols = self.shape
            for method, shadow in self.shadows.items():
                left, right = shadow.left, shadow.right
                if method == self.linked:
                    left, right = (None, None) if own is None else (own.left, own.right)
                if left is not None and right is not None:
                    err, mass = fisher.spectral_metrics(
                        spectral(left, rows, fisher.grads), spectral(right, cols, fisher.grads)
                    )
                    shadow_rows += [(method, names.KRON_REL_ERR, err), (method, names.DIAG_MASS, mass)]
                    if method == self.linked:
                        linked_err = err
            if own is not None:
                # Linked: own's Kronecker error is the linked shadow's (same factors), not recomputed.
                out += _own_metrics(fisher, own, linked_err)
            out += shadow_rows
        return [(method, metric, value) for method, metric, value in out if math.isfinite(value)]

    def _optimal_metrics(self, fisher: WeightedFisher) -> list[tuple[str, str, float]]:
        """Floor: the best Kronecker product of H, and how diagonal H is in its eigenbasis."""
        opt = fisher.optimal_kronecker(tol=self.tol, max_iter=self.max_iter)
        self.last_power_iterations = opt.iterations
        rows, cols = self.shape
        _, mass = fisher.spectral_metrics(
            spectral(opt.left, rows, fisher.grads), spectral(opt.right, cols, fisher.grads)
        )
        err = relative_error(opt.sigma, fisher.norm_sq(), 1.0)
        return [(names.OPTIMAL, names.KRON_REL_ERR, err), (names.OPTIMAL, names.DIAG_MASS, mass)]

    def report(self, step: int, own: OwnState | None = None) -> list[FisherRow]:
        """The metrics as storable rows."""
        return [FisherRow(int(step), self.name, m, k, float(v)) for m, k, v in self.metrics(own)]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Ring, counters and shadow factors, so a resumed run reports as if never interrupted."""
        return {
            "ring": self.ring,
            "head": self.head,
            "count": self.count,
            "observed": self.observed,
            "shadows": {m: (s.left, s.right, s.steps) for m, s in self.shadows.items()},
            "linked": self.linked,
            "link_decided": self.link_decided,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved (tensors are moved to the parameter's device)."""
        device = self.param.device
        ring = state["ring"]
        self.ring = None if ring is None else ring.to(device=device, dtype=self.dtype)
        self.head, self.count, self.observed = int(state["head"]), int(state["count"]), int(state["observed"])
        linked = state.get("linked")
        self.linked = linked if linked in self.shadows else None
        self.link_decided = bool(state.get("link_decided", False))
        for method, (left, right, steps) in state["shadows"].items():
            if method in self.shadows:
                shadow = self.shadows[method]
                shadow.left = None if left is None else left.to(device=device, dtype=self.dtype)
                shadow.right = None if right is None else right.to(device=device, dtype=self.dtype)
                shadow.steps = int(steps)


def _own_metrics(
    fisher: WeightedFisher, own: OwnState, kron_rel_err: float | None = None
) -> list[tuple[str, str, float]]:
    """Metrics of the training optimizer's own preconditioner.

    The optimizer may reshape a >2-D tensor differently from the probe; ``H`` does not depend on
    the matrix shape (row-major ``vec`` of the tensor), so we view the gradients in its shape.
    ``diag_mass`` and ``precond_rel_err`` use the basis the optimizer actually applies
    (``left_basis``/``right_basis``, refreshed every ``precondition_frequency`` steps), not a fresh
    eigendecomposition of its factors: that is the basis the Adam step assumes H is diagonal in.
    """
    shape = tuple(int(d) for d in own.matrix_shape)
    if len(shape) != 2 or shape[0] * shape[1] != fisher.shape[0] * fisher.shape[1]:
        return []
    view = fisher.reshaped(*shape)
    out: list[tuple[str, str, float]] = []
    if kron_rel_err is not None:
        out.append((names.OWN, names.KRON_REL_ERR, kron_rel_err))
    elif own.left is not None or own.right is not None:
        out.append((names.OWN, names.KRON_REL_ERR, view.kron_rel_err(own.left, own.right)))
    diag = view.rotated_diag(own.left_basis, own.right_basis)
    out.append((names.OWN, names.DIAG_MASS, view.diag_mass(diag)))
    second = own.second_moment
    if second is not None and second.numel() == diag.numel():
        out.append((names.OWN, names.PRECOND_REL_ERR, view.precond_rel_err(diag, second.reshape(shape))))
    return out
