"""bench/data_loader.py runs end to end at a tiny size and reports what the notes quote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_data_loader_bench_small(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "bench" / "data_loader.py"),
        "--out",
        str(tmp_path / "out"),
        "--work",
        str(tmp_path / "work"),
        "--gigabytes",
        "0.02",
        "--seconds",
        "0.5",
        "--prepare-docs",
        "40",
        "--quick",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DYKAF_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "data_loader.json").read_text())
    assert result["loader"]["tokens_per_s"] > 0 and result["loader"]["vs_in_memory"] > 0
    memory = result["memory"]
    assert memory["run_status"] == "succeeded, succeeded"
    assert abs(memory["shard_gigabytes"] - 0.02) < 1e-3
    assert memory["rss_growth_epoch_mb"] < 200
    assert {(r["tokenizer"], r["processes"]) for r in result["prepare"]} >= {("byte", 1), ("bpe", 1)}
    assert all(r["mb_per_s"] > 0 for r in result["prepare"])
    assert "M tokens/s from memory-mapped shards" in (tmp_path / "out" / "data_loader.md").read_text()
