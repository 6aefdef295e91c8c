"""bench/convergence.py end to end on a few steps: every chosen optimizer swept, selected and reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "convergence.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, check=False
    )


def test_a_chosen_subset_is_swept_selected_and_reported(tmp_path: Path) -> None:
    recorded = ROOT / "bench" / "results" / "convergence.md"
    before = recorded.read_bytes()
    proc = _run("--steps", "3", "--optimizers", "adamw,shampoo", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The report goes beside --out (run.md); the recorded report is left alone.
    assert recorded.read_bytes() == before
    text = (tmp_path / "run.md").read_text()
    assert text.startswith("# Convergence benchmark: AdamW vs Shampoo\n")
    sweep_rows = [line for line in text.splitlines() if line.startswith(("| adamw |", "| shampoo |"))]
    assert len(sweep_rows) == 2 and all(line.count(": ") == 5 for line in sweep_rows)  # 5 lrs each
    selected = [line for line in text.splitlines() if line.startswith(("| adamw[lr=", "| shampoo[lr="))]
    assert len(selected) == 2 and all("/3)" in line for line in selected)  # 3 seeds
    assert "soap" not in text and "muon" not in text


@pytest.mark.parametrize("value", ["nope", "adamw,nope", ","])
def test_unknown_optimizers_are_rejected_by_name(value: str) -> None:
    proc = _run("--optimizers", value)
    assert proc.returncode == 2 and "--optimizers" in proc.stderr and "shampoo" in proc.stderr
