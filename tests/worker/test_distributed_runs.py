"""Runs on two devices: two Gloo processes on the CPU, started by torchrun (``worker.distributed``).

* Same data, same result: a 2-device run equals the 1-device run with twice the accumulation —
  losses and final parameters — for AdamW, SOAP and DyKAF, in ``replicate`` and ``shard`` mode.
  Both sides run with one thread per process, and the model's sides are multiples of 16 (the byte
  vocabulary padded to 320): CPU BLAS/LAPACK round a product, QR or eigh differently with other
  thread counts, and, for sides like 257, by a matrix's place in a batch, so a shard owner's smaller
  blocks would round otherwise than the full ones. SOAP/DyKAF's eigenbases turn such last-bit
  differences into visible ones within a few steps (null-space directions of rank-deficient
  factors are arbitrary), which would hide whether the data and the averaging are right. With
  both in place the runs agree to the last bit or nearly.
* In ``shard`` mode each rank's checkpointed optimizer state covers exactly the matrices it owns.
* Lifecycle: a cancel stops both ranks, which checkpoint, and the resumed run ends exactly where an
  uninterrupted one does; a SIGKILLed rank ends the run ``failed`` promptly, naming what happened,
  with no process left; a diverging run is ``diverged`` on every rank; a checkpoint is never resumed
  on another number of devices.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from server.jobs.spec import JobSpec, RunSpec
from server.jobs.status import RunStatus
from worker.distributed.folder import METRICS_FILE, read_progress
from worker.distributed.launch import launch_ranks
from worker.training import checkpoint as ckpt
from worker.training.runner import RunResult, execute_run
from worker.training.sinks import MemorySink, read_json_lines

TWO_CPUS = ["cpu0", "cpu1"]
RELATIVE = 1e-5


def run_spec(optimizer: str, devices: int, grad_accum: int, **task: Any) -> RunSpec:
    body = {
        "name": "dist",
        "device": "cpu",
        "task": {
            "n_layer": 2,
            "n_head": 2,
            "d_model": 32,
            "vocab_size": 320,
            "context": 16,
            "batch_size": 4,
            "steps": 20,
            "warmup_steps": 2,
            "eval_every": 10,
            "eval_batches": 3,
            "log_every": 1,
            "fisher_every": 0,
            "corpus": {"name": "pydoc", "max_chars": 60_000},
            "devices_per_run": devices,
            "grad_accum": grad_accum,
            **task,
        },
        "optimizers": [{"name": optimizer, "hyperparameters": {"precondition_frequency": 4}}]
        if optimizer in ("soap", "dykaf")
        else [{"name": optimizer}],
    }
    return JobSpec.model_validate(body).expand()[0]


@pytest.fixture
def one_thread_ranks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One thread here and in every rank (whose OMP_NUM_THREADS follows the core count otherwise)."""
    monkeypatch.setattr(os, "cpu_count", lambda: len(TWO_CPUS))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def launch(spec: RunSpec, folder: Path, **kwargs: Any) -> tuple[RunResult, MemorySink]:
    result = launch_ranks(spec, folder / "launch", checkpoint_dir=folder / "ckpt", devices=TWO_CPUS, **kwargs)
    sink = MemorySink()
    if (folder / "launch" / METRICS_FILE).exists():
        read_json_lines(folder / "launch" / METRICS_FILE, sink)
    return result, sink


def final_model(folder: Path) -> dict[str, torch.Tensor]:
    path = ckpt.latest_checkpoint(folder)
    assert path is not None
    return ckpt.load_checkpoint(path)["model"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("mode", ["replicate", "shard"])
@pytest.mark.parametrize("optimizer", ["adamw", "soap", "dykaf"])
def test_two_devices_equal_one_device_with_twice_the_accumulation(
    optimizer: str, mode: str, tmp_path: Path, one_thread_ranks: None
) -> None:
    single = MemorySink()
    alone = execute_run(run_spec(optimizer, 1, 2), single, checkpoint_dir=tmp_path / "one", device="cpu")
    assert alone.status == RunStatus.SUCCEEDED, alone.reason
    result, pair = launch(run_spec(optimizer, 2, 1, distributed=mode), tmp_path / "two")
    assert result.status == RunStatus.SUCCEEDED, result.reason
    for name in ("train_loss", "val_loss", "grad_norm"):
        one, two = dict(single.series(name)), dict(pair.series(name))
        assert sorted(one) == sorted(two), name
        worst = max(abs(one[s] - two[s]) / abs(one[s]) for s in one)
        assert worst <= RELATIVE, (name, worst)
    reference, trained = final_model(tmp_path / "one"), final_model(tmp_path / "two" / "ckpt")
    assert reference.keys() == trained.keys()
    worst = max(relative(trained[k], reference[k]) for k in reference)
    assert worst <= RELATIVE, worst
    # Throughput counts the global batch: both ranks' tokens.
    assert result.summary["tokens_per_s"] > 0
    assert pair.series("train_loss")[0][1] == pytest.approx(single.series("train_loss")[0][1], rel=1e-6)


def test_shard_mode_checkpoints_each_matrix_state_on_its_owner_only(
    tmp_path: Path, one_thread_ranks: None
) -> None:
    spec = run_spec("dykaf", 2, 1, distributed="shard", steps=6, eval_every=6)
    result, _ = launch(spec, tmp_path)
    assert result.status == RunStatus.SUCCEEDED, result.reason
    folder = tmp_path / "ckpt"
    main = ckpt.load_checkpoint(ckpt.latest_checkpoint(folder))
    assert main["optimizer"] is None  # the state is in the ranks' parts
    owned: list[set[str]] = []
    for rank in range(2):
        part = ckpt.load_checkpoint(ckpt.part_path(folder, 6, rank))
        sharding = part["optimizer"]["sharding"]
        assert sharding["world_size"] == 2 and sharding["rank"] == rank
        names = set(sharding["owned"])
        # Every owned parameter has state (all were stepped), and no other parameter does.
        assert len(part["optimizer"]["state"]) == len(names) > 0
        owned.append(names)
    assert not owned[0] & owned[1]
    assert len(owned[0] | owned[1]) == len(main["model"])


def test_cancel_stops_both_ranks_and_the_resumed_run_ends_where_an_uninterrupted_one_does(
    tmp_path: Path, one_thread_ranks: None
) -> None:
    # Long enough that the stop (polled every quarter second) lands mid-run on any machine.
    spec = run_spec("soap", 2, 1, distributed="shard", steps=400, eval_every=200, log_every=10)
    straight, _ = launch(spec, tmp_path / "straight")
    assert straight.status == RunStatus.SUCCEEDED, straight.reason

    folder = tmp_path / "stopped"

    def stop_after_five() -> bool:
        return (read_progress(folder / "launch") or 0) >= 5

    cancelled, _ = launch(spec, folder, should_stop=stop_after_five)
    assert cancelled.status == RunStatus.CANCELLED, cancelled.reason
    stopped_at = cancelled.final_step
    assert 5 <= stopped_at < 400
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(folder / "ckpt")) == stopped_at
    for rank in range(2):
        assert ckpt.part_path(folder / "ckpt", stopped_at, rank).is_file()
    resumed, both = launch(spec, folder)
    assert resumed.status == RunStatus.SUCCEEDED, resumed.reason
    steps = [step for step, _ in both.series("train_loss")]
    assert steps == list(range(10, 401, 10)), steps  # each step logged once across the two attempts
    reference, trained = final_model(tmp_path / "straight" / "ckpt"), final_model(folder / "ckpt")
    for key in reference:
        torch.testing.assert_close(trained[key], reference[key], rtol=0, atol=0)


def test_a_killed_rank_fails_the_run_promptly_and_leaves_no_process(tmp_path: Path) -> None:
    spec = run_spec("adamw", 2, 1, steps=100_000 // 100, eval_every=1000, log_every=10)
    folder = tmp_path / "launch"
    killed: list[int] = []

    def kill_rank_one() -> bool:
        if not killed and (read_progress(folder) or 0) >= 3:
            pid = int((folder / "rank-1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return False

    began = time.monotonic()
    result = launch_ranks(
        spec, folder, checkpoint_dir=tmp_path / "ckpt", devices=TWO_CPUS, should_stop=kill_rank_one
    )
    assert killed, "rank 1 was never killed"
    assert result.status == RunStatus.FAILED
    assert (result.reason or "").startswith("rank 1 was killed by SIGKILL"), result.reason
    assert time.monotonic() - began < 120
    rank_zero = int((folder / "rank-0.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(rank_zero, 0)


def test_a_diverging_run_is_diverged_on_every_rank(tmp_path: Path) -> None:
    spec = run_spec("adamw", 2, 1, distributed="shard", schedule="constant", warmup_steps=0)
    # Adam with no second-moment memory and a vanishing eps divides by ~0 at lr 10: NaN within steps.
    exploding = {**spec.hyperparameters, "lr": 10.0, "eps": 1e-30, "beta2": 0.0}
    spec = spec.model_copy(update={"hyperparameters": exploding})
    result, _ = launch(spec, tmp_path)
    assert result.status == RunStatus.DIVERGED, result.reason
    assert "non-finite" in (result.reason or "")
    assert result.summary["diverged_step"] < 20
    assert not list((tmp_path / "launch").glob("rank-*.error.json"))  # no rank failed: all diverged


def test_a_checkpoint_is_not_resumed_on_another_number_of_devices(tmp_path: Path) -> None:
    result, _ = launch(run_spec("adamw", 2, 1, steps=4, eval_every=4), tmp_path)
    assert result.status == RunStatus.SUCCEEDED, result.reason
    longer = run_spec("adamw", 1, 2, steps=8, eval_every=4)
    resumed = execute_run(longer, MemorySink(), checkpoint_dir=tmp_path / "ckpt", device="cpu")
    assert resumed.status == RunStatus.FAILED
    assert "2-device run" in (resumed.reason or "") and "1 devices" in (resumed.reason or "")


def test_dykaf_lab_run_trains_a_two_device_job_and_writes_its_results(tmp_path: Path) -> None:
    """``./lab run`` of a 2-device job: the ranks' metrics come back into the usual result files."""
    from worker.local import run_job

    job = JobSpec.model_validate(
        {
            "name": "local-pair",
            "device": "cpu",
            "task": {**run_spec("adamw", 2, 1, steps=6, eval_every=3).task.model_dump(), "tokens": None},
            "optimizers": [{"name": "adamw"}, {"name": "soap"}],
        }
    )
    outcome = run_job(job, tmp_path / "out", show_progress=False)
    assert [r.result.status for r in outcome.runs] == [RunStatus.SUCCEEDED] * 2, [
        r.result.reason for r in outcome.runs
    ]
    for record in outcome.runs:
        assert [step for step, _ in record.curves.series("train_loss")] == list(range(1, 7))
    rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert sum(",train_loss," in row for row in rows) == 12


def test_prepare_ranks_writes_a_folder_that_torchruns_c10d_rendezvous_trains(tmp_path: Path) -> None:
    """The multi-machine path on one machine: ``prepare-ranks``, then the printed torchrun command
    with a c10d rendezvous (here one node of two ranks) trains the run into the folder."""
    import socket
    import subprocess
    import sys

    import yaml
    from typer.testing import CliRunner

    from worker.cli import app
    from worker.distributed.launch import ROOT, read_result

    spec = run_spec("adamw", 2, 1, steps=4, eval_every=4)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        yaml.safe_dump(
            {
                "name": "multi",
                "device": "cpu",
                "task": spec.task.model_dump(mode="json"),
                "optimizers": [{"name": "adamw"}],
            }
        )
    )
    folder = tmp_path / "ranks"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    printed = CliRunner().invoke(
        app,
        [
            "prepare-ranks",
            str(job_file),
            "--out",
            str(folder),
            "--nodes",
            "1",
            "--head",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={"COLUMNS": "400"},
    )
    assert printed.exit_code == 0, printed.output
    command = next(
        line.strip() for line in printed.output.splitlines() if line.strip().startswith("torchrun ")
    )
    assert f"--rdzv-endpoint=127.0.0.1:{port}" in command and "--nproc-per-node=2" in command
    argv = [sys.executable, "-m", "torch.distributed.run", *command.split()[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    subprocess.run(argv, cwd=ROOT, env=env, timeout=180, check=True, capture_output=True)
    result = read_result(folder)
    assert result is not None and result.status == RunStatus.SUCCEEDED, result
    assert result.final_step == 4 and (folder / METRICS_FILE).stat().st_size > 0
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(folder / "checkpoints")) == 4


def test_prepare_ranks_refuses_a_device_count_the_machines_cannot_split(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from worker.cli import app

    spec = run_spec("adamw", 2, 1)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        yaml.safe_dump(
            {"name": "multi", "task": spec.task.model_dump(mode="json"), "optimizers": [{"name": "adamw"}]}
        )
    )
    printed = CliRunner().invoke(
        app, ["prepare-ranks", str(job_file), "--out", str(tmp_path / "x"), "--nodes", "3", "--head", "h"]
    )
    assert printed.exit_code == 2
    assert "task.devices_per_run (2) is not a multiple of --nodes (3)" in printed.output


TORCHRUN_SUMMARY = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
worker.distributed.rank_main FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-04_23:44:43
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 22561)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 22561
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_23:44:43
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 22560)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_the_killed_rank_is_the_cause_even_when_torchrun_saw_its_peer_fail_first(tmp_path: Path) -> None:
    """Rank 0 noticed the broken connection and exited 1 before torchrun saw rank 1's SIGKILL: the
    reason still names rank 1 (the summary is torchrun's own format, as logged by a real run)."""
    from worker.distributed import launch as supervisor

    (tmp_path / "ranks.log").write_text(TORCHRUN_SUMMARY)
    (tmp_path / "rank-0.error.json").write_text(
        '{"rank": 0, "error": "RuntimeError: Connection reset by peer"}'
    )
    assert supervisor._root_cause(tmp_path) == (1, "rank 1 was killed by SIGKILL")
    (tmp_path / "ranks.log").write_text(TORCHRUN_SUMMARY.replace("(SIGKILL)", "(SIGTERM)"))
    assert supervisor._root_cause(tmp_path) == (0, "rank 0 failed: RuntimeError: Connection reset by peer")
