"""bench/distributed_step.py end to end in its quick mode: 2 Gloo ranks step both modes and the
table reports each optimizer's times, the shard/replicate ratio and each rank's halved state."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_both_modes_for_each_optimizer(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "distributed_step.py"),
            "--quick",
            "--optimizers",
            "adamw",
            "dykaf",
            "--json",
            str(tmp_path / "ranks.json"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {
        line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines() if line.startswith("| ")
    }
    assert set(rows) >= {"optimizer", "adamw", "dykaf"} and "soap" not in rows
    assert re.search(r"\*\*\d+\.\d\d\*\*", rows["dykaf"]), rows["dykaf"]  # the ratio, in bold
    ranks = json.loads((tmp_path / "ranks.json").read_text())["ranks"]
    assert len(ranks) == 2
    for rank in ranks:
        dykaf = rank["dykaf"]
        assert dykaf["shard_s"] > 0 and dykaf["replicate_s"] > 0 and 0 < dykaf["owned_s"] <= dykaf["shard_s"]
        # Each rank keeps state for its own parameters only: well under the replicated state.
        assert dykaf["shard_state"] < 0.8 * dykaf["replicate_state"]
    assert ranks[0]["dykaf"]["owned"] + ranks[1]["dykaf"]["owned"] == 2 + 6 * 2 + 1  # every parameter once
