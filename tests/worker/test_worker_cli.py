"""The ``dykaf-lab run`` command and the local comparison driver."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from server.csv_export import FISHER_HEADER, METRICS_HEADER, RUNS_FIXED
from server.jobs.spec import JobSpec, TaskSpec
from tests.support.worker import tiny_job, tiny_task
from worker.cli import app
from worker.local import run_job

pytestmark = pytest.mark.usefixtures("data_roots")


def _output(result: object) -> str:
    text = getattr(result, "output", "")
    with contextlib.suppress(ValueError):  # older click: stderr not captured separately
        text += getattr(result, "stderr", "") or ""
    return text


def test_run_writes_csvs_and_plot(tmp_path: Path) -> None:
    job = tiny_job(
        [{"name": "adamw", "hyperparameters": {"lr": 3e-3}}, {"name": "muon"}],
        seeds=[0, 1],
        target_loss=100.0,
        task=tiny_task(steps=4, eval_every=2, log_every=2),
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, _output(result)
    assert "summary (mean ± std over seeds)" in _output(result) and "muon" in _output(result)
    # The server's downloads have the same names and columns (server.csv_export).
    names = sorted(p.name for p in out.glob("*.csv"))
    assert names == ["fisher.csv", "metrics.csv", "runs.csv", "summary.csv"]
    metrics = list(csv.DictReader((out / "metrics.csv").open()))
    assert tuple(metrics[0]) == METRICS_HEADER
    assert {(r["label"], r["seed"]) for r in metrics} == {(o, s) for o in ("adamw", "muon") for s in "01"}
    assert sorted({int(r["step"]) for r in metrics}) == [0, 2, 4]
    assert {r["name"] for r in metrics} >= {"train_loss", "val_loss"}
    assert tuple(next(csv.reader((out / "fisher.csv").open()))) == FISHER_HEADER
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["label"] for r in summary] == ["adamw", "muon"]
    for row in summary:
        assert row["seeds"] == "2" and row["succeeded"] == "2" and row["reached_target"] == "2"
        assert row["partial"] == "0" and row["complete"] == "true"
        assert float(row["final_val_loss_mean"]) > 0 and float(row["final_val_loss_std"]) >= 0
        assert float(row["steps_to_target_mean"]) == 0.0 and float(row["step_time_ms_mean"]) > 0
        assert row["speedup_time"] == "" or float(row["speedup_time"]) > 0  # nan is an empty field
    assert all("nan" not in line for line in (out / "summary.csv").read_text().splitlines())
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert tuple(runs[0])[: len(RUNS_FIXED)] == RUNS_FIXED
    assert [r["status"] for r in runs] == ["succeeded"] * 4 and {r["partial"] for r in runs} == {"false"}
    assert [r["run_id"] for r in runs] == ["0", "1", "2", "3"]
    assert "Winner: " in _output(result)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Diagnostics ran at the last step (default fisher_every): their charts are a file too.
    assert (out / "fisher.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"fisher.png: {out / 'fisher.png'}" in _output(result).replace("\n", "")
    assert "Fisher fidelity: On adamw's gradients (2 layers × 1 report)" in _output(result)
    assert JobSpec.model_validate_json((out / "job.json").read_text()).seeds == [0, 1]
    assert (out / "checkpoints" / "adamw-s0" / "model.pt").is_file()


def test_bad_job_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_job(task=tiny_task(steps=0, schedule="cos"))), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    text = _output(result)
    assert "task.steps: Input should be greater than 0" in text
    assert "task.schedule: Input should be 'cosine', 'linear' or 'constant'" in text
    assert not (tmp_path / "o").exists()
    path.write_text("optimizers: [", encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "not valid YAML" in _output(result)


def test_first_seed_sweep_selects_then_runs_other_seeds(tmp_path: Path) -> None:
    job = JobSpec.model_validate(
        tiny_job(
            [{"name": "adamw", "sweep": {"lr": [1e-5, 1e-2]}}],
            seeds=[0, 1],
            sweep_selection="first_seed",
            task=tiny_task(steps=6, eval_every=6, log_every=6),
        )
    )
    outcome = run_job(job, tmp_path / "out", show_progress=False)
    keys = [r.spec.run_key for r in outcome.runs]
    assert keys == ["adamw[lr=1e-05]-s0", "adamw[lr=0.01]-s0", "adamw[lr=0.01]-s1"]
    assert outcome.selected == {"adamw": "adamw[lr=0.01]"}
    chosen = [row for row in outcome.summary if row["selected"]]
    assert [row["label"] for row in chosen] == ["adamw[lr=0.01]"] and chosen[0]["seeds"] == 2


def test_example_job_file_is_valid() -> None:
    data = yaml.safe_load((Path(__file__).parents[2] / "examples" / "quick.yaml").read_text())
    job = JobSpec.model_validate(data)
    assert job.task.corpus.name == "pydoc" and job.run_count() >= 4


def test_benchmark_job_is_the_default_task() -> None:
    """bench/default_task.yaml measures "the default settings": it must not drift from them."""
    data = yaml.safe_load((Path(__file__).parents[2] / "bench" / "default_task.yaml").read_text())
    job = JobSpec.model_validate(data)
    assert job.task == TaskSpec() and [o.name for o in job.optimizers] == ["adamw", "soap", "dykaf"]
    assert all(not o.hyperparameters for o in job.optimizers)


def test_summary_table_stars_selected_sweep_points_only_when_there_was_a_sweep() -> None:
    from rich.console import Console

    from server.summary import RunOutcome, summarize_outcomes
    from worker.cli import summary_table

    def outcome(label: str, group: str, loss: float) -> RunOutcome:
        return RunOutcome(label, group, group, {}, "succeeded", {"final_val_loss": loss})

    def text(outcomes: list[RunOutcome], selected: dict[str, str] | None) -> str:
        console = Console(width=200, record=True)
        console.print(summary_table(summarize_outcomes(outcomes, selected, has_target=False), False))
        return console.export_text()

    plain = text([outcome("adamw", "adamw", 3.0), outcome("dykaf", "dykaf", 2.9)], None)
    assert "adamw" in plain and "*" not in plain
    assert "3.000" in plain and "±" not in plain.split("\n", 1)[1]  # one seed: no spread shown
    swept = [outcome("adamw[lr=0.001]", "adamw", 3.0), outcome("adamw[lr=0.01]", "adamw", 2.8)]
    marked = text(swept, {"adamw": "adamw[lr=0.01]"})
    assert "adamw[lr=0.01] *" in marked and "adamw[lr=0.001] *" not in marked


def test_status_says_how_far_a_job_got() -> None:
    from worker.cli_service import progress_text

    stopped = {"fraction": 1141 / 10000, "steps_done": 1141, "steps_total": 10000}
    assert progress_text(stopped, "cancelled") == "stopped at 11% (1,141/10,000 steps)"
    assert progress_text(stopped, "running") == "11% (1,141/10,000 steps)"
    done = {"fraction": 1.0, "steps_done": 24, "steps_total": 24}
    assert progress_text(done, "succeeded") == "100% (24/24 steps)"


def test_runs_csv_writes_counts_as_integers_and_a_missing_best_step_as_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that failed before its first evaluation has no best step: an empty cell, not ``-1.0``;
    step and parameter counts read ``4``, not ``4.0``."""
    from worker.training import runner

    real_evaluate = runner._Run.evaluate

    def evaluate(self: runner._Run) -> float:
        if self.spec.optimizer == "muon":
            raise RuntimeError("evaluation broke")
        return real_evaluate(self)

    monkeypatch.setattr(runner._Run, "evaluate", evaluate)
    job = JobSpec.model_validate(
        tiny_job(
            [{"name": "adamw", "hyperparameters": {"lr": 3e-3}}, {"name": "muon"}],
            task=tiny_task(steps=4, eval_every=2, log_every=2, fisher_every=0),
        )
    )
    run_job(job, tmp_path / "out", show_progress=False, checkpoints=False)
    runs = {r["optimizer"]: r for r in csv.DictReader((tmp_path / "out" / "runs.csv").open())}
    assert runs["muon"]["status"] == "failed"
    assert runs["muon"]["best_val_step"] == "" and runs["muon"]["final_step"] == "0"
    assert runs["adamw"]["final_step"] == "4" and runs["adamw"]["best_val_step"] in {"2", "4"}
    assert runs["adamw"]["parameters"].isdigit() and int(runs["adamw"]["parameters"]) > 0
    assert "." in runs["adamw"]["final_val_loss"]  # measurements stay floats
