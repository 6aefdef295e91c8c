"""Fisher diagnostics on CUDA agree with the CPU to float32 tolerance (skipped without a GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dykaf import DyKAF
from dykaf.fisher import LayerProbe
from dykaf.optimizer import PreconditionerState

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"),
]


def _optimizer_stream() -> tuple[list[torch.Tensor], PreconditionerState]:
    """Twelve gradients and the DyKAF state they lead to, computed once on the CPU.

    Both reports get this same "own" state: an optimizer's eigenbasis inside a degenerate eigenspace
    of its factors (the ``eps`` init's εI, a rank-deficient ``kron`` start) is whatever the solver
    returns, and cuSOLVER (float64 on CUDA, ``dykaf.linalg``) and LAPACK (float32) return different
    ones: own ``diag_mass`` then differs by ~0.5 % between two equally correct optimizers. This test
    is about the diagnostics, so the optimizer's choice is held fixed.
    """
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(48, 96, generator=gen))
    opt = DyKAF([param], lr=0.0)
    grads = []
    for _ in range(12):
        param.grad = torch.randn(48, 96, generator=gen)
        grads.append(param.grad.clone())
        opt.step()
    own = opt.preconditioner_state(param)
    assert own is not None
    return grads, own


def _on(state: PreconditionerState, device: str) -> PreconditionerState:
    moved = {
        f.name: getattr(state, f.name).to(device)
        for f in dataclasses.fields(state)
        if isinstance(getattr(state, f.name), torch.Tensor)
    }
    return dataclasses.replace(state, **moved)


def _report(device: str, grads: list[torch.Tensor], own: PreconditionerState) -> dict[tuple[str, str], float]:
    torch.backends.cuda.matmul.allow_tf32 = False
    param = torch.nn.Parameter(torch.zeros(48, 96, device=device))
    probe = LayerProbe(param, "w", window=8, beta=0.95)
    for grad in grads:
        probe.observe(grad.to(device))
    rows = probe.report(12, _on(own, device))
    return {(row.method, row.metric): row.value for row in rows}


def test_fisher_report_cpu_equals_cuda() -> None:
    grads, own = _optimizer_stream()
    cpu, gpu = _report("cpu", grads, own), _report("cuda", grads, own)
    assert cpu.keys() == gpu.keys() and len(cpu) > 5
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=2e-3, abs=2e-4), key


def _probe_pair(shape: tuple[int, int]) -> tuple[LayerProbe, LayerProbe]:
    def make(replay: str) -> LayerProbe:
        param = torch.nn.Parameter(torch.zeros(shape, device="cuda"))
        return LayerProbe(param, "w", window=4, beta=0.9, replay=replay)

    return make("off"), make("auto")


def test_cuda_graph_shadow_updates_equal_the_eager_ones_through_a_restart() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    eager, graphed = _probe_pair((96, 48))
    gen = torch.Generator().manual_seed(1)
    for step in range(30):
        grad = torch.randn(96, 48, generator=gen).cuda()
        if step == 15:
            eager.restart_shadows()
            graphed.restart_shadows()
        eager.observe(grad)
        graphed.observe(grad)
    static = graphed._static
    assert graphed.replay == "cuda_graph" and static is not None and static.failure is None
    assert static._graph is not None, "the updates were not captured"
    for method, shadow in eager.shadows.items():
        mine = graphed.shadows[method]
        assert mine.steps == shadow.steps
        for got, want in ((mine.left, shadow.left), (mine.right, shadow.right)):
            assert got is not None and want is not None
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), method


def test_a_graphed_observe_launches_a_graph_instead_of_dozens_of_kernels() -> None:
    from torch.profiler import ProfilerActivity, profile

    eager, graphed = _probe_pair((64, 32))
    grads = [torch.randn(64, 32, device="cuda") for _ in range(5)]
    for grad in grads[:4]:
        eager.observe(grad)
        graphed.observe(grad)

    def runtime_calls(probe: LayerProbe) -> dict[str, int]:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            probe.observe(grads[4])
            torch.cuda.synchronize()
        names = [event.name for event in prof.events()]
        return {
            "kernels": sum(name.startswith("cudaLaunchKernel") for name in names),
            "graphs": sum("GraphLaunch" in name for name in names),
        }

    plain, captured = runtime_calls(eager), runtime_calls(graphed)
    assert plain["kernels"] >= 20 and plain["graphs"] == 0, plain
    assert captured["graphs"] == 1 and captured["kernels"] <= plain["kernels"] // 5, (plain, captured)
