"""The GPU check script runs end to end on the CPU in dry-run mode (so it works before a GPU is lent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_json_and_markdown(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["torch"]
    assert "summary" in report["cuda_tests"], report["cuda_tests"]
    shapes = {row["shape"] for row in report["optimizer_step"]["rows"]}
    optimizers = {row["optimizer"] for row in report["optimizer_step"]["rows"]}
    assert shapes == {"16x16", "16x48", "16x64", "64x16"}
    assert optimizers == {"adamw", "soap", "dykaf", "dykaf-rank1", "muon"}
    runs = report["training"]["runs"]
    assert [r["optimizer"] for r in runs] == ["adamw", "soap", "dykaf"]
    assert all(r["status"] == "succeeded" and r["final_val_loss"] > 0 for r in runs)
    assert all(r["fisher_overhead"] > 0 for r in runs)  # diagnostics on by default, self-measured
    ranked = report["distributed"]["runs"]  # the multi-device path forced onto one Gloo rank
    assert [(r["optimizer"], r["mode"]) for r in ranked] == [
        (name, mode) for mode in ("shard", "replicate") for name in ("adamw", "soap", "dykaf")
    ]
    assert all(r["status"] == "succeeded" and r["tokens_per_s_ranked"] > 0 for r in ranked), ranked
    # One rank sees the data of the in-process run: the same validation loss (float32 on the CPU).
    assert all(r["val_loss_rel_diff"] < 1e-5 for r in ranked), ranked
    cold = report["cold_start"]["runs"]  # two fresh processes: warm-up off, then on; two passes each
    assert [(r["warm_up"], r["pass"]) for r in cold] == [("off", "1"), ("off", "2"), ("on", "1"), ("on", "2")]
    assert all(
        r["status"] == "succeeded" and r["fisher_time_s"] > 0 and "@" in r["largest_calls"] for r in cold
    )
    assert all(r["device_warmup_s"] == 0.0 for r in cold)  # the CPU is never warmed
    default = report["default_task"]["runs"]  # bench/default_task.yaml through the worker code path
    assert [r["optimizer"] for r in default] == ["adamw", "soap", "dykaf"]
    assert all(r["status"] == "succeeded" and r["fisher_overhead"] > 0 for r in default)
    assert all(r["fisher_rows"] > 0 for r in default)  # its reports were stored
    fisher = report["fisher"]["rows"]
    assert [r["label"].split()[0] for r in fisher] == ["adamw", "soap", "dykaf", "adamw"]
    # On the CPU "auto" means eager; on a GPU the first three say "CUDA graph", the last "eager".
    assert all("shadow updates: eager" in r["label"] for r in fisher)
    assert all(r["step_ms"] > 0 and r["report_ms"] > 0 and r["horizon"] >= 4 for r in fisher)
    rules = report["factor_rules"]["rows"]
    assert [r["rule"] for r in rules] == ["parallel", "sequential", "ema"]
    assert all(r["48x32_us"] > 0 and r["kernels"] > 0 for r in rules)
    engine = report["engine"]  # the batched engine: ops per step, host syncs, step time
    counts = {row["optimizer"]: row for row in engine["counts"]["rows"]}
    assert set(counts) == {"dykaf", "soap", "adamw"} and all(row["ops_1"] > 0 for row in counts.values())
    assert all(verdict.startswith("none") for verdict in engine["syncs"].values()), engine["syncs"]
    assert [(t["optimizer"], t["compile_step"]) for t in engine["timing"]] == [
        ("dykaf", False),
        ("soap", False),
        ("adamw", False),
    ]
    assert all(t["step_ms"] > 0 for t in engine["timing"])
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## Batched engine" in markdown and "| dykaf | False |" in markdown
    assert "## Factor-rule updates" in markdown and "| parallel |" in markdown
    assert "## A fresh process's first run" in markdown and "| on | 1 | succeeded |" in markdown
    assert "## Fisher diagnostics overhead" in markdown and "overhead @ every 250" in markdown
    assert "## One optimizer step" in markdown and "| dykaf |" in markdown


def test_report_written_midway_marks_the_sections_still_to_run(tmp_path: Path) -> None:
    # main() rewrites the report after every section, so a run cut off by a lent GPU's time limit
    # still leaves what finished; the sections that did not run are marked, not silently empty.
    from bench import gpu_check

    finished = {"environment": gpu_check.environment(), "cuda_tests": {"summary": "14 passed"}}
    pending = ["cold_start", "default_task", "optimizer_step", "training", "fisher", "factor_rules"]
    gpu_check.write_report(tmp_path, finished, pending=pending)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda_tests"] == {"summary": "14 passed"}
    assert all("not run yet" in report[name]["skipped"] for name in pending)
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "`14 passed`" in markdown and markdown.count("not run yet") == 6


def test_gpu_check_pretrain_section_dry_run(tmp_path: Path) -> None:
    """The pre-training throughput section alone (tiny presets on the CPU): every optimizer's row
    has tokens/s and an optimizer share, and no MFU (no peak on a CPU)."""
    others = ["tests", "distributed", "cold", "default", "fisher", "rules", "training", "steps"]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--out",
            str(tmp_path),
            "--dry-run",
            "--skip",
            *others,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["pretrain"]["rows"]
    assert [(r["preset"].split()[0], r["optimizer"]) for r in rows] == [
        (p, o) for p in ("gpt2-124m", "llama-130m") for o in ("adamw", "soap", "dykaf", "muon")
    ]
    assert all(r["status"] == "succeeded" and r["tokens_per_s"] > 0 for r in rows)
    assert all(0 < r["optimizer_share"] < 1 and r["mfu"] is None for r in rows)
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## Pre-training throughput" in markdown and "| muon |" in markdown
