"""The statuses of runs and jobs: one enum for the database, the API, the runner, the CLI and the
dashboard (served to it by ``/api/v1/tasks``).

A job's status is derived from its runs' (``server.crud.jobs.recompute_job``). Every terminal status
other than ``succeeded`` carries a reason. Members are ``str``: they compare equal to, and are
stored as, their plain values.
"""

from __future__ import annotations

import enum
from collections.abc import Collection


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


JS_MODULE = "web/static/js/statuses.js"


def js_module() -> str:
    """``web/static/js/statuses.js``: the dashboard's copy of the statuses, generated from the enum
    (``python -m server.jobs.status > web/static/js/statuses.js``; a test checks it is current)."""

    def items(statuses: Collection[RunStatus]) -> str:
        return ", ".join(f"'{status}'" for status in RunStatus if status in statuses)

    return (
        "// Generated from RunStatus (server/jobs/status.py): python -m server.jobs.status; do not edit.\n"
        f"export const STATUSES = [{items(STATUSES)}];\n"
        f"export const ACTIVE = new Set([{items(ACTIVE)}]);\n"
        f"export const TERMINAL = new Set([{items(TERMINAL)}]);\n"
    )


if __name__ == "__main__":
    print(js_module(), end="")
