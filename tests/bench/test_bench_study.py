"""bench/study.py end to end on a few steps: a one-scale study's sweeps, confirmations and the
baseline's budget runs all run, and the report has the study's tables and files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from bench.study import main


def test_a_tiny_study_runs_and_reports(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "study"
    main(["--steps", "4", "--optimizers", "adamw,muon", "--scales", "d64x2", "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    (scale,) = report["scales"]
    assert [p["multiplier"] for p in scale["baseline_curve"]] == [1.0, 2.0, 4.0]
    assert [p["tokens"] for p in scale["baseline_curve"]] == [4 * 8 * 64, 8 * 8 * 64, 16 * 8 * 64]
    assert all(p["seeds"] == 2 for p in scale["baseline_curve"])
    for row in scale["optimizers"]:
        assert row["seeds"] == 2 and len(row["sweep"]) == 4 and row["token_speedup"] is not None
    rows = list(csv.DictReader((out / "study.csv").open()))
    assert [(r["scale"], r["optimizer"]) for r in rows] == [("d64x2", "adamw"), ("d64x2", "muon")]
    text = (out / "study.md").read_text()
    assert "| optimizer | winner | final val loss | token speed-up | time speed-up |" in text
