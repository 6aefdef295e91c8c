"""What ``dykaf-lab worker`` starts: the queues, the Celery pool and the environment of a worker,
from the devices it owns.

* ``--gpu 0`` or ``--gpus 3``: one GPU, the solo pool, one run at a time (the per-GPU worker).
* ``--gpus 0-7`` (or ``0,2,5``, ``all``): a node worker. It consumes ``gpu`` and ``gpu-x2`` …
  ``gpu-x8`` (``server.jobs.queues``) and runs up to one run per GPU at once, on Celery's
  ``threads`` pool: each run trains in its own subprocesses (torchrun), the task thread only
  supervises them, so threads are enough and nothing forks after CUDA is up. The runs share the
  GPUs through ``worker.devices.DevicePool`` (all-or-nothing, first come first served).
* ``--cpus N``: N CPU ranks (Gloo processes) for runs on up to N devices, still one run at a time
  (solo): a CPU run takes every core, so two at once would only make both runs' timings wrong.

The devices reach the worker process as ``DYKAF_WORKER_GPUS`` (with ``CUDA_VISIBLE_DEVICES`` the
same physical indices, numbered like ``nvidia-smi`` by ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) or
``DYKAF_WORKER_CPU_RANKS``; without an option, those variables (if set) say it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from server.core.config import MAX_DEVICES
from server.jobs.queues import consumed_queues
from worker.devices import listed_gpus, parse_gpus


def celery_worker_argv(
    queues: str, name: str, loglevel: str = "INFO", *, pool: str = "solo", concurrency: int = 1
) -> list[str]:
    """The worker command line: prefetch 1 and no gossip/mingle/heartbeat, with the solo pool (no
    fork, so no CUDA-before-fork, one run at a time) or, for a node worker, ``threads`` with one
    thread per GPU and the fair scheduling of reserved tasks."""
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", pool]
    argv += ["-c", str(concurrency), "--prefetch-multiplier", "1"]
    if pool != "solo":
        argv += ["-O", "fair"]
    argv += ["-Q", queues, "-n", name, "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return [*argv, "-l", loglevel]


@dataclass(frozen=True)
class WorkerPlan:
    """The ``celery worker`` a ``dykaf-lab worker`` command becomes."""

    queues: list[str]
    pool: str
    concurrency: int
    name: str
    env: dict[str, str]

    def argv(self, loglevel: str = "INFO") -> list[str]:
        return celery_worker_argv(
            ",".join(self.queues), self.name, loglevel, pool=self.pool, concurrency=self.concurrency
        )


def _compact(indices: list[int]) -> str:
    """``0-3_6`` for GPUs 0, 1, 2, 3 and 6: a node name part without commas."""
    groups: list[list[int]] = []
    for index in indices:
        if groups and index == groups[-1][-1] + 1:
            groups[-1].append(index)
        else:
            groups.append([index])
    return "_".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def plan_worker(
    *,
    queue: str | None = None,
    gpu: int | None = None,
    gpus: str | None = None,
    cpus: int | None = None,
    name: str | None = None,
    environ: Mapping[str, str] | None = None,
    listed: Callable[[], list[int]] = listed_gpus,
) -> WorkerPlan:
    """The plan for these options; ``ValueError`` names the option at fault."""
    env = dict(os.environ if environ is None else environ)
    if gpu is not None and gpus is not None:
        raise ValueError("--gpu and --gpus: give one of them (--gpu N is --gpus N)")
    if gpu is not None:
        gpus = str(gpu)
    if gpus is None and cpus is None:  # no option: what the environment says, if anything
        gpus = env.get("DYKAF_WORKER_GPUS") or None
        ranks = env.get("DYKAF_WORKER_CPU_RANKS") or None
        cpus = int(ranks) if ranks and ranks.strip().isdigit() and gpus is None else None
    if gpus is not None and cpus is not None:
        raise ValueError("--gpus and --cpus: a worker offers GPUs or CPU ranks, not both")
    if cpus is not None and not 1 <= cpus <= MAX_DEVICES:
        raise ValueError(f"--cpus must be between 1 and {MAX_DEVICES}; got {cpus}")
    indices = parse_gpus(gpus, listed) if gpus is not None else []
    if gpus is not None and not indices:
        raise ValueError(f"--gpus {gpus!r}: no GPU")
    bases = [part.strip() for part in (queue or ("cpu" if cpus else "gpu")).split(",") if part.strip()]
    if not bases:
        raise ValueError("--queue: name at least one queue (gpu, cpu or gpu,cpu)")
    devices = len(indices) or cpus or 1
    if indices:
        visible = ",".join(map(str, indices))
        env["CUDA_VISIBLE_DEVICES"] = visible
        env["DYKAF_WORKER_GPUS"] = visible
        env.pop("DYKAF_WORKER_CPU_RANKS", None)
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        env.setdefault("DYKAF_WORKER_DEVICE", "cuda")
    else:
        env.pop("DYKAF_WORKER_GPUS", None)
        if cpus is not None:
            env["DYKAF_WORKER_CPU_RANKS"] = str(cpus)
        if bases == ["cpu"]:
            env.setdefault("DYKAF_WORKER_DEVICE", "cpu")
    if name:
        node = name
    elif len(indices) == 1:
        node = f"gpu{indices[0]}@%h"
    elif indices:
        node = f"gpus{_compact(indices)}@%h"
    else:
        node = f"{'-'.join(bases)}-{os.getpid()}@%h"
    threads = len(indices) > 1
    return WorkerPlan(
        queues=consumed_queues(bases, devices),
        pool="threads" if threads else "solo",
        concurrency=len(indices) if threads else 1,
        name=node,
        env=env,
    )
