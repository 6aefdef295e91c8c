"""The devices of one worker process and how its runs share them.

A node worker owns several GPUs (``dykaf-lab worker --gpus 0-7``) and runs several runs at once,
one per Celery thread; a run on N devices must hold N of them, exclusively, for as long as it
trains. ``DevicePool.acquire`` hands them out **all or nothing**: a request takes no device until
all N it needs are free, so two runs each holding part of what the other waits for (the deadlock of
taking devices one at a time) cannot happen. Requests are served **in arrival order**: a 4-GPU run
waiting for a busy node is not overtaken by 1-GPU runs arriving after it, which would otherwise
starve it for as long as small runs keep coming; the price is that GPUs freed while it waits stay
idle until it has them all.

A CPU worker's "devices" are ranks (``cpu0`` … ``cpu{k-1}``, Gloo processes); it runs one run at a
time (solo pool), so its pool only checks that a run fits.

``parse_gpus`` reads the ``--gpus`` option; ``listed_gpus`` asks ``nvidia-smi -L`` for ``all``.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from server.core.config import MAX_DEVICES, Settings

# How often a request waiting with a ``stop`` event looks at it (a set event is not a notify).
STOP_POLL_S = 0.2


class AcquireStopped(RuntimeError):
    """``acquire`` gave up because its ``stop`` event was set (the worker is shutting down)."""


class DevicePool:
    """A fixed set of device ids handed out all-or-nothing, first come first served; thread-safe."""

    def __init__(self, devices: Sequence[str]) -> None:
        if not devices:
            raise ValueError("a device pool needs at least one device")
        if len(set(devices)) != len(devices):
            raise ValueError(f"device ids must be distinct: {list(devices)}")
        self.devices: tuple[str, ...] = tuple(devices)
        self._free = set(self.devices)
        self._waiting: list[object] = []  # tickets of the requests not yet served, oldest first
        self._cond = threading.Condition()

    @property
    def size(self) -> int:
        return len(self.devices)

    @property
    def free(self) -> int:
        """Devices no run holds now."""
        with self._cond:
            return len(self._free)

    @property
    def waiting(self) -> int:
        """Requests blocked in ``acquire``."""
        with self._cond:
            return len(self._waiting)

    @contextmanager
    def acquire(self, n: int, stop: threading.Event | None = None) -> Iterator[list[str]]:
        """Hold ``n`` devices for the ``with`` block; yields their ids (in the pool's order).

        Blocks until ``n`` are free and every earlier request was served. ``n`` larger than the pool
        is a ``ValueError`` at once (it could never be served); a set ``stop`` makes a waiting
        request give up with ``AcquireStopped``. The devices are released on exit, error or not.
        """
        if not 1 <= n <= self.size:
            owned = ", ".join(self.devices)
            raise ValueError(f"cannot hold {n} devices: this worker has {self.size} ({owned})")
        taken = self._take(n, stop)
        try:
            yield taken
        finally:
            with self._cond:
                self._free.update(taken)
                self._cond.notify_all()

    def _take(self, n: int, stop: threading.Event | None) -> list[str]:
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or len(self._free) < n:
                    if stop is not None and stop.is_set():
                        raise AcquireStopped(f"stopped while waiting for {n} devices")
                    self._cond.wait(STOP_POLL_S if stop is not None else None)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next request in line may be servable now
            taken = [device for device in self.devices if device in self._free][:n]
            self._free.difference_update(taken)
            return taken


def node_devices(settings: Settings) -> list[str]:
    """This worker's device ids: its physical GPU indices (``worker_gpus``), else ``cpu0`` …"""
    if settings.gpu_indices:
        return [str(index) for index in settings.gpu_indices]
    return [f"cpu{rank}" for rank in range(settings.worker_cpu_ranks)]


_POOLS: dict[tuple[str, ...], DevicePool] = {}
_POOLS_LOCK = threading.Lock()


def node_pool(settings: Settings) -> DevicePool:
    """The process-wide pool of this worker's devices (one per device set, shared by every thread)."""
    key = tuple(node_devices(settings))
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = DevicePool(key)
        return _POOLS[key]


_NVIDIA_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


def parse_nvidia_smi_list(output: str) -> list[int]:
    """GPU indices from ``nvidia-smi -L`` (``GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-…)`` lines)."""
    return [int(index) for index in _NVIDIA_SMI_LINE.findall(output)]


def listed_gpus() -> list[int]:
    """Every GPU ``nvidia-smi -L`` lists (inside a container: those reserved for it, from 0)."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"--gpus all: cannot run nvidia-smi -L ({exc})") from None
    gpus = parse_nvidia_smi_list(done.stdout)
    if done.returncode != 0 or not gpus:
        detail = (done.stderr or done.stdout).strip()[:300]
        raise ValueError(f"--gpus all: nvidia-smi -L lists no GPU (exit {done.returncode}: {detail})")
    return gpus


def parse_gpus(text: str, listed: Callable[[], list[int]] = listed_gpus) -> list[int]:
    """The GPU indices of ``--gpus``: ``0-7``, ``0,2,5``, ``0-3,6`` or ``all`` (``listed()``).

    Indices are physical ones, as ``nvidia-smi`` numbers them; the result is sorted and distinct,
    and anything else is a ``ValueError`` naming ``--gpus``.
    """
    value = text.strip().lower()
    if value == "all":
        gpus = list(listed())
    else:
        gpus = []
        for part in value.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match:
                raise ValueError(f"--gpus {text!r}: expected indices like 0-7, 0,2,5 or all")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                raise ValueError(f"--gpus {text!r}: the range {part.strip()} is empty")
            gpus += range(first, last + 1)
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"--gpus {text!r}: an index appears twice")
    if len(gpus) > MAX_DEVICES:
        raise ValueError(f"--gpus {text!r}: at most {MAX_DEVICES} GPUs per worker")
    return sorted(gpus)
