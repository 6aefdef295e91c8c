"""One probe's per-step shadow updates as a single replayable unit on static buffers.

On a GPU the shadow estimators of a small layer are launch-bound: one ``observe`` issues dozens of
small kernels (most of them for the parallel DyKAF rule), whose host time is a sizeable share of a
small model's training step (BENCHMARKS.md). The updates are pure tensor functions of
fixed shapes with no host synchronisation, so they can be captured once in a CUDA graph and
replayed with a single launch per step.

A graph reads and writes fixed addresses. ``StaticShadowStep`` therefore owns

* a static gradient buffer that each step copies the gradient into, and
* one ``(L, R)`` buffer pair per running shadow, which the shadows' ``left``/``right`` point at,

and its work is "compute every running shadow's new factors from the buffers, then copy them into
the buffers" (``update_factors`` of ``dykaf.kronecker``, the same pure functions as the eager path).
Initialisation (the first gradient, and every schedule restart) stays eager, because the ``kron``
initialisation waits on the host for a non-zero gradient; ``adopt`` then copies the freshly
initialised factors into the same buffers, so a graph survives restarts.

Backends: ``cuda_graph`` captures the work (after a warm-up on a side stream that computes but does
not commit, so it changes no state) and validates its first replay against the eager update,
falling back to eager if they disagree or capture fails; ``plain`` runs the same work without a
graph, which is how the buffer logic is tested on CPU and a way to rule graphs out when debugging.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from dykaf.fisher.shadow import ShadowFactors
from dykaf.kronecker import update_factors

log = logging.getLogger(__name__)

REPLAY_MODES: tuple[str, ...] = ("auto", "off", "plain", "cuda_graph")

# Warm-up iterations before capture: cuBLAS picks algorithms and allocates workspaces on first use,
# which must not happen during capture.
_WARMUP = 2
# First-replay check against the eager update; a captured graph runs the same kernels, so anything
# beyond float32 rounding means the capture is wrong.
_CHECK_RTOL = 1e-4


def resolve_replay(mode: str, device: torch.device) -> str:
    """The backend a probe on ``device`` uses: ``auto`` → ``cuda_graph`` on CUDA, else ``off``."""
    if mode not in REPLAY_MODES:
        raise ValueError(f"replay must be one of {REPLAY_MODES}, got {mode!r}")
    if mode == "auto":
        return "cuda_graph" if device.type == "cuda" else "off"
    if mode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"replay='cuda_graph' needs a CUDA parameter, got one on {device}")
    return mode


class StaticShadowStep:
    """The shadows' factor updates for one probe, run on fixed buffers (see the module docstring).

    ``shadows`` are the running (not linked) estimators, all initialised. Their ``left``/``right``
    are replaced by buffers holding the same values; ``step`` updates them in place. If a
    ``cuda_graph`` capture fails or its first replay disagrees with the eager update, ``failure``
    says why and the eager result is kept, so the shadows' factors are correct either way.
    """

    def __init__(
        self,
        methods: Sequence[str],
        shadows: Sequence[ShadowFactors],
        grad_like: Tensor,
        beta: float,
        backend: str,
    ) -> None:
        if backend not in ("plain", "cuda_graph"):
            raise ValueError(f"backend must be 'plain' or 'cuda_graph', got {backend!r}")
        if not shadows or any(s.left is None or s.right is None for s in shadows):
            raise ValueError("every shadow must be initialised before its updates are made static")
        self.methods = tuple(methods)
        self.shadows = list(shadows)
        self.beta = beta
        self.backend = backend
        self.grad = torch.zeros_like(grad_like)
        self.factors: list[tuple[Tensor, Tensor]] = []
        for shadow in self.shadows:
            assert shadow.left is not None and shadow.right is not None
            pair = (shadow.left.clone(), shadow.right.clone())
            shadow.left, shadow.right = pair
            self.factors.append(pair)
        self._graph: torch.cuda.CUDAGraph | None = None
        # Why the graph could not be used (set by the first replay); the caller then goes eager.
        self.failure: str | None = None

    # ------------------------------------------------------------------ the captured work
    def _compute(self) -> list[tuple[Tensor, Tensor]]:
        return [
            update_factors(shadow.rule, left, right, self.grad, self.beta)
            for shadow, (left, right) in zip(self.shadows, self.factors, strict=True)
        ]

    def _commit(self, updated: Sequence[tuple[Tensor, Tensor]]) -> None:
        for (left, right), (new_left, new_right) in zip(self.factors, updated, strict=True):
            left.copy_(new_left)
            right.copy_(new_right)

    def _work(self) -> None:
        self._commit(self._compute())

    def _capture(self) -> None:
        side = torch.cuda.Stream(device=self.grad.device)
        side.wait_stream(torch.cuda.current_stream(self.grad.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP):
                self._compute()  # no commit: the warm-up leaves the factors as they are
        torch.cuda.current_stream(self.grad.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a background Fisher report, say) stay legal
        # during the capture; the monitor never captures while a report is running anyway.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._work()
        self._graph = graph

    # ------------------------------------------------------------------ per step
    def adopt(self) -> None:
        """Take the shadows' current factors (fresh after an eager (re)initialisation) into the buffers."""
        for shadow, (left, right) in zip(self.shadows, self.factors, strict=True):
            if shadow.left is None or shadow.right is None:
                raise ValueError("cannot adopt an uninitialised shadow")
            if shadow.left is not left:
                left.copy_(shadow.left)
                shadow.left = left
            if shadow.right is not right:
                right.copy_(shadow.right)
                shadow.right = right

    def step(self, grad: Tensor) -> None:
        """One update of every shadow with ``grad`` (``m × n``, any float dtype; never modified).

        Always updates each shadow exactly once; if the first ``cuda_graph`` replay fails or
        disagrees, the eager result is kept and ``failure`` says why (the caller goes eager).
        """
        self.grad.copy_(grad)
        if self.backend == "plain":
            self._work()
        elif self._graph is None:
            self._first_replay()
        else:
            with torch.cuda.device(self.grad.device):  # the probe's GPU need not be the current one
                self._graph.replay()
        for shadow in self.shadows:
            shadow.steps += 1

    def _first_replay(self) -> None:
        """Capture, replay once and compare with the eager update; on any failure keep the eager one."""
        expected = [(left.clone(), right.clone()) for left, right in self._compute()]
        try:
            with torch.cuda.device(self.grad.device):
                self._capture()
                assert self._graph is not None
                self._graph.replay()
            agree = all(
                torch.allclose(got, want, rtol=_CHECK_RTOL, atol=_CHECK_RTOL * float(want.abs().max()))
                for pair, ref in zip(self.factors, expected, strict=True)
                for got, want in zip(pair, ref, strict=True)
            )
            if not agree:
                self.failure = "its first replay disagreed with the eager update"
        except (RuntimeError, ValueError) as exc:  # ValueError: not a CUDA tensor
            self.failure = f"capture failed: {exc}"
        if self.failure is not None:
            self._graph = None
            self._commit(expected)
            log.warning(
                "CUDA-graph shadow updates off for this probe (%s); running them eagerly", self.failure
            )
