"""One colour per optimizer (``server/palette.py``): the generated dashboard constants, the rule for
labels, and the PNGs of ``dykaf-lab run``. The dashboard's side is in tests/browser/test_colors.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.colors import to_hex

from dykaf.baselines.registry import OPTIMIZER_NAMES
from server import palette
from server.jobs.spec import JobSpec
from tests.support.worker import tiny_job, tiny_task
from worker import fisher_plot
from worker.local import _label_colors, plot_curves, plot_job_fisher, run_job

pytestmark = pytest.mark.usefixtures("data_roots")


def test_the_dashboard_constants_are_generated_from_the_python_palette() -> None:
    assert palette.JS_PATH.read_text(encoding="utf-8") == palette.javascript(), (
        "web/static/js/palette.js is stale: run `python -m server.palette`"
    )


def test_every_optimizer_has_its_own_colour_and_shadows_share_their_optimizers() -> None:
    assert set(palette.OPTIMIZER_COLORS) == set(OPTIMIZER_NAMES)
    colours = list(palette.OPTIMIZER_COLORS.values())
    assert len(set(colours)) == len(colours)
    reserved = {palette.METHOD_STYLE["optimal"][1], palette.METHOD_STYLE["own"][1]}
    assert not reserved & {*colours, *palette.SPARE_COLORS}
    assert palette.METHOD_STYLE["dykaf"][1] == palette.OPTIMIZER_COLORS["dykaf"]
    assert palette.METHOD_STYLE["dykaf_seq"][1] == palette.OPTIMIZER_COLORS["dykaf-seq"]
    assert palette.METHOD_STYLE["soap_shampoo"][1] == palette.OPTIMIZER_COLORS["soap"]


def test_a_label_keeps_its_optimizers_colour_whatever_the_order() -> None:
    first = palette.label_colors([("adamw", "adamw"), ("DyKAF fast", "dykaf"), ("soap", "soap")])
    second = palette.label_colors([("soap", "soap"), ("DyKAF fast", "dykaf"), ("adamw", "adamw")])
    assert first == second
    assert first == {
        "adamw": palette.OPTIMIZER_COLORS["adamw"],
        "DyKAF fast": palette.OPTIMIZER_COLORS["dykaf"],
        "soap": palette.OPTIMIZER_COLORS["soap"],
    }
    sweep = palette.label_colors(
        [("dykaf[lr=0.01]", "dykaf"), ("dykaf[lr=0.02]", "dykaf"), ("x", "unknown"), ("adamw", "adamw")]
    )
    assert sweep["dykaf[lr=0.01]"] == palette.OPTIMIZER_COLORS["dykaf"]
    assert len(set(sweep.values())) == 4  # a second point of one optimizer gets a colour of its own
    many = palette.label_colors([(f"adamw[{i}]", "adamw") for i in range(40)])
    assert len(many) == 40 and len(set(list(many.values())[:15])) == 15


def test_the_pngs_colour_each_optimizer_as_the_palette_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = JobSpec.model_validate(
        tiny_job(
            [{"name": "adamw", "hyperparameters": {"lr": 3e-3}}, {"name": "soap"}, {"name": "dykaf"}],
            task=tiny_task(steps=4, eval_every=2, log_every=2, fisher_every=4),
        )
    )
    outcome = run_job(job, tmp_path / "out", show_progress=False, checkpoints=False)
    records, selected = outcome.runs, outcome.selected
    expected = {opt: palette.OPTIMIZER_COLORS[opt] for opt in ("adamw", "soap", "dykaf")}
    assert _label_colors(records) == expected

    curves = plot_curves(records, selected, tmp_path / "curves.png", "t")
    for ax in curves.axes:
        drawn = {line.get_label().split(" (n=")[0]: to_hex(line.get_color()) for line in ax.lines}
        assert drawn == {label: colour.lower() for label, colour in expected.items()}

    captured = []
    real = fisher_plot.plot_fisher

    def spy(*args: object, **kwargs: object) -> object:
        captured.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return captured[-1]

    monkeypatch.setattr(fisher_plot, "plot_fisher", spy)
    plot_job_fisher(records, selected, tmp_path / "fisher.png", "t")
    (fig,) = captured
    kron, precond = fig.axes[0], fig.axes[1]
    names = {t.get_text(): i for i, t in enumerate(kron.get_yticklabels())}
    dots = {
        line.get_ydata()[0]: to_hex(line.get_color()) for line in kron.lines if line.get_linestyle() == "None"
    }
    assert dots[names["DyKAF"]] == palette.OPTIMIZER_COLORS["dykaf"].lower()
    assert dots[names["SOAP/Shampoo"]] == palette.OPTIMIZER_COLORS["soap"].lower()
    own = {t.get_text(): i for i, t in enumerate(precond.get_yticklabels())}
    own_dots = {line.get_ydata()[0]: to_hex(line.get_color()) for line in precond.lines}
    for label in own:  # each optimizer's own preconditioner in that optimizer's colour
        assert own_dots[own[label]] == expected[label].lower()
