"""Run statuses have one home (``server.jobs.status.RunStatus``); everything else derives from it."""

from __future__ import annotations

import re
from pathlib import Path

from server.db.models import Run
from server.jobs.status import ACTIVE, JS_MODULE, STATUSES, TERMINAL, RunStatus, js_module

ROOT = Path(__file__).resolve().parents[2]


def test_statuses_split_into_active_and_terminal() -> None:
    assert set(STATUSES) == set(RunStatus) == ACTIVE | TERMINAL and not ACTIVE & TERMINAL
    assert [status.terminal for status in RunStatus] == [status in TERMINAL for status in RunStatus]
    assert RunStatus.SUCCEEDED == "succeeded" and f"{RunStatus.CANCELLED}" == "cancelled"


def test_the_database_default_is_queued() -> None:
    assert Run.__table__.c.status.default.arg == RunStatus.QUEUED


def test_the_dashboards_statuses_are_generated_from_the_enum() -> None:
    """Regenerate with ``python -m server.jobs.status > web/static/js/statuses.js``."""
    assert (ROOT / JS_MODULE).read_text(encoding="utf-8") == js_module()


def test_no_hand_copy_of_the_status_lists_in_the_dashboard() -> None:
    literal = re.compile(r"new Set\(\[\s*'(queued|succeeded)'")
    copies = [
        path.name
        for path in (ROOT / "web" / "static" / "js").glob("*.js")
        if path.name != "statuses.js" and literal.search(path.read_text(encoding="utf-8"))
    ]
    assert copies == []
