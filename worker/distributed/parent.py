"""Tie a child process's life to its parent's (Linux ``PR_SET_PDEATHSIG``).

A worker SIGKILLed mid-run must not leave torchrun and its ranks training on (and writing metrics)
while the run is requeued and resumed elsewhere. Linux can send a process a signal when its parent
dies; the supervisor sets it for torchrun (``preexec_fn``), and every rank sets it for itself, so
the chain worker → torchrun → ranks collapses from the top. Elsewhere this is a no-op: there the
process-group timeout is the backstop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> None:
    """Ask for SIGKILL when the parent dies; exit at once if it already has (the race between the
    fork and this call), which shows as a parent id different from ``expected_parent``."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)
