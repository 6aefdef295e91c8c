"""The once-per-process device warm-up (``worker/training/warmup.py``).

It only acts on CUDA; these tests let it act on the CPU as well (``force_warmup``) to check what it
does, what it never touches, and that the runner pays it before anything is timed and only once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.worker.test_worker_runner import _assert_identical, _CrashAt, _final_state, _run
from worker.training import warmup
from worker.training.runner import execute_run
from worker.training.sinks import MemorySink


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing warmed yet, as in a new worker process."""
    monkeypatch.setattr(warmup, "_done", set())


@pytest.fixture
def force_warmup(fresh_process: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup, "WARMED_DEVICE_TYPES", ("cpu", "cuda"))


@pytest.fixture
def solved_sides(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Sides of the matrices the warm-up decomposes through ``dykaf.eigenbasis``."""
    sides: list[int] = []
    real = warmup.eigenbasis.eigh

    def spy(matrix: torch.Tensor) -> Any:
        sides.append(matrix.shape[-1])
        return real(matrix)

    monkeypatch.setattr(warmup.eigenbasis, "eigh", spy)
    yield sides


CPU = torch.device("cpu")


def test_the_cpu_is_not_warmed(fresh_process: None, solved_sides: list[int]) -> None:
    assert warmup.warm_up(CPU, [torch.zeros(8, 8)]) == 0.0
    assert solved_sides == []


def test_every_factor_side_is_solved_once_per_process(force_warmup: None, solved_sides: list[int]) -> None:
    too_wide = warmup.WARM_SOLVER_UP_TO + 1
    params = [torch.zeros(6, 10), torch.zeros(10, 6), torch.zeros(3, 2, 5), torch.zeros(2, too_wide)]
    params.append(torch.zeros(7))  # a vector has no factors
    assert warmup.factor_sides(params) == {2, 3, 6, 10, too_wide}
    assert warmup.warm_up(CPU, params) > 0.0
    assert sorted(solved_sides) == [2, 3, 6, 10]
    solved_sides.clear()
    assert warmup.warm_up(CPU, params) == 0.0  # all warm: nothing done, nothing billed
    assert solved_sides == []
    assert warmup.warm_up(CPU, [torch.zeros(6, 4)]) > 0.0
    assert solved_sides == [4]


def test_probes_are_warmed_on_throwaway_copies(force_warmup: None) -> None:
    """The warm-up runs each probe's work (shadows, report) on a copy: the model, its gradients,
    the real probes and the global RNG are left exactly as they were."""
    fisher = pytest.importorskip("dykaf.fisher")
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 5))
    model(torch.randn(4, 12)).square().sum().backward()
    monitor = fisher.FisherMonitor(model, layers=["0.weight", "2.weight"], window=4)
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters()}
    rng = torch.get_rng_state()

    reports: list[tuple[tuple[int, int], int]] = []
    probe_class = type(next(iter(monitor.probes.values())))
    real_report = probe_class.report

    def spy(self: Any, step: int, own: Any = None) -> Any:
        rows = real_report(self, step, own)
        reports.append((self.shape, len(rows)))
        return rows

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probe_class, "report", spy)
        assert warmup.warm_up(CPU, model.parameters(), monitor) > 0.0
    assert sorted(shape for shape, _ in reports) == [(5, 8), (8, 12)]
    assert all(count > 0 for _, count in reports)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name][0]) and torch.equal(p.grad, before[name][1]), name
    for probe in monitor.probes.values():
        assert probe.ring is None and probe.observed == 0
        assert all(s.left is None and s.steps == 0 for s in probe.shadows.values())


def test_the_runner_warms_before_any_timed_step_once_per_process(
    force_warmup: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run of a process pays the warm-up (``device_warmup_s`` > 0) before its first step,
    apart from train and Fisher time; the next run pays nothing; neither trains differently from a
    run without any warm-up."""
    pytest.importorskip("dykaf.fisher")
    (spec,) = _run(
        [{"name": "soap", "hyperparameters": {"lr": 3e-3}}], steps=6, fisher_every=3, fisher_window=2
    )
    sinks: list[MemorySink] = []
    logged_at_warmup: list[int] = []
    real = warmup.warm_up

    def spy(*args: Any, **kwargs: Any) -> float:
        logged_at_warmup.append(len(sinks[-1].records))
        return real(*args, **kwargs)

    monkeypatch.setattr(warmup, "warm_up", spy)
    summaries = []
    for name in ("first", "second"):
        sinks.append(MemorySink())
        result = execute_run(spec, sinks[-1], checkpoint_dir=tmp_path / name)
        assert result.status == "succeeded"
        summaries.append(result.summary)
    assert logged_at_warmup == [0, 0]  # before step 0's metrics, let alone a timed step
    assert summaries[0]["device_warmup_s"] > 0.0
    assert summaries[1]["device_warmup_s"] == 0.0
    monkeypatch.setattr(warmup, "WARMED_DEVICE_TYPES", ())
    cold = execute_run(spec, MemorySink(), checkpoint_dir=tmp_path / "none")
    assert cold.summary["device_warmup_s"] == 0.0
    for name in ("first", "second"):
        _assert_identical(_final_state(tmp_path / name), _final_state(tmp_path / "none"))
    assert sinks[0].fisher == sinks[1].fisher


def test_a_resumed_run_keeps_the_warm_up_it_paid_before(force_warmup: None, tmp_path: Path) -> None:
    """``device_warmup_s`` is part of the checkpointed tracker: a run resumed in a process that is
    already warm still reports what its first part paid."""
    (spec,) = _run(steps=6, checkpoint_every=3)
    assert execute_run(spec, _CrashAt(4), checkpoint_dir=tmp_path).status == "failed"
    result = execute_run(spec, MemorySink(), checkpoint_dir=tmp_path)
    assert result.status == "succeeded" and result.summary["device_warmup_s"] > 0.0


def test_a_failing_warm_up_never_fails_the_run(force_warmup: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(matrix: torch.Tensor) -> Any:
        raise torch.OutOfMemoryError("simulated: the solver's workspace does not fit")

    monkeypatch.setattr(warmup.eigenbasis, "eigh", out_of_memory)
    (spec,) = _run(steps=3)
    result = execute_run(spec, MemorySink())
    assert result.status == "succeeded" and result.summary["device_warmup_s"] > 0.0


def test_reports_made_beside_training_are_warmed_on_a_thread_of_their_own(force_warmup: None) -> None:
    """A monitor that reports on its background thread gets its throwaway reports computed on
    another thread too (one that then ends), so the per-thread start-up (library handles, a
    stream's first workspaces on a GPU) is paid there and not in the first run's Fisher time."""
    import threading

    fisher = pytest.importorskip("dykaf.fisher")
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 5))
    threads: list[threading.Thread] = []
    probe_class = fisher.LayerProbe
    real_report = probe_class.report

    def spy(self: Any, step: int, own: Any = None) -> Any:
        threads.append(threading.current_thread())
        return real_report(self, step, own)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probe_class, "report", spy)
        beside = fisher.FisherMonitor(model, layers=["0.weight"], window=4, background="on")
        assert warmup.warm_up(CPU, model.parameters(), beside) > 0.0
        (thread,) = threads
        assert thread is not threading.main_thread() and not thread.is_alive()
        threads.clear()
        inline = fisher.FisherMonitor(model, layers=["2.weight"], window=4, background="off")
        assert warmup.warm_up(CPU, model.parameters(), inline) > 0.0
        assert threads == [threading.current_thread()]
