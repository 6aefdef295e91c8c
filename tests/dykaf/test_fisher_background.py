"""Reports on a background thread (``dykaf.fisher.background``): same rows, training untouched,
the loop not held up, waits where the probes are needed again, errors surfaced, runner wiring."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dykaf import DyKAF
from dykaf.fisher import FisherMonitor, LayerProbe
from dykaf.fisher.background import available_cores, use_background
from server.jobs.spec import JobSpec
from tests.support.worker import tiny_job, tiny_task
from worker.training import runner as runner_module
from worker.training.runner import execute_run
from worker.training.sinks import MemorySink


def _model_and_optimizer(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
    if kind == "dykaf":
        return model, DyKAF(model.parameters(), lr=3e-3, precondition_frequency=3)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def _train(
    kind: str, background: str | None, steps: int = 40, every: int = 10
) -> tuple[nn.Module, list[Any]]:
    """A loop as the runner drives it; ``background=None``: no monitor at all."""
    model, opt = _model_and_optimizer(kind)
    monitor = None
    if background is not None:
        monitor = FisherMonitor(
            model,
            opt,
            layers=["0.weight", "2.weight"],
            window=4,
            report_every=every,
            last_step=steps,
            background=background,
        )
    gen = torch.Generator().manual_seed(1)
    rows: list[Any] = []
    for step in range(1, steps + 1):
        x = torch.randn(32, 12, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), x[:, :6]).backward()
        if monitor is not None:
            monitor.observe(step)
        opt.step()
        if monitor is not None:
            if monitor.is_report_step(step):
                monitor.submit_report(step)
            rows += monitor.finished_reports()
    if monitor is not None:
        rows += monitor.close()
    return model, rows


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["adamw", "dykaf"])
def test_background_reports_equal_synchronous_ones_and_leave_training_bit_identical(kind: str) -> None:
    plain, _ = _train(kind, None)
    synchronous, sync_rows = _train(kind, "off")
    background, bg_rows = _train(kind, "on")
    assert sorted(bg_rows) == sorted(sync_rows) and {r.step for r in bg_rows} == {10, 20, 30, 40}
    if kind == "dykaf":
        assert any(r.method == "own" for r in bg_rows)  # the optimizer's state was snapshotted
    for a, b, c in zip(plain.parameters(), synchronous.parameters(), background.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def _blocking_report(monkeypatch: pytest.MonkeyPatch, release: threading.Event, seen: list[str]) -> None:
    original = LayerProbe.report

    def report(self: LayerProbe, step: int, own: Any = None) -> Any:
        seen.append(threading.current_thread().name)
        assert release.wait(10), "the test never released the report"
        return original(self, step, own)

    monkeypatch.setattr(LayerProbe, "report", report)


def _warm_monitor(every: int) -> tuple[FisherMonitor, nn.Module]:
    model, opt = _model_and_optimizer("adamw")
    monitor = FisherMonitor(model, opt, layers=["0.weight"], window=3, report_every=every, background="on")
    for step in range(1, every + 1):
        model.zero_grad()
        model(torch.randn(8, 12)).square().mean().backward()
        monitor.observe(step)
    return monitor, model


def test_submit_returns_while_the_report_runs_on_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    release, seen = threading.Event(), []
    _blocking_report(monkeypatch, release, seen)
    monitor, _ = _warm_monitor(every=100)
    monitor.submit_report(100)  # would block forever here if it ran in this thread
    assert monitor.finished_reports() == []  # still running
    release.set()
    rows = monitor.finished_reports(wait=True)
    assert rows and {r.step for r in rows} == {100}
    assert seen and all(name.startswith("fisher-report") for name in seen)
    monitor.close()


def test_observe_waits_for_the_report_only_when_it_touches_the_probes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release, seen = threading.Event(), []
    _blocking_report(monkeypatch, release, seen)
    every = 300
    monitor, model = _warm_monitor(every=every)
    horizon = monitor.horizons["0.weight"]  # 135 at β = 0.95
    monitor.submit_report(every)
    # The next step is 299 steps from the next report, beyond the horizon: observe records and
    # feeds nothing, so it must not wait (it would block until the test's 10 s timeout).
    assert monitor.steps_until_report(every + 1) >= horizon
    monitor.observe(every + 1)
    assert monitor.finished_reports() == [] and not release.is_set()
    # The first step inside the next report's horizon restarts the shadows: observe waits.
    threading.Timer(0.2, release.set).start()
    model(torch.randn(8, 12)).square().mean().backward()
    monitor.observe(2 * every - horizon + 1)
    assert release.is_set()
    assert {r.step for r in monitor.finished_reports()} == {every}  # already done: no wait here
    monitor.close()


def test_a_failing_background_report_raises_in_the_callers_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: LayerProbe, step: int, own: Any = None) -> Any:
        raise RuntimeError("report exploded")

    monkeypatch.setattr(LayerProbe, "report", broken)
    monitor, _ = _warm_monitor(every=10)
    monitor.submit_report(10)
    with pytest.raises(RuntimeError, match="report exploded"):
        monitor.finished_reports(wait=True)
    monitor.close()


def test_auto_uses_the_thread_only_with_a_spare_core_and_full_precision() -> None:
    params = [nn.Parameter(torch.zeros(2, 2))]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, available_cores() - 1))
        assert use_background("auto", params) == (available_cores() > 1)
        torch.set_num_threads(available_cores())
        assert not use_background("auto", params)
        assert use_background("on", params) and not use_background("off", params)
        torch.set_float32_matmul_precision("high")  # a report would flip it for the training thread
        assert not use_background("on", params)
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="background must be one of"):
        use_background("sometimes", params)
    with pytest.raises(ValueError, match="background must be one of"):
        FisherMonitor(nn.Linear(3, 4), background="yes")


@pytest.mark.usefixtures("one_thread")
def test_runner_stores_the_same_fisher_rows_with_background_reports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Also through a checkpoint: ``save`` waits for the running report before flushing."""
    pytest.importorskip("dykaf.fisher")
    results = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(runner_module, "FisherMonitor", functools.partial(FisherMonitor, background=mode))
        task = tiny_task(steps=12, fisher_every=4, fisher_window=3, checkpoint_every=4)
        (spec,) = JobSpec.model_validate(tiny_job([{"name": "dykaf"}], task=task)).expand()
        sink = MemorySink()
        result = execute_run(spec, sink, checkpoint_dir=tmp_path / mode)
        assert result.status == "succeeded"
        results[mode] = sink
    assert sorted(results["on"].fisher) == sorted(results["off"].fisher)
    assert {row[0] for row in results["on"].fisher} == {4, 8, 12}


def test_a_failing_background_report_fails_the_run_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: LayerProbe, step: int, own: Any = None) -> Any:
        raise RuntimeError("report exploded")

    monkeypatch.setattr(LayerProbe, "report", broken)
    monkeypatch.setattr(runner_module, "FisherMonitor", functools.partial(FisherMonitor, background="on"))
    job = tiny_job(task=tiny_task(steps=6, fisher_every=3, fisher_window=2))
    (spec,) = JobSpec.model_validate(job).expand()
    result = execute_run(spec, MemorySink())
    assert result.status == "failed" and "report exploded" in (result.reason or "")


def test_snapshot_clones_the_tensors_of_any_own_state() -> None:
    """PreconditionerState (a frozen dataclass) and any other object with the OwnState fields."""
    from types import SimpleNamespace

    from dykaf.fisher.background import snapshot_own

    model, opt = _model_and_optimizer("dykaf")
    model(torch.randn(4, 12)).square().mean().backward()
    opt.step()
    weight = model[0].weight
    plain = SimpleNamespace(
        left=torch.ones(2, 2), right=None, second_moment=torch.zeros(2), matrix_shape=(2, 1)
    )
    for own in (opt.preconditioner_state(weight), plain):
        snap = snapshot_own(own)
        assert type(snap) is type(own) and snap.matrix_shape == own.matrix_shape
        assert snap.right is None or snap.right is not own.right
        assert snap.left is not own.left and torch.equal(snap.left, own.left)
        own.left.add_(1.0)  # the optimizer moves on ...
        assert not torch.equal(snap.left, own.left)  # ... the snapshot does not


def _topology(root: Path, cores_of_cpus: dict[int, tuple[int, int]]) -> Path:
    """A sysfs-like CPU topology: CPU number → (package, core)."""
    for cpu, (package, core) in cores_of_cpus.items():
        place = root / f"cpu{cpu}" / "topology"
        place.mkdir(parents=True)
        (place / "physical_package_id").write_text(f"{package}\n")
        (place / "core_id").write_text(f"{core}\n")
    return root


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="affinity and sysfs are Linux's")
def test_hyperthreads_of_one_core_are_not_spare_cores(tmp_path: Path) -> None:
    """On an SMT machine torch's default (one thread per physical core) leaves no spare core."""
    cpus = sorted(os.sched_getaffinity(0))
    siblings = _topology(tmp_path / "smt", {cpu: (0, cpu // 2) for cpu in cpus})
    assert available_cores(siblings) == (len(cpus) + 1) // 2
    separate = _topology(tmp_path / "plain", {cpu: (0, cpu) for cpu in cpus})
    assert available_cores(separate) == len(cpus)
    two_sockets = _topology(tmp_path / "sockets", {cpu: (cpu % 2, 0) for cpu in cpus})
    assert available_cores(two_sockets) == min(2, len(cpus))
    assert available_cores(tmp_path / "unreadable") == len(cpus)  # no topology: logical CPUs
