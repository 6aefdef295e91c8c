"""The runner on a CUDA device: bf16 autocast, allocator peak memory, resume, LoRA fine-tuning.

Skipped (with the reason) where no CUDA device is present; the CPU tests cover the same logic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from server.jobs.spec import JobSpec, RunSpec
from tests.support.worker import tiny_job, tiny_task
from worker.training.runner import execute_run
from worker.training.sinks import MemorySink

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("data_roots"),
]


def _spec(optimizer: str, **task: Any) -> RunSpec:
    job = tiny_job([{"name": optimizer}], device="cuda", task=tiny_task(**task))
    (spec,) = JobSpec.model_validate(job).expand()
    return spec


@pytest.mark.parametrize("optimizer", ["adamw", "dykaf", "soap", "muon"])
def test_pretrain_on_cuda_with_bf16_autocast(optimizer: str) -> None:
    spec = _spec(optimizer, d_model=64, context=32, steps=40, eval_every=40, log_every=10, warmup_steps=4)
    sink = MemorySink()
    result = execute_run(spec, sink)
    assert result.status == "succeeded", result.reason
    val = dict(sink.series("val_loss"))
    assert val[40] < val[0] - 0.3
    assert 0 < result.summary["peak_memory_mb"] < 2000  # CUDA allocator peak, not process RSS
    assert all(math.isfinite(v) for _, v in sink.series("grad_norm"))


@pytest.mark.parametrize("optimizer", ["adamw", "shampoo"])  # Shampoo: tensors inside library objects
def test_resume_on_cuda_matches_uninterrupted(tmp_path: Path, optimizer: str) -> None:
    spec = _spec(optimizer, steps=8, checkpoint_every=4)
    full, resumed = MemorySink(), MemorySink()
    assert execute_run(spec, full, checkpoint_dir=tmp_path / "a").status == "succeeded"
    cancelled = execute_run(
        spec, MemorySink(), checkpoint_dir=tmp_path / "b", should_cancel=iter([0] * 5 + [1]).__next__
    )
    assert cancelled.status == "cancelled" and cancelled.final_step == 5
    assert execute_run(spec, resumed, checkpoint_dir=tmp_path / "b").final_step == 8
    a, b = dict(full.series("train_loss")), dict(resumed.series("train_loss"))
    assert all(abs(a[s] - v) < 1e-3 for s, v in b.items())


def test_lora_finetune_of_our_export_on_cuda(tmp_path: Path) -> None:
    pretrain = _spec("adamw", steps=4)
    assert execute_run(pretrain, MemorySink(), checkpoint_dir=tmp_path / "pre").status == "succeeded"
    task = tiny_task(kind="finetune", finetune={"model": str(tmp_path / "pre"), "lora": {"r": 2}}, steps=4)
    (spec,) = JobSpec.model_validate(tiny_job(device="cuda", task=task)).expand()
    result = execute_run(spec, MemorySink())
    assert result.status == "succeeded", result.reason
    assert result.summary["trainable_parameters"] < result.summary["parameters"]


def test_first_run_of_a_fresh_process_pays_the_warm_up_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the runner warms the device (worker/training/warmup.py) before the first run's clocks
    start, throwaway probes and their CUDA graphs included; later runs pay nothing, and the runs'
    own diagnostics report as usual."""
    from worker.training import warmup

    monkeypatch.setattr(warmup, "_done", set())  # as in a new worker process
    spec = _spec("adamw", steps=12, fisher_every=6, fisher_window=4, log_every=6, eval_every=6)
    first, second = MemorySink(), MemorySink()
    one, two = execute_run(spec, first), execute_run(spec, second)
    assert one.status == two.status == "succeeded"
    assert one.summary["device_warmup_s"] > 0.0 and two.summary["device_warmup_s"] == 0.0
    assert {row[0] for row in first.fisher} == {6, 12} and len(first.fisher) == len(second.fisher)
