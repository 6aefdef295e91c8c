"""Static-buffer shadow updates (``dykaf.fisher.replay``), the form a CUDA graph replays.

On CPU the ``plain`` backend runs the very work a graph would capture, on the same buffers, so
these tests pin the buffer logic (adoption after restarts, checkpoint loads and linking, stable
addresses) against the eager path; the graph itself is checked in test_fisher_cuda.py.

"The same" means to float32 rounding, not bit for bit: the static path computes ``GGᵀ`` from a
buffer, the eager path from a fresh tensor, and MKL's GEMM may round differently depending on
memory alignment (it does on AMD EPYC, not on the Intel machines these tests were first run on).
A logic error (a missed adoption, a double or skipped update) moves the factors by ~β, i.e.
10⁵ times more than the tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from dykaf import DyKAF
from dykaf.fisher import FisherMonitor, LayerProbe
from dykaf.fisher.replay import StaticShadowStep, resolve_replay
from dykaf.fisher.rows import FisherRow


def _grads(m: int, n: int, steps: int, seed: int, zero_first: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(m, m, generator=g)
    out = [left @ torch.randn(m, n, generator=g) / m for _ in range(steps)]
    return [torch.zeros(m, n)] * zero_first + out


def _factors(probe: LayerProbe) -> dict[str, tuple[Tensor | None, Tensor | None, int]]:
    return {m: (s.left, s.right, s.steps) for m, s in probe.shadows.items()}


# A few float32 ulps of the factors' scale (see the module docstring).
RTOL = 1e-6


def _close(a: Tensor, b: Tensor) -> bool:
    return float((a - b).abs().max()) <= RTOL * float(a.abs().max())


def _assert_same_factors(a: LayerProbe, b: LayerProbe) -> None:
    fa, fb = _factors(a), _factors(b)
    assert fa.keys() == fb.keys()
    for method in fa:
        (la, ra, sa), (lb, rb, sb) = fa[method], fb[method]
        assert sa == sb, method
        assert (la is None) == (lb is None), method
        if la is not None:
            assert _close(la, lb) and _close(ra, rb), method  # type: ignore[arg-type]


def _assert_same_rows(a: list[FisherRow], b: list[FisherRow]) -> None:
    assert [(r.step, r.layer, r.method, r.metric) for r in a] == [
        (r.step, r.layer, r.method, r.metric) for r in b
    ]
    assert all(ra.value == pytest.approx(rb.value, rel=RTOL, abs=1e-9) for ra, rb in zip(a, b, strict=True))


def test_modes_resolve_per_device_and_bad_ones_are_refused() -> None:
    cpu = torch.device("cpu")
    assert resolve_replay("auto", cpu) == "off" and resolve_replay("plain", cpu) == "plain"
    with pytest.raises(ValueError, match="replay must be one of"):
        resolve_replay("graph", cpu)
    with pytest.raises(ValueError, match="needs a CUDA parameter"):
        LayerProbe(nn.Parameter(torch.zeros(3, 4)), replay="cuda_graph")
    with pytest.raises(ValueError, match="initialised"):
        StaticShadowStep(
            ("dykaf",),
            [LayerProbe(nn.Parameter(torch.zeros(3, 4))).shadows["dykaf"]],
            torch.zeros(3, 4),
            0.9,
            "plain",
        )


def test_static_updates_equal_the_eager_ones_through_restarts_and_reloads() -> None:
    """Zero gradients first (the projector rules wait), a restart (eager re-initialisation, then
    adoption into the same buffers) and a checkpoint load midway: factors and rows stay identical."""
    shape = (7, 5)
    eager = LayerProbe(nn.Parameter(torch.zeros(shape)), "w", window=4, beta=0.9, replay="off")
    static = LayerProbe(nn.Parameter(torch.zeros(shape)), "w", window=4, beta=0.9, replay="plain")
    addresses: set[tuple[int, ...]] = set()
    for step, grad in enumerate(_grads(*shape, 30, seed=1, zero_first=2), start=1):
        if step == 12:
            eager.restart_shadows()
            static.restart_shadows()
        if step == 20:
            state = copy.deepcopy(static.state_dict())
            static.load_state_dict(state)
        for probe in (eager, static):
            probe.observe(grad.clone())
        _assert_same_factors(eager, static)
        if static._static is not None:
            addresses.add(tuple(t.data_ptr() for pair in static._static.factors for t in pair))
    assert static._static is not None and static._static.failure is None
    assert len(addresses) == 1, "the buffers must keep their addresses (a CUDA graph reads them)"
    # The shadows' factors are the buffers themselves after the last step.
    assert all(
        s.left is pair[0] for s, pair in zip(static._static.shadows, static._static.factors, strict=True)
    )
    _assert_same_rows(eager.report(30), static.report(30))


def test_monitor_with_a_linked_optimizer_and_a_schedule_is_unchanged_by_static_updates() -> None:
    """A DyKAF run links its own factors at the second observe: the static step then drives only the
    two remaining shadows, and scheduled reports equal the eager monitor's exactly."""
    reports: dict[str, list[FisherRow]] = {}
    for replay in ("off", "plain"):
        torch.manual_seed(0)
        layer = nn.Linear(6, 5, bias=False)
        optimizer = DyKAF(layer.parameters(), lr=1e-3, shampoo_beta=0.8, precondition_frequency=2)
        monitor = FisherMonitor(layer, optimizer, layers=["weight"], window=4, report_every=40, replay=replay)
        g = torch.Generator().manual_seed(3)
        rows: list[FisherRow] = []
        for step in range(1, 81):
            layer.weight.grad = torch.randn(5, 6, generator=g)
            monitor.observe(step)
            optimizer.step()
            if monitor.is_report_step(step):
                rows.extend(monitor.report(step))
        probe = monitor.probes["weight"]
        assert probe.linked == "dykaf"
        if replay == "plain":
            assert probe._static is not None and probe._static.methods == ("soap_shampoo", "dykaf_seq")
        reports[replay] = rows
    assert len(reports["off"]) > 10
    _assert_same_rows(reports["plain"], reports["off"])


def test_a_failed_graph_capture_keeps_the_eager_update_and_goes_eager() -> None:
    """No CUDA here, so capturing really fails: the step must still apply exactly one update."""
    shape = (6, 4)
    eager = LayerProbe(nn.Parameter(torch.zeros(shape)), "w", window=3, beta=0.9, replay="off")
    probe = LayerProbe(nn.Parameter(torch.zeros(shape)), "w", window=3, beta=0.9, replay="off")
    grads = _grads(*shape, 6, seed=2)
    for grad in grads[:2]:
        eager.observe(grad.clone())
        probe.observe(grad.clone())
    probe.replay = "cuda_graph"  # as on a GPU whose capture fails
    for grad in grads[2:]:
        eager.observe(grad.clone())
        probe.observe(grad.clone())
        _assert_same_factors(eager, probe)
    assert probe.replay == "off" and probe._static is None
