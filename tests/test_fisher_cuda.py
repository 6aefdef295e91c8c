"""Fisher diagnostics on CUDA agree with the CPU to float32 tolerance (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from dykaf import DyKAF
from dykaf.fisher import LayerProbe

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"),
]


def _report(device: str) -> dict[tuple[str, str], float]:
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(48, 96, generator=gen).to(device))
    opt = DyKAF([param], lr=0.0)
    probe = LayerProbe(param, "w", window=8, beta=0.95)
    for _ in range(12):
        param.grad = torch.randn(48, 96, generator=gen).to(device)
        probe.observe()
        opt.step()
    rows = probe.report(12, opt.preconditioner_state(param))
    return {(row.method, row.metric): row.value for row in rows}


def test_fisher_report_cpu_equals_cuda() -> None:
    cpu, gpu = _report("cpu"), _report("cuda")
    assert cpu.keys() == gpu.keys() and len(cpu) > 5
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=2e-3, abs=2e-4), key
