"""``server.summary``: the one place a job's summary, winner and Fisher verdict are computed (the
dashboard, the CLI and ``dykaf-lab run`` render it). Checked against sums written out here."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from server.summary import (
    RunOutcome,
    best_by_column,
    fisher_gaps,
    fisher_means,
    job_summary,
    pick_winner,
    summarize_outcomes,
    summary_csv_rows,
)


def run(label: str, status: str, group: str | None = None, **summary: float) -> RunOutcome:
    return RunOutcome(label, group or label, label.split("[")[0], {}, status, summary or None)


def test_means_are_over_finished_runs_with_speedups_and_shares() -> None:
    """The numbers the dashboard's summary table used to compute in stats.js, now here."""
    runs = [
        run("adamw", "succeeded", final_val_loss=3.0, best_val_loss=2.9, steps_to_target=100,
            time_to_target_s=10, step_time_ms=10, optimizer_ms=2, peak_memory_mb=100, tokens_per_s=1000),
        run("adamw", "succeeded", final_val_loss=3.2, best_val_loss=3.1, steps_to_target=120,
            time_to_target_s=12, step_time_ms=12, optimizer_ms=2, peak_memory_mb=100, tokens_per_s=900,
            fisher_overhead=0.04),
        run("dykaf", "succeeded", final_val_loss=2.8, best_val_loss=2.7, steps_to_target=50,
            time_to_target_s=8, step_time_ms=16, optimizer_ms=8, peak_memory_mb=140, tokens_per_s=700,
            fisher_overhead=0.02),
        run("dykaf", "diverged", final_val_loss=9.0, step_time_ms=1.0),  # stopped early: not averaged
        run("dykaf", "running"),
    ]  # fmt: skip
    adamw, dykaf = summarize_outcomes(runs, has_target=True)
    assert adamw["final_val_loss_n"] == 2 and math.isclose(adamw["final_val_loss_mean"], 3.1)
    assert math.isclose(adamw["final_val_loss_std"], math.sqrt(0.02))
    assert adamw["baseline"] and math.isclose(adamw["speedup_steps"], 1.0)
    assert math.isclose(dykaf["speedup_steps"], 110 / 50) and math.isclose(dykaf["speedup_time"], 11 / 8)
    assert (dykaf["seeds"], dykaf["succeeded"], dykaf["partial"], dykaf["diverged"], dykaf["pending"]) == (
        3,
        1,
        1,
        1,
        1,
    )
    assert dykaf["final_val_loss_mean"] == 2.8 and dykaf["step_time_ms_mean"] == 16.0
    assert math.isclose(dykaf["optimizer_share_mean"], 0.5)
    assert math.isclose(dykaf["fisher_overhead_mean"], 0.02) and math.isclose(
        adamw["fisher_overhead_mean"], 0.04
    )
    assert math.isclose(adamw["optimizer_share_mean"], (0.2 + 2 / 12) / 2)

    best = best_by_column([adamw, dykaf], has_target=True)
    assert best["fisher_overhead"] == []  # the probes' cost is not the optimizer's: never "best"
    assert best["final_val_loss"] == ["dykaf"] and best["speedup_steps"] == ["dykaf"]
    assert (
        best["step_time_ms"] == ["adamw"]
        and best["tokens_per_s"] == ["adamw"]
        and best["diverged"] == ["adamw"]
    )
    assert "steps_to_target" not in best_by_column([adamw, dykaf], has_target=False)


def test_a_cancelled_job_does_not_look_complete() -> None:
    """The issue's case: adamw "2/2 runs" from one run stopped at 23 % and one that never started."""
    runs = [
        RunOutcome("adamw", "adamw", "adamw", {}, "cancelled", {"final_val_loss": 6.1}, 1141, 5000),
        RunOutcome("adamw", "adamw", "adamw", {}, "cancelled", None, 0, 5000),
    ]
    result = job_summary(runs)
    (row,) = result["rows"]
    assert (row["succeeded"], row["partial"], row["complete"]) == (0, 2, False)
    assert math.isnan(row["final_val_loss_mean"]) and row["final_val_loss_n"] == 0
    assert result["winner"] is None and result["winner_text"] is None
    header, cells = summary_csv_rows(result["rows"])
    assert cells[0][header.index("final_val_loss_mean")] == ""  # nan: an empty field
    assert cells[0][header.index("complete")] == "false"


def test_winner_rules() -> None:
    finished = [
        run("adamw", "succeeded", final_val_loss=3.0),
        run("dykaf", "succeeded", final_val_loss=2.9),
        run("muon", "diverged"),
    ]
    winner = pick_winner(summarize_outcomes(finished))
    assert winner is not None and (winner["label"], winner["runner_up"]) == ("dykaf", "adamw")
    assert winner["margin"] == pytest.approx(0.1)
    # A failed or cancelled contestant, or one still running: no winner yet.
    for status in ("failed", "cancelled", "running", "queued"):
        assert pick_winner(summarize_outcomes([*finished[:2], run("muon", status)])) is None
    # A configuration with a diverged seed loses even with a better mean of the others.
    mixed = [*finished[:2], run("soap", "succeeded", final_val_loss=1.0), run("soap", "diverged")]
    assert pick_winner(summarize_outcomes(mixed))["label"] == "dykaf"
    # Sweeps on a server: each group's point with the most seeds and best score is the one compared.
    swept = [
        run("adamw[lr=0.1]", "succeeded", group="adamw", final_val_loss=2.0),  # stage one only
        run("adamw[lr=0.01]", "succeeded", group="adamw", final_val_loss=2.5),
        run("adamw[lr=0.01]", "succeeded", group="adamw", final_val_loss=2.7),
        run("dykaf", "succeeded", final_val_loss=2.55),
        run("dykaf", "succeeded", final_val_loss=2.75),
    ]
    result = job_summary(swept)
    assert [r["label"] for r in result["rows"] if r["selected"]] == ["adamw[lr=0.01]", "dykaf"]
    assert result["winner"]["label"] == "adamw[lr=0.01]"


def test_fisher_gaps_against_a_sum_written_out() -> None:
    """Gaps above the floor by method (what the dashboard's verdict and streams table show)."""
    rng = random.Random(3)
    methods = ["optimal", "own", "dykaf", "dykaf_seq", "soap_shampoo"]
    rows: dict[str, list[tuple[Any, ...]]] = {"dykaf": [], "adamw": []}
    for label in rows:
        for _seed in (0, 1):
            for layer in ("a.weight", "b.weight"):
                for method in methods:
                    steps = [250, 500] if (layer, method) != ("b.weight", "own") else [250]
                    for step in steps:
                        value = rng.uniform(0.5, 0.6) if method == "optimal" else rng.uniform(0.6, 0.9)
                        rows[label].append((step, layer, method, "kron_rel_err", value))
    got = fisher_gaps(fisher_means(rows), "dykaf")
    mean: dict[tuple[str, int, str], float] = {}
    for step, layer, method, _, value in rows["dykaf"]:
        mean[(layer, step, method)] = mean.get((layer, step, method), 0.0) + value / 2  # two seeds
    points = {(layer, step) for layer, step, _ in mean}
    gaps = {
        m: [mean[(*p, m)] - mean[(*p, "optimal")] for p in points if (*p, m) in mean] for m in methods[1:]
    }
    assert [m for m, _ in got.gaps] == methods[1:]
    for method, gap in got.gaps:
        assert gap == pytest.approx(sum(gaps[method]) / len(gaps[method]))
    assert len(gaps["own"]) == 3  # "own" is missing at one (layer, report)
    assert (got.layers, got.reports) == (2, 2)
    assert got.closed == pytest.approx(1 - sum(gaps["dykaf"]) / sum(gaps["soap_shampoo"]))
    assert got.verdict().startswith("On dykaf's gradients (2 layers × 2 reports), mean kron_rel_err above")
