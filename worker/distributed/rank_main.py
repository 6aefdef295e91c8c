"""What each rank of a multi-device run executes: ``python -m worker.distributed.rank_main FOLDER``.

Started by torchrun (``launch.py``), which sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in
the environment. The rank joins the process group, trains with the ordinary runner and leaves its
outcome in ``FOLDER``. Exit codes carry meaning to torchrun: 0 when the run ended by itself on this
rank (whatever its status: rank 0's result says it), 1 when this rank failed alone, so that torchrun
stops the others instead of letting them wait in a collective for the timeout.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from server.core.config import Settings
from server.jobs.spec import RunSpec
from server.jobs.status import RunStatus
from worker.distributed import folder as files
from worker.distributed.parent import die_with_parent
from worker.training.distributed import Ranks, init_from_environment
from worker.training.runner import execute_run
from worker.training.sinks import JsonLinesSink, MetricSink, NullSink

log = logging.getLogger(__name__)

# How often rank 0 tells the supervisor its step (the supervisor polls four times a second).
PROGRESS_EVERY_S = 0.2


def _sink(launch: files.Launch, folder: Path, spec: RunSpec, ranks: Ranks) -> MetricSink:
    if not ranks.is_main:
        return NullSink()
    if launch.sink == "files":
        return JsonLinesSink(folder / files.METRICS_FILE)
    if launch.run_id is None:
        raise ValueError("a database sink needs the run id")
    # The service's packages (SQLAlchemy, Celery) load only for a service run: ranks started by
    # prepare-ranks, or on a machine with just torch (bench/gpu_check.py), do without them.
    from worker.execute import database_sink

    return database_sink(Settings.from_env(), launch.run_id, spec.task)


def run(folder: Path) -> int:
    die_with_parent()
    launch = files.Launch.read(folder)
    spec = RunSpec.model_validate(launch.spec)
    rank = int(os.environ.get("RANK", "0"))
    (folder / f"rank-{rank}.pid").write_text(str(os.getpid()))
    try:
        ranks = init_from_environment(force=launch.force_collectives)
        sink = _sink(launch, folder, spec, ranks)
    except Exception:
        files.write_error(folder, rank, traceback.format_exc(limit=4).strip().splitlines()[-1])
        raise
    stop_file = folder / files.STOP_FILE

    last_write = 0.0

    def progress(step: int, total: int, _metrics: object) -> None:
        # The supervisor reads it a few times a second for the heartbeat: no file write per step.
        nonlocal last_write
        now = time.monotonic()
        if now - last_write >= PROGRESS_EVERY_S or step == total:
            files.write_progress(folder, step)
            last_write = now

    result = execute_run(
        spec,
        sink,
        checkpoint_dir=Path(launch.checkpoint_dir),
        should_cancel=stop_file.exists,
        progress=progress if ranks.is_main else None,
        ranks=ranks,
    )
    sink.close()
    if ranks.is_main:
        files.write_result(folder, result)
    if result.status == RunStatus.FAILED:
        files.write_error(folder, ranks.rank, result.reason or "failed")
        return 1
    dist.destroy_process_group()
    return 0


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format=f"[rank {os.environ.get('RANK', '?')}] %(levelname)s %(name)s: %(message)s"
    )
    if len(sys.argv) != 2:
        sys.exit("usage: python -m worker.distributed.rank_main LAUNCH_FOLDER")
    code = run(Path(sys.argv[1]))
    # Everything is written; leave without interpreter finalisation, during which a Gloo worker
    # thread still releasing a collective's tensors can abort the process (torch 2.13) and turn a
    # finished run into a failed exit (dykaf/distributed/README.md).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
