"""Celery queue names: one family per device kind, one queue per run size.

A run on one device goes to its kind's queue (``gpu`` or ``cpu``); a run on N > 1 devices goes to
``{kind}-x{N}`` (``gpu-x4``). A worker consumes its kind's queue and the sized queues up to the
number of devices it owns, so a run only ever reaches a worker that can hold it, and the broker
needs no knowledge of device counts. Producers (the API, the reconciler) and consumers (the
``dykaf-lab worker`` command) take the names from here.
"""

from __future__ import annotations

from collections.abc import Iterable

QUEUES = ("gpu", "cpu")


def sized_queue(base: str, devices: int) -> str:
    """The queue of runs on ``devices`` devices of family ``base``: ``base`` itself for one."""
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    return base if devices == 1 else f"{base}-x{devices}"


def consumed_queues(bases: Iterable[str], devices: int) -> list[str]:
    """Every queue a worker owning ``devices`` devices consumes: its base queues, then each base's
    sized queues from 2 devices up to ``devices`` (``gpu, cpu, gpu-x2, cpu-x2`` for two)."""
    names = list(dict.fromkeys(bases))
    return names + [sized_queue(base, n) for n in range(2, devices + 1) for base in names]
