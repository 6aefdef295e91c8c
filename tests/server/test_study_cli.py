"""``dykaf-lab study``: a bad study file is refused locally with the field named (exit 2, nothing
sent); ``study show``'s tables carry the winner, the loss over seeds and the speed-ups with bounds."""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console
from typer.testing import CliRunner

from server.studies.report import RunRecord, study_report
from server.studies.spec import parse_study
from worker.cli import app
from worker.cli_study import study_tables

SPEC = {
    "name": "cli",
    "task": {"steps": 10, "warmup_steps": 2, "context": 16, "batch_size": 4},
    "scales": [{"name": "s1"}],
    "optimizers": [
        {"name": "adamw", "sweep": {"lr": [0.001, 0.003]}},
        {"name": "muon", "sweep": {"lr": [0.01, 0.03]}},
    ],
    "seeds": [0, 1],
    "budgets": [2, 4],
}


def test_bad_study_file_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "baseline": "soap"}))
    result = CliRunner().invoke(app, ["study", "submit", str(path), "--server", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "baseline: 'soap' is not among the optimizers" in result.output


def record(group: str, lr: float, seed: int, loss: float, steps: int = 10) -> RunRecord:
    return RunRecord(
        group=group,
        sweep_point={"lr": lr},
        seed=seed,
        status="succeeded",
        tokens=steps * 64.0,
        summary={"final_val_loss": loss, "train_time_s": steps / 10, "parameters": 2e6},
    )


def test_show_tables_carry_winner_loss_and_bounded_speedups() -> None:
    spec = parse_study(SPEC)
    runs = [
        record("adamw", 0.001, 0, 3.0),
        record("adamw", 0.003, 0, 2.9),
        record("adamw", 0.003, 1, 2.9),
        record("adamw@2x", 0.003, 0, 2.8, 20),
        record("adamw@2x", 0.003, 1, 2.8, 20),
        record("adamw@4x", 0.003, 0, 2.7, 40),
        record("adamw@4x", 0.003, 1, 2.7, 40),
        record("muon", 0.01, 0, 2.5),  # better than the baseline at 4x: a bound, not extrapolated
        record("muon", 0.03, 0, 2.6),
        record("muon", 0.01, 1, 2.6),
    ]
    console = Console(record=True, width=200)
    for table in study_tables(study_report(spec, [runs])):
        console.print(table)
    text = console.export_text()
    assert "s1" in text and "2.00 M params" in text
    adamw = next(line for line in text.splitlines() if line.startswith("│ adamw"))
    assert "lr=0.003" in adamw and "2.900 ± 0.000" in adamw and "1× ± 0" in adamw
    muon = next(line for line in text.splitlines() if line.startswith("│ muon"))
    assert "(edge)" in muon and "lr=0.01" in muon and "2.550 ± 0.071" in muon and "> 4×" in muon


def test_submit_and_show_against_a_real_server(tmp_path: Path) -> None:
    """The CLI against uvicorn on SQLite (no worker: the study stays queued, which show reports)."""
    import os
    import subprocess
    import sys

    from server.core.config import Settings
    from server.db import migrate
    from tests.support.browser import ServerProcess, create_api_key
    from tests.support.services import FAST

    settings = Settings(data_dir=tmp_path / "lab", **FAST)
    migrate.upgrade(settings.database_url)
    key = create_api_key(settings.database_url, "cli")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "device": "cpu", "scales": [{"name": "s1"}, {"name": "s2"}]}))
    server = ServerProcess(settings, tmp_path / "server.log").start()
    try:
        env = {**os.environ, "DYKAF_SERVER": server.url, "DYKAF_API_KEY": key, "COLUMNS": "160"}

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-c", "from worker.cli import app; app()", *args]
            return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)

        submitted = cli("study", "submit", str(path))
        assert submitted.returncode == 0, submitted.stderr
        # per scale: 4 sweep runs + 2 confirmations + 2 budgets x 2 seeds = 10
        assert "study 1 (cli): 20 runs planned (s1: job 1, s2: job 2)" in submitted.stdout
        shown = cli("study", "show", "1")
        assert shown.returncode == 0, shown.stderr
        assert "study 1 (cli): queued" in shown.stdout
        assert "s1 (queued)" in shown.stdout and "s2 (queued)" in shown.stdout
        assert shown.stdout.count("+2 pending") == 4, shown.stdout  # 2 scales x 2 optimizers
        missing = cli("study", "show", "7")
        assert missing.returncode == 1 and "study 7 not found" in missing.stdout + missing.stderr
    finally:
        server.stop()


def test_the_example_study_is_valid_and_fair() -> None:
    study = parse_study(yaml.safe_load((Path(__file__).parents[2] / "examples" / "study.yaml").read_text()))
    assert study.equal_budgets() and study.baseline == "adamw"
    assert [s.task.d_model for s in study.scales] == [64, 128]
    assert study.run_count() == 2 * (16 + 4 + 4)  # sweeps, confirmations, baseline at 2x and 4x
