"""bench/fisher_breakdown.py runs end to end on the CPU (dry run) and splits the run's own
``fisher_time_s`` into the kinds of diagnostics work the runner timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_splits_the_fisher_time_by_kind(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "fisher_breakdown.py"),
            "--out",
            str(tmp_path),
            "--dry-run",
            "--parts",
            "eigh,runs",
            "--optimizers",
            "adamw",
            "--repeat",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "fisher_breakdown.json").read_text())
    assert {row["dtype"] for row in report["eigh"]} == {"float32", "float64"}
    cold, run = report["runs"]  # --repeat 2: the same run twice in one process
    assert (cold["task"], run["task"]) == ("default task (tiny), pass 1", "default task (tiny), pass 2")
    with_diag, without = run["with"], run["without"]
    assert with_diag["status"] == without["status"] == "succeeded"
    kinds = with_diag["seconds_by_kind"]
    # Every second of the product's fisher_time_s is attributed to one timed call of the runner.
    assert abs(sum(kinds.values()) - with_diag["fisher_time_s"]) < 1e-3
    assert kinds["observe"] > 0 and without["fisher_time_s"] == 0.0
    assert with_diag["device_warmup_s"] == 0.0  # the CPU is not warmed (worker/training/warmup.py)
    markdown = (tmp_path / "fisher_breakdown.md").read_text()
    assert "| default task (tiny), pass 2 | adamw |" in markdown and "float64" in markdown
