"""The training runner: schedule, fairness, exact resume, divergence, cancel, failure, sinks."""

from __future__ import annotations

import csv
import functools
import math
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from server.jobs.spec import JobSpec, RunSpec
from tests.support.worker import tiny_job, tiny_task
from worker.lm import data as lm_data
from worker.training import checkpoint as ckpt
from worker.training import runner as runner_module
from worker.training.runner import execute_run
from worker.training.schedule import lr_multiplier
from worker.training.sinks import CsvSink, MemorySink


def _run(
    optimizers: list[dict[str, Any]] | None = None, seeds: tuple[int, ...] = (0,), **task: Any
) -> list[RunSpec]:
    job = tiny_job(optimizers, seeds=list(seeds), task=tiny_task(**task))
    return JobSpec.model_validate(job).expand()


def test_schedule_values() -> None:
    kw = {"steps": 11, "warmup_steps": 2, "min_lr_ratio": 0.1}
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(1, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(6, schedule="cosine", **kw) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    )
    assert lr_multiplier(6, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_multiplier(10, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="constant", **kw) == 1.0
    values = [lr_multiplier(s, schedule="cosine", **kw) for s in range(2, 11)]
    assert values == sorted(values, reverse=True)


def test_lr_logged_follows_the_schedule() -> None:
    (spec,) = _run(warmup_steps=4, schedule="linear", min_lr_ratio=0.0, steps=8)
    sink = MemorySink()
    assert execute_run(spec, sink).status == "succeeded"
    lrs = dict(sink.series("lr"))
    base = spec.hyperparameters["lr"]
    assert lrs[1] == pytest.approx(base * 0.25) and lrs[4] == pytest.approx(base)
    assert lrs[8] == pytest.approx(0.0, abs=1e-12)


def test_metrics_and_summary() -> None:
    (spec,) = _run(steps=8, eval_every=4, log_every=2)
    spec = spec.model_copy(update={"target_loss": 100.0})
    sink = MemorySink()
    result = execute_run(spec, sink)
    assert result.status == "succeeded" and result.final_step == 8 and result.reason is None
    steps = [s for s, _, _ in sink.records]
    assert steps == [0, 2, 4, 6, 8]
    by_step = {s: m for s, m, _ in sink.records}
    assert set(by_step[4]) >= {
        "train_loss",
        "val_loss",
        "val_ppl",
        "lr",
        "grad_norm",
        "update_norm",
        "fwd_bwd_time",
        "optimizer_time",
        "tokens_per_s",
        "peak_memory_mb",
    }
    assert "val_loss" not in by_step[2] and by_step[8]["val_ppl"] == pytest.approx(
        math.exp(by_step[8]["val_loss"])
    )
    assert by_step[4]["update_norm"] > 0 and by_step[4]["peak_memory_mb"] > 0
    s = result.summary
    assert s["final_val_loss"] == by_step[8]["val_loss"]
    assert s["best_val_loss"] == min(m["val_loss"] for m in by_step.values() if "val_loss" in m)
    assert s["steps_to_target"] == 0 and s["reached_target"] == 1.0  # step-0 loss is below 100
    assert s["step_time_ms"] > 0 and s["tokens_per_s"] > 0
    wall = [w for _, _, w in sink.records]
    assert wall == sorted(wall)


def test_loss_decreases_on_pydoc() -> None:
    (spec,) = _run(steps=30, eval_every=30, log_every=30, warmup_steps=3)
    sink = MemorySink()
    assert execute_run(spec, sink).status == "succeeded"
    val = dict(sink.series("val_loss"))
    assert val[30] < val[0] - 0.5  # byte-level: ~5.6 at init


def test_same_seed_same_batches_and_initial_weights_across_optimizers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, list[torch.Tensor]] = {}
    inits: dict[str, dict[str, torch.Tensor]] = {}
    real_build = runner_module.build_optimizer
    real_batch = lm_data.WindowBatches.batch
    current: list[str] = []

    def build(name: str, named: Any, hyper: Any, roles: Any) -> Any:
        named = list(named)
        inits[current[0]] = {n: p.detach().clone() for n, p in named}
        return real_build(name, named, hyper, roles)

    def batch(self: Any, index: int) -> Any:
        out = real_batch(self, index)
        seen[current[0]].append(out[0])
        return out

    monkeypatch.setattr(runner_module, "build_optimizer", build)
    monkeypatch.setattr(lm_data.WindowBatches, "batch", batch)
    specs = _run([{"name": "adamw"}, {"name": "dykaf"}], seeds=(0, 1), steps=4)
    for spec in specs:
        current[:] = [spec.run_key]
        seen[spec.run_key] = []
        assert execute_run(spec, MemorySink()).status == "succeeded", spec.run_key
    assert seen.keys() == {"adamw-s0", "adamw-s1", "dykaf-s0", "dykaf-s1"}

    def same(a: str, b: str) -> bool:
        batches = all(torch.equal(x, y) for x, y in zip(seen[a], seen[b], strict=True))
        weights = all(torch.equal(inits[a][n], inits[b][n]) for n in inits[a])
        return batches and weights

    assert len(seen["adamw-s0"]) == 4
    assert same("adamw-s0", "dykaf-s0") and same("adamw-s1", "dykaf-s1")
    assert not any(torch.equal(x, y) for x, y in zip(seen["adamw-s0"], seen["adamw-s1"], strict=True))
    assert not torch.equal(inits["adamw-s0"]["wte.weight"], inits["adamw-s1"]["wte.weight"])


def _final_state(directory: Path) -> dict[str, Any]:
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(directory))


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a (nested) optimizer state, by path: dicts, sequences and the small Python
    objects some libraries keep there (pytorch-optimizer's Shampoo preconditioners and grafts)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}/{i}")
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from _tensors(vars(value), f"{path}.{type(value).__name__}")


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    state_a, state_b = dict(_tensors(a["optimizer"])), dict(_tensors(b["optimizer"]))
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for path, tensor in state_a.items():
        assert torch.equal(tensor, state_b[path]), path


class _CrashAt(MemorySink):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def log_metrics(self, step: int, metrics: Any, wall_time: float) -> None:
        if step == self.step:
            raise RuntimeError("simulated worker crash")
        super().log_metrics(step, metrics, wall_time)


@pytest.mark.parametrize("optimizer", ["adamw", "dykaf", "soap", "muon", "shampoo", "psgd-kron", "adafactor"])
def test_resume_after_crash_is_bit_identical(tmp_path: Path, optimizer: str) -> None:
    (spec,) = _run(
        [{"name": optimizer, "hyperparameters": {"lr": 3e-3}}],
        steps=9,
        checkpoint_every=3,
        dropout=0.1,
        eval_every=3,
    )
    full_sink = MemorySink()
    assert execute_run(spec, full_sink, checkpoint_dir=tmp_path / "full").status == "succeeded"

    crashed = execute_run(spec, _CrashAt(5), checkpoint_dir=tmp_path / "resumed")
    assert crashed.status == "failed" and "simulated worker crash" in (crashed.reason or "")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "resumed")] == [3]
    resumed_sink = MemorySink()
    result = execute_run(spec, resumed_sink, checkpoint_dir=tmp_path / "resumed")
    assert result.status == "succeeded" and result.final_step == 9
    assert next(s for s, _, _ in resumed_sink.records) == 4  # continued after the checkpoint
    _assert_identical(_final_state(tmp_path / "full"), _final_state(tmp_path / "resumed"))
    full = dict(full_sink.series("train_loss"))
    assert all(full[s] == v for s, v in resumed_sink.series("train_loss"))
    assert result.summary["final_val_loss"] == full_sink.series("val_loss")[-1][1]
    # A finished run is idempotent: executing it again returns at once with the same summary.
    again = execute_run(spec, MemorySink(), checkpoint_dir=tmp_path / "resumed")
    assert again.status == "succeeded" and again.summary["final_val_loss"] == result.summary["final_val_loss"]


def test_resume_places_tensors_kept_in_library_objects_on_the_parameters_device() -> None:
    """A checkpoint is loaded on the CPU; ``load_state_dict`` moves a state's own tensors to the
    parameter's device but not those inside objects (pytorch-optimizer's Shampoo preconditioner
    and graft). The real Shampoo state is loaded here for parameters on the ``meta`` device, a second
    device every CPU has, standing in for a GPU."""
    from dykaf.baselines import registry

    layer = torch.nn.Linear(6, 4)
    optimizer = registry.build_optimizer(
        "shampoo", layer.named_parameters(), {"start_preconditioning_step": 1}
    )
    layer(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()

    on_meta = torch.nn.Linear(6, 4, device="meta")
    resumed = registry.build_optimizer(
        "shampoo", on_meta.named_parameters(), {"start_preconditioning_step": 1}
    )
    resumed.load_state_dict(saved)
    state = resumed.state[on_meta.weight]
    assert state["momentum"].device.type == "meta"  # torch moved the state's own tensors ...
    assert state["graft"].statistics.device.type == "cpu"  # ... but not those in objects
    moved = ckpt.place_nested_state(resumed)
    assert moved >= 5  # graft statistics + momentum, the factors' statistics and inverse roots
    nested = [t for path, t in _tensors(dict(state)) if "." in path]
    assert nested and all(t.device.type == "meta" for t in nested)
    assert ckpt.place_nested_state(resumed) == 0  # idempotent


def test_cancel_between_steps_then_resume(tmp_path: Path) -> None:
    (spec,) = _run(steps=6)
    sink = MemorySink()
    result = execute_run(spec, sink, checkpoint_dir=tmp_path, should_cancel=lambda: len(sink.records) > 3)
    assert result.status == "cancelled" and result.final_step == 3
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    assert execute_run(spec, MemorySink(), checkpoint_dir=tmp_path).final_step == 6


def test_checkpoint_of_another_spec_is_refused(tmp_path: Path) -> None:
    (spec,) = _run(steps=2)
    assert execute_run(spec, MemorySink(), checkpoint_dir=tmp_path).status == "succeeded"
    other = spec.model_copy(update={"seed": 5})
    result = execute_run(other, MemorySink(), checkpoint_dir=tmp_path)
    assert result.status == "failed" and "different run spec" in (result.reason or "")


def test_huge_lr_diverges_with_step_and_reason_and_siblings_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = runner_module.build_optimizer

    def huge_lr(*args: Any) -> Any:
        # The schema caps lr, so the real optimizer is built valid and then pushed past any sane lr.
        optimizer = real_build(*args)
        for group in optimizer.param_groups:
            group["lr"] = 1e30
        return optimizer

    monkeypatch.setattr(runner_module, "build_optimizer", huge_lr)
    (bad,) = _run([{"name": "adamw"}], steps=8, warmup_steps=0, schedule="constant")
    sink = MemorySink()
    result = execute_run(bad, sink)
    assert result.status == "diverged"
    assert result.reason is not None and "non-finite" in result.reason
    assert f"at step {result.final_step}" in result.reason
    assert 1 <= result.final_step < 8 and result.summary["diverged_step"] == result.final_step
    last_step, last_metrics, _ = sink.records[-1]
    assert last_step == result.final_step
    assert not all(math.isfinite(v) for v in last_metrics.values())  # the sink saw the bad value
    monkeypatch.setattr(runner_module, "build_optimizer", real_build)
    (good,) = _run(steps=2)
    assert execute_run(good, MemorySink()).status == "succeeded"


def test_a_breakdown_of_the_optimizers_linear_algebra_is_divergence(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix optimizer whose statistics a too-large step has wrecked fails inside its
    decomposition before any loss turns non-finite; that is the run diverging, not the worker
    failing. The breakdown here is torch's own (a Cholesky of a matrix that is not positive
    definite), raised from a real optimizer's step at step 3."""
    real_build = runner_module.build_optimizer

    def breaking(*args: Any) -> Any:
        optimizer = real_build(*args)
        real_step = optimizer.step
        calls = {"n": 0}

        def step(self: Any, *a: Any, **k: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:
                torch.linalg.cholesky(-torch.eye(3))
            return real_step(*a, **k)

        optimizer.step = types.MethodType(step, optimizer)  # bound, as the LR scheduler expects
        return optimizer

    monkeypatch.setattr(runner_module, "build_optimizer", breaking)
    (spec,) = _run(steps=6)
    sink = MemorySink()
    result = execute_run(spec, sink)
    assert result.status == "diverged" and result.final_step == 3 and result.summary["diverged_step"] == 3
    assert result.reason is not None and result.reason.startswith(
        "the optimizer's linear algebra broke down at step 3: linalg.cholesky"
    )
    assert sink.records[-1][0] == 3  # the step's loss and gradient norm were still recorded


def test_exceptions_become_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise ValueError("no such optimizer in this build")

    monkeypatch.setattr(runner_module, "build_optimizer", broken)
    (spec,) = _run(steps=2)
    result = execute_run(spec, MemorySink())
    assert result.status == "failed" and result.reason == "ValueError: no such optimizer in this build"
    cuda = execute_run(spec, MemorySink(), device="cuda") if not torch.cuda.is_available() else None
    assert cuda is None or (cuda.status == "failed" and "CUDA is not available" in (cuda.reason or ""))


def test_grad_accumulation_and_clipping() -> None:
    (spec,) = _run(steps=3, grad_accum=3, grad_clip=1e-3, log_every=1)
    sink = MemorySink()
    assert execute_run(spec, sink).status == "succeeded"
    records = {s: m for s, m, _ in sink.records}
    assert records[1]["grad_norm"] > 1e-3  # logged before clipping
    assert records[1]["tokens_per_s"] > 0


def test_fisher_rows_reach_the_sink() -> None:
    pytest.importorskip("dykaf.fisher")
    (spec,) = _run([{"name": "dykaf"}], steps=4, fisher_every=2, fisher_window=4)
    sink = MemorySink()
    assert execute_run(spec, sink).status == "succeeded"
    assert sink.fisher, "no Fisher rows"
    steps = {row[0] for row in sink.fisher}
    assert steps == {2, 4}
    assert all(len(row) == 5 for row in sink.fisher)


def test_diagnostics_time_is_kept_out_of_training_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow probes (here: 1 s per observe and report) show up in ``fisher_time`` and never in
    train_time, step_time, tokens/s or time-to-target, which compare optimizers.

    The checks are accounting identities, not speed limits, so a busy machine cannot fail them: a
    sleep counted in training time as well as in Fisher time would make the two add up to more than
    the run's wall time."""
    fisher = pytest.importorskip("dykaf.fisher")
    delay = 1.0

    class SlowMonitor(fisher.FisherMonitor):  # type: ignore[misc,name-defined]
        calls = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Reports in the loop, whatever cores are free: each goes through ``report`` and is counted.
            super().__init__(*args, **{**kwargs, "background": "off"})

        def observe(self, step: int | None = None) -> None:
            SlowMonitor.calls += 1
            time.sleep(delay)
            super().observe(step)

        def report(self, step: int) -> Any:
            SlowMonitor.calls += 1
            time.sleep(delay)
            return super().report(step)

    monkeypatch.setattr(runner_module, "FisherMonitor", SlowMonitor)
    (spec,) = _run(steps=6, eval_every=3, log_every=1, fisher_every=3, fisher_window=2)
    spec = spec.model_copy(update={"target_loss": 100.0})
    sink = MemorySink()
    result = execute_run(spec, sink)
    assert result.status == "succeeded"
    s = result.summary
    slept = SlowMonitor.calls * delay
    assert SlowMonitor.calls == 6 + 2  # every step observes, reports at 3 and 6
    assert s["fisher_time_s"] >= slept
    # Had a single sleep leaked into training time, training + diagnostics would exceed the wall.
    assert s["train_time_s"] + s["fisher_time_s"] <= s["wall_time_s"] + 0.05
    assert s["fisher_overhead"] == pytest.approx(s["fisher_time_s"] / s["train_time_s"])
    by_step = {step: m for step, m, _ in sink.records}
    step_times = [by_step[step]["step_time"] for step in range(1, 7)]
    assert sum(step_times) + s["fisher_time_s"] <= s["wall_time_s"] + 0.05
    assert all(t < delay for t in step_times)  # a tiny step, even on a loaded machine
    assert all(by_step[step]["tokens_per_s"] > 0 for step in range(1, 7))
    cumulative = [by_step[step]["fisher_time"] for step in range(1, 7)]
    # The summary adds the end-of-run wait for a background report (none here: ~0).
    assert cumulative == sorted(cumulative) and cumulative[-1] == pytest.approx(s["fisher_time_s"], abs=0.05)
    assert cumulative[2] >= 4 * delay  # three observes and the step-3 report, logged at step 3
    assert by_step[6]["train_time"] == s["train_time_s"]
    assert s["time_to_target_s"] <= s["train_time_s"]


def test_csv_sink_writes_wide_rows(tmp_path: Path) -> None:
    sink = CsvSink(tmp_path / "m.csv", fisher_path=tmp_path / "f.csv", static={"run_key": "r1"})
    sink.log_metrics(1, {"train_loss": 2.5, "lr": 0.1}, 0.5)
    sink.log_metrics(2, {"train_loss": float("nan")}, 1.0)
    sink.log_fisher([(2, "blocks.0.qkv", "dykaf", "kron_rel_err", 0.25)])
    with pytest.raises(ValueError, match="without a CSV column"):
        sink.log_metrics(3, {"mystery": 1.0}, 1.0)
    sink.close()
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert rows[0]["run_key"] == "r1" and float(rows[0]["train_loss"]) == 2.5 and rows[0]["val_loss"] == ""
    assert rows[1]["train_loss"] == "nan"
    fisher = list(csv.DictReader((tmp_path / "f.csv").open()))
    assert fisher[0]["metric"] == "kron_rel_err" and float(fisher[0]["value"]) == 0.25


@pytest.mark.parametrize(("optimizer", "shadow"), [("dykaf", "dykaf"), ("soap", "soap_shampoo")])
def test_own_factors_equal_the_matching_shadow_with_clipping(
    optimizer: str, shadow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitor sees the clipped gradients the optimizer sees, so a DyKAF (SOAP) run's own
    factors are its DyKAF (SOAP) shadow's. The monitor therefore reuses them instead of running that
    shadow; here a forced-shadow run (``reuse_own=False``) checks the equality itself, and that the
    reused path reports the same rows. A tiny clip norm makes clipping rescale every step, which
    would break this if the monitor saw raw gradients."""
    fisher = pytest.importorskip("dykaf.fisher")
    (spec,) = _run(
        [{"name": optimizer, "hyperparameters": {"precondition_frequency": 1}}],
        steps=6,
        fisher_every=3,
        fisher_window=4,
        grad_clip=0.01,
    )
    reused_sink = MemorySink()
    assert execute_run(spec, reused_sink).status == "succeeded"
    forced = functools.partial(fisher.FisherMonitor, reuse_own=False)
    monkeypatch.setattr(runner_module, "FisherMonitor", forced)
    sink = MemorySink()
    assert execute_run(spec, sink).status == "succeeded"
    values = {(row[0], row[1], row[2], row[3]): row[4] for row in sink.fisher}
    pairs = [(k, v) for k, v in values.items() if k[2] == "own" and k[3] == "kron_rel_err"]
    assert pairs, "the run's own factors were not reported"
    for (step, layer, _, metric), own_value in pairs:
        assert own_value == pytest.approx(values[(step, layer, shadow, metric)], rel=1e-4, abs=1e-6)
    reused = {(row[0], row[1], row[2], row[3]): row[4] for row in reused_sink.fisher}
    assert reused.keys() == values.keys()
    for key, value in values.items():
        assert reused[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_resumed_run_reports_the_same_fisher_rows(tmp_path: Path) -> None:
    """The monitor's windows and shadow factors travel in the checkpoint."""
    pytest.importorskip("dykaf.fisher")
    (spec,) = _run([{"name": "dykaf"}], steps=8, checkpoint_every=4, fisher_every=2, fisher_window=3)
    full_sink = MemorySink()
    assert execute_run(spec, full_sink, checkpoint_dir=tmp_path / "full").status == "succeeded"
    assert execute_run(spec, _CrashAt(6), checkpoint_dir=tmp_path / "resumed").status == "failed"
    resumed_sink = MemorySink()
    assert execute_run(spec, resumed_sink, checkpoint_dir=tmp_path / "resumed").status == "succeeded"
    full = {tuple(row[:4]): row[4] for row in full_sink.fisher if row[0] > 4}
    resumed = {tuple(row[:4]): row[4] for row in resumed_sink.fisher}
    assert full.keys() == resumed.keys() and full
    for key, value in full.items():
        assert resumed[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
