"""The statuses of runs and jobs: one enum for the database, the API, the runner, the CLI and the
dashboard (served to it by ``/api/v1/tasks``).

A job's status is derived from its runs' (``server.crud.jobs.recompute_job``). Every terminal status
other than ``succeeded`` carries a reason. Members are ``str``: they compare equal to, and are
stored as, their plain values.
"""

from __future__ import annotations

import enum


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """The run has ended and nothing will change it any more."""
        return self in TERMINAL


STATUSES = tuple(RunStatus)
TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.DIVERGED, RunStatus.CANCELLED})
ACTIVE = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
