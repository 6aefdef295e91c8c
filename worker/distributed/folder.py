"""The launch folder: how a supervisor and the ranks of one run talk (``launch.py``, ``rank_main.py``).

Plain files, so that it works the same for ranks on this machine and on others (shared storage), and
so that nothing here needs torch (``dykaf-lab prepare-ranks`` writes a folder without loading it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LAUNCH_FILE = "launch.json"
RESULT_FILE = "result.json"
STOP_FILE = "stop"
PROGRESS_FILE = "progress"
LOG_FILE = "ranks.log"
# Metrics of a run started outside the service (rank 0's ``JsonLinesSink``).
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Launch:
    """What every rank reads from ``launch.json``."""

    spec: dict[str, Any]
    checkpoint_dir: str
    # "database": rank 0 writes to the service DB (``run_id``, settings from the environment);
    # "files": rank 0 writes ``metrics.jsonl`` in the launch folder.
    sink: str
    run_id: int | None = None
    # Take the multi-device code path even with one rank (``Ranks.forced``).
    force_collectives: bool = False

    def write(self, folder: Path) -> None:
        write_atomic(folder / LAUNCH_FILE, json.dumps(asdict(self)))

    @classmethod
    def read(cls, folder: Path) -> Launch:
        return cls(**json.loads((folder / LAUNCH_FILE).read_text()))


def write_atomic(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


def write_result(folder: Path, result: Any) -> None:
    """Rank 0's ``RunResult`` (read back by ``launch.read_result``)."""
    payload = {
        "status": str(result.status),
        "reason": result.reason,
        "final_step": result.final_step,
        "summary": result.summary,
    }
    write_atomic(folder / RESULT_FILE, json.dumps(payload))


ERROR_FILES = "rank-*.error.json"


def error_path(folder: Path, rank: int) -> Path:
    """Where rank ``rank`` leaves the error that made it exit non-zero."""
    return folder / f"rank-{rank}.error.json"


def write_error(folder: Path, rank: int, message: str) -> None:
    write_atomic(error_path(folder, rank), json.dumps({"rank": rank, "error": message}))


def read_error(folder: Path, rank: int) -> str | None:
    path = error_path(folder, rank)
    return str(json.loads(path.read_text())["error"]) if path.is_file() else None


def write_progress(folder: Path, step: int) -> None:
    write_atomic(folder / PROGRESS_FILE, str(step))


def read_progress(folder: Path) -> int | None:
    try:
        return int((folder / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
