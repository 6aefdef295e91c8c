"""Measurement helpers: the metric names, step timing, memory peaks, norms."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable

import torch

# Every metric the runner may log, in CSV column order.
METRIC_NAMES = (
    "train_loss",
    "val_loss",
    "val_ppl",
    "lr",
    "grad_norm",
    "update_norm",
    "fwd_bwd_time",
    "optimizer_time",
    "step_time",
    "tokens_per_s",
    "train_time",
    "fisher_time",
    "peak_memory_mb",
)


def synchronize(device: torch.device) -> None:
    """Wait for the training stream's queued kernels so wall-clock splits between phases are real.

    Only the current stream: a device-wide sync would also wait for a Fisher report running on its
    own stream in the background (dykaf.fisher's background.py) and bill it to training.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def now(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def _current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class MemoryPeak:
    """Peak memory of this run: CUDA allocator peak, or the largest process RSS sampled on CPU.

    RSS is sampled (at log steps) rather than read from ``ru_maxrss`` because the latter is a
    whole-process peak that would carry one run's peak into the next run of a local comparison.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._peak = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> float:
        if self.device.type == "cuda":
            self._peak = max(self._peak, torch.cuda.max_memory_allocated(self.device) / 2**20)
        else:
            rss = _current_rss_mb()
            if rss is None:
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self._peak = max(self._peak, rss)
        return self._peak


def global_norm(tensors: Iterable[torch.Tensor]) -> float:
    """Euclidean norm over all tensors (float64 accumulation, one host sync)."""
    squares = [t.detach().double().pow(2).sum() for t in tensors]
    if not squares:
        return 0.0
    return float(torch.stack(squares).sum().sqrt())


def snapshot(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def update_norm(before: list[torch.Tensor], params: Iterable[torch.Tensor]) -> float:
    """Norm of the parameter change made by one optimizer step."""
    return global_norm(p.detach() - b for b, p in zip(before, params, strict=True))
