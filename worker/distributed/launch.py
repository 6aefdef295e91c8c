"""Start a run's ranks with torchrun and supervise them until they end: ``launch_ranks``.

The supervisor runs in the worker process (the Celery task, or ``dykaf-lab run``); it never touches
a device. It talks to the ranks through the run's launch folder:

* ``launch.json``  in: the run spec, the checkpoint folder, where rank 0 writes metrics;
* ``stop``         in: created when the run must stop (cancel, worker shutdown, lost ownership);
  rank 0 sees it before each step and every rank checkpoints and returns ``cancelled``;
* ``progress``     out: rank 0's last finished step (for the heartbeat);
* ``result.json``  out: rank 0's ``RunResult``, written when the run ended by itself (succeeded,
  diverged, cancelled, or failed with an exception on every rank);
* ``rank-R.error.json`` out: the exception that made rank R exit non-zero; torchrun then stops the
  other ranks at once instead of leaving them waiting in a collective;
* ``ranks.log``    torchrun's and the ranks' output.

A rank that dies (killed, out of memory) ends the run as ``failed`` with what the folder says about
it; torchrun is told not to restart ranks, because the service's own recovery — a requeued run
resuming from its newest checkpoint — already covers a dead worker, and one mechanism is easier to
reason about than two.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from server.jobs.spec import RunSpec
from server.jobs.status import RunStatus
from worker.distributed.folder import (
    ERROR_FILES,
    LOG_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
    STOP_FILE,
    Launch,
    read_error,
    read_progress,
)
from worker.distributed.parent import die_with_parent
from worker.training.runner import RunResult

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
# After a stop request the ranks checkpoint before they exit; a large model's checkpoint takes a
# while, so they get this long before torchrun is terminated (it then stops the ranks itself).
STOP_GRACE_S = 600.0
POLL_S = 0.25


def read_result(folder: Path) -> RunResult | None:
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    summary = {k: (math.nan if v is None else float(v)) for k, v in payload["summary"].items()}
    return RunResult(
        status=RunStatus(payload["status"]),
        reason=payload["reason"],
        final_step=int(payload["final_step"]),
        summary=summary,
    )


def torchrun_argv(folder: Path, ranks: int) -> list[str]:
    """One machine, ``ranks`` processes, a free port picked by the c10d rendezvous, no restarts."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "--max-restarts=0",
        "-m",
        "worker.distributed.rank_main",
        str(folder),
    ]


def rank_environment(devices: Sequence[str], base: Mapping[str, str]) -> dict[str, str]:
    """The ranks' environment: the run's GPUs (by physical index) or, for CPU ranks, no GPU and an
    even share of the cores each (Gloo processes oversubscribing the cores would time one another),
    never more threads than the worker itself was given."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if all(device.isdigit() for device in devices):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        env["DYKAF_RANK_DEVICE"] = "cuda"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["DYKAF_RANK_DEVICE"] = "cpu"
        share = max(1, (os.cpu_count() or 1) // len(devices))
        # A worker started with an explicit thread count (``OMP_NUM_THREADS``) keeps it per rank.
        chosen = base.get("OMP_NUM_THREADS", "")
        env["OMP_NUM_THREADS"] = str(
            min(share, int(chosen)) if chosen.isdigit() and int(chosen) > 0 else share
        )
    return env


# torchrun's failure summary: one entry per failed rank, with its exit code and signal name.
_FAILED_RANK = re.compile(
    r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)[^\n]*?(?:\((SIG[A-Z]+)\))?[ \t]*$",
    re.MULTILINE,
)
# What torchrun itself sends the surviving ranks once one has failed: not a cause.
_STOP_SIGNALS = {"SIGTERM", "SIGINT", "SIGHUP"}


def _root_cause(folder: Path) -> tuple[int, str] | None:
    """``(rank, what happened to it)`` for the rank whose failure brought the run down.

    torchrun's own "root cause" is the first failure it observed, which, when a rank is killed,
    may be a peer that only saw the broken connection. So: a rank killed by a signal torchrun does
    not send, else a rank that left an error, else torchrun's first entry.
    """
    try:
        text = (folder / LOG_FILE).read_text(errors="replace")
    except OSError:
        return None
    summary = text[text.rfind("ChildFailedError") :] if "ChildFailedError" in text else text
    failed = [(int(rank), int(code), name) for rank, code, name in _FAILED_RANK.findall(summary)]
    if not failed:
        return None
    for rank, _, name in sorted(failed):
        if name and name not in _STOP_SIGNALS:
            return rank, f"rank {rank} was killed by {name}"
    for rank, _, _ in sorted(failed, key=lambda entry: (entry[0] == 0, entry[0])):
        error = read_error(folder, rank)
        if error:
            return rank, f"rank {rank} failed: {error}"
    rank, code, name = failed[-1]  # torchrun lists the root cause last
    return rank, f"rank {rank} was killed by {name}" if name else f"rank {rank} exited with code {code}"


def _failure_reason(folder: Path, returncode: int) -> str:
    """Why the ranks ended without a result: the first rank to fail, else torchrun's exit status."""
    root = _root_cause(folder)
    if root is not None:
        return root[1][:2000]
    for path in sorted(folder.glob(ERROR_FILES)):
        first = json.loads(path.read_text())
        return f"rank {first['rank']} failed: {first['error']}"[:2000]
    if returncode < 0:
        return f"torchrun was killed by {signal.Signals(-returncode).name}"
    return f"a rank died (torchrun exited with code {returncode})"


def _clear(folder: Path) -> None:
    """Remove what an earlier attempt left (its stop request, result, errors and progress)."""
    for name in (STOP_FILE, RESULT_FILE, PROGRESS_FILE):
        (folder / name).unlink(missing_ok=True)
    for stale in folder.glob(ERROR_FILES):
        stale.unlink(missing_ok=True)


def launch_ranks(
    spec: RunSpec,
    folder: Path,
    *,
    checkpoint_dir: Path,
    devices: Sequence[str],
    sink: str = "files",
    run_id: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int], None] | None = None,
    env: Mapping[str, str] | None = None,
    stop_grace_s: float = STOP_GRACE_S,
    force_collectives: bool = False,
) -> RunResult:
    """Train ``spec`` on ``devices`` (GPU indices, or CPU slots) with one rank each; never raises
    for what happens to the ranks: their end is the returned result."""
    folder.mkdir(parents=True, exist_ok=True)
    _clear(folder)
    Launch(spec.model_dump(mode="json"), str(checkpoint_dir), sink, run_id, force_collectives).write(folder)
    environment = rank_environment(devices, {**os.environ, **(env or {})})
    parent = os.getpid()
    with (folder / LOG_FILE).open("ab") as log_file:
        proc = subprocess.Popen(
            torchrun_argv(folder, len(devices)),
            env=environment,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent),
        )
        log.info(
            "run %s: %d ranks started (torchrun pid %d), log %s",
            spec.run_key,
            len(devices),
            proc.pid,
            log_file.name,
        )
        try:
            _supervise(proc, folder, should_stop, progress, stop_grace_s)
        except BaseException:
            _terminate(proc)
            raise
    result = read_result(folder)
    if result is not None:
        root = _root_cause(folder) if proc.returncode != 0 else None
        if result.status == RunStatus.FAILED and root is not None and root[0] != 0:
            # Rank 0 saw only the broken connection; the cause is the rank that died first.
            result.reason = f"{root[1]}; rank 0 then: {result.reason}"[:2000]
        return result
    reason = _failure_reason(folder, proc.returncode)
    log.warning("run %s: ranks ended without a result: %s", spec.run_key, reason)
    return RunResult(status=RunStatus.FAILED, reason=reason, final_step=read_progress(folder) or 0)


def _supervise(
    proc: subprocess.Popen[bytes],
    folder: Path,
    should_stop: Callable[[], bool],
    progress: Callable[[int], None] | None,
    stop_grace_s: float,
) -> None:
    stop_sent: float | None = None
    last_step: int | None = None
    while proc.poll() is None:
        if stop_sent is None and should_stop():
            (folder / STOP_FILE).touch()
            stop_sent = time.monotonic()
        elif stop_sent is not None and time.monotonic() - stop_sent > stop_grace_s:
            log.warning("ranks did not stop within %.0f s of the request; terminating them", stop_grace_s)
            _terminate(proc)
        step = read_progress(folder)
        if progress is not None and step is not None and step != last_step:
            progress(step)
            last_step = step
        time.sleep(POLL_S)


def _terminate(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM torchrun (it stops its ranks), SIGKILL the whole session if that is not enough."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
