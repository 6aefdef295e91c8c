"""Fisher reports computed beside training, on a background thread.

A report is the heavy part of the diagnostics (for two probed layers: about 14 applications of the
implicit Fisher operator and 8 eigendecompositions; timings in BENCHMARKS.md), and nothing it reads
is needed again by training for a long while: the ring is next written ``window`` steps before the
next report and the shadows restart ``horizon`` steps before it (115 steps later at the defaults).
So the report can run on a spare CPU core or, on a GPU, on its own thread and CUDA stream, while
the training loop goes on; ``FisherMonitor`` waits for it only when it must touch the probes again
(or on ``state_dict``/``close``), which at the defaults is long after it has finished.

What the report needs from the optimizer (its factors, bases and second moment) changes every step,
so it is copied at submission (``snapshot_own``): a few MB. Torch ops release the GIL, so the
thread's heavy products run in parallel with the loop's.

Only reports go there. Moving the per-step ring/shadow work to the thread as well was tried: the
loop's diagnostics time fell, but the training time rose by more, so the cost merely moved into the
training time, where it skews the comparison of optimizers. Concurrent per-step work contends for
the core (or hyperthread) and caches the loop uses; a report every few hundred steps does not.

``background="auto"`` uses the thread when a probed parameter is on a GPU (whose host cores idle)
or when torch runs fewer intra-op threads than the process may use physical cores (a spare core;
hyperthreads do not count, see ``available_cores``), and only when float32 matmuls are already at
"highest" precision: a report forces that global setting, which from another thread would change
the training loop's own products.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dykaf.fisher.rows import FisherRow

BACKGROUND_MODES: tuple[str, ...] = ("auto", "on", "off")


# The tensors of an ``OwnState`` (``LayerProbe``'s view of ``preconditioner_state``) a report reads.
_OWN_TENSORS = ("left", "right", "left_basis", "right_basis", "second_moment")


def snapshot_own(own: Any | None) -> Any | None:
    """A copy of an ``OwnState`` with cloned tensors, so the optimizer's next steps cannot change
    what a background report reads (a dataclass such as ``PreconditionerState`` is copied with
    ``dataclasses.replace``; any other object shallow-copied)."""
    if own is None:
        return None
    clones = {
        name: None if getattr(own, name, None) is None else getattr(own, name).detach().clone()
        for name in _OWN_TENSORS
    }
    if dataclasses.is_dataclass(own) and not isinstance(own, type):
        return dataclasses.replace(own, **clones)
    snapshot = copy.copy(own)
    for name, value in clones.items():
        setattr(snapshot, name, value)
    return snapshot


# Linux's CPU topology: cpuN/topology/{physical_package_id,core_id} name the core CPU N runs on.
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def available_cores(topology: Path = CPU_TOPOLOGY) -> int:
    """Physical CPU cores this process may run on (its affinity mask, each core counted once).

    Hyperthreads of one core share its arithmetic units, and torch starts one intra-op thread per
    physical core by default. Counting logical CPUs would see a "spare core" on every SMT machine
    and run reports on the training threads' siblings, where they slow training by an amount no
    diagnostics timer sees. CPUs are grouped by (package, core) from ``topology``; where that is
    unreadable (not Linux, a restricted container) the logical count stands in.
    """
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    return _physical_cores(topology, cpus)


@functools.lru_cache(maxsize=8)
def _physical_cores(topology: Path, cpus: tuple[int, ...]) -> int:
    """Distinct (package, core) pairs of ``cpus``; read once per mask, as every report asks."""
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        place = topology / f"cpu{cpu}" / "topology"
        try:
            package = (place / "physical_package_id").read_text().strip()
            cores.add((package, (place / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def use_background(mode: str, params: Iterable[Tensor]) -> bool:
    """Whether reports go to the background thread now (see the module docstring for ``auto``)."""
    if mode not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {mode!r}")
    if mode == "off" or torch.get_float32_matmul_precision() != "highest":
        return False
    if mode == "on":
        return True
    on_gpu = any(p.device.type == "cuda" for p in params)
    return on_gpu or torch.get_num_threads() < available_cores()


class ReportWorker:
    """One background thread that runs reports one at a time and hands back their rows.

    ``submit`` starts a report (waiting for the previous one first, so at most one runs);
    ``join`` waits for the running one; ``take`` returns the rows of finished reports, re-raising
    a report's exception in the caller's thread.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[list[FisherRow]] | None = None
        self._finished: list[FisherRow] = []

    @property
    def busy(self) -> bool:
        """A report was submitted and not joined yet (it may have finished meanwhile)."""
        return self._pending is not None

    def submit(self, work: Callable[[], list[FisherRow]]) -> None:
        self.join()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fisher-report")
        self._pending = self._executor.submit(work)

    def add(self, rows: list[FisherRow]) -> None:
        """Rows computed in the caller's thread, handed out by ``take`` like the others."""
        self._finished.extend(rows)

    def join(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._finished.extend(pending.result())

    def take(self, wait: bool = False) -> list[FisherRow]:
        if self._pending is not None and (wait or self._pending.done()):
            self.join()
        rows, self._finished = self._finished, []
        return rows

    def close(self) -> list[FisherRow]:
        """Wait for the running report, stop the thread, return the rows not yet taken."""
        try:
            return self.take(wait=True)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
