"""``fisher.png`` of a local run: seed means, which gradient stream is shown, dot plot vs curves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from worker.fisher_plot import fisher_means, fisher_verdict, plot_fisher, stream_label

LAYER = "blocks.0.attn.qkv.weight"


def _rows(step: int, shift: float) -> list[tuple[int, str, str, str, float]]:
    values = {"optimal": 0.50, "own": 0.52, "dykaf": 0.52, "soap_shampoo": 0.61}
    rows = [(step, LAYER, m, "kron_rel_err", v + shift) for m, v in values.items()]
    rows += [(step, LAYER, m, "diag_mass", 0.9 - v + shift) for m, v in values.items()]
    return [*rows, (step, LAYER, "own", "precond_rel_err", 0.7 + shift)]


def test_means_are_over_seeds_and_skip_non_finite_values() -> None:
    seed0 = _rows(10, 0.0)
    seed1 = [*_rows(10, 0.02), (10, LAYER, "dykaf_seq", "kron_rel_err", math.nan)]
    means = fisher_means({"DyKAF fast": seed0 + seed1, "adamw": _rows(10, 0.1)})
    assert means[("DyKAF fast", LAYER, "kron_rel_err", "soap_shampoo")] == {10: pytest.approx(0.62)}
    assert means[("adamw", LAYER, "kron_rel_err", "optimal")] == {10: pytest.approx(0.60)}
    assert ("DyKAF fast", LAYER, "kron_rel_err", "dykaf_seq") not in means


def test_the_method_panels_show_a_dykaf_stream_when_there_is_one() -> None:
    optimizers = {"adamw": "adamw", "soap": "soap", "mine": "dykaf-seq"}
    assert stream_label(["adamw", "soap", "mine"], optimizers) == "mine"
    assert stream_label(["adamw", "soap"], optimizers) == "adamw"


def test_one_report_is_a_dot_plot_and_several_are_curves(tmp_path: Path) -> None:
    colors = {"dykaf": "C0", "soap": "C1"}
    one = fisher_means({"dykaf": _rows(250, 0.0), "soap": _rows(250, 0.05)})
    fig = plot_fisher(one, "dykaf", colors, tmp_path / "one.png", "t")
    assert fig is not None and (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"
    kron, precond, diag = fig.axes
    # Methods down the y axis in the dashboard's order, each value at its x, the floor as a line.
    ticks = [t.get_text() for t in kron.get_yticklabels()]
    assert ticks == ["optimal (floor)", "own", "DyKAF", "SOAP/Shampoo"]
    dots = {line.get_ydata()[0]: line.get_xdata()[0] for line in kron.lines if line.get_linestyle() == "None"}
    assert dots == pytest.approx({0: 0.50, 1: 0.52, 2: 0.52, 3: 0.61})
    (floor,) = [line for line in kron.lines if line.get_linestyle() == "--"]
    assert list(floor.get_xdata()) == [pytest.approx(0.50)] * 2
    assert [t.get_text() for t in precond.get_yticklabels()] == ["dykaf", "soap"]
    assert kron.get_xlabel() == "at step 250" and "gradients of dykaf" in diag.get_title()

    two = fisher_means({"dykaf": _rows(250, 0.0) + _rows(500, -0.1)})
    fig = plot_fisher(two, "dykaf", colors, tmp_path / "two.png", "t")
    assert fig is not None
    kron = fig.axes[0]
    assert kron.get_xlabel() == "step"
    assert [list(line.get_xdata()) for line in kron.lines] == [[250, 500]] * 4
    legend = [text.get_text() for text in kron.get_legend().get_texts()]
    assert legend == ["optimal (floor)", "own", "DyKAF", "SOAP/Shampoo"]


def test_no_rows_no_figure(tmp_path: Path) -> None:
    assert plot_fisher({}, "x", {}, tmp_path / "none.png", "t") is None
    assert not (tmp_path / "none.png").exists()


def test_verdict_matches_the_dashboard_sentence() -> None:
    # The same values as the dashboard's browser test, so both sides word it identically.
    values = {"optimal": 0.50, "dykaf": 0.52, "dykaf_seq": 0.53, "soap_shampoo": 0.61}
    rows = [(10, LAYER, m, "kron_rel_err", v) for m, v in values.items()]
    assert fisher_verdict(fisher_means({"dykaf": rows}), "dykaf") == (
        "On dykaf's gradients (1 layer × 1 report), mean kron_rel_err above the floor: "
        "DyKAF 0.0200 · DyKAF-seq 0.0300 · SOAP/Shampoo 0.1100. "
        "DyKAF's factors close 82% of SOAP/Shampoo's gap."
    )
    two = fisher_means({"dykaf": _rows(250, 0.0) + _rows(500, 0.01)})
    text = fisher_verdict(two, "dykaf")
    assert text is not None and text.startswith("On dykaf's gradients (1 layer × 2 reports)")
    assert "own 0.0200 · DyKAF 0.0200 · SOAP/Shampoo 0.1100." in text
    assert fisher_verdict(two, "adamw") is None  # no rows on that stream
    worse = [(10, LAYER, m, "kron_rel_err", v) for m, v in {**values, "dykaf": 0.64}.items()]
    assert fisher_verdict(fisher_means({"dykaf": worse}), "dykaf").endswith(  # type: ignore[union-attr]
        "DyKAF's factors sit 27% further from the floor than SOAP/Shampoo's."
    )
    floor_only = fisher_means({"dykaf": [(10, LAYER, "optimal", "kron_rel_err", 0.5)]})
    assert fisher_verdict(floor_only, "dykaf") is None  # nothing to compare with the floor


SHIFTS = (("dykaf", 0.0), ("adamw", 0.1))


def test_bench_script_prints_a_verdict_per_configuration(tmp_path: Path) -> None:
    import csv
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    path = tmp_path / "fisher.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run_key", "label", "step", "layer", "method", "metric", "value"])
        for label, shift in SHIFTS:
            for row in _rows(250, shift):
                writer.writerow([f"{label}-s0", label, *row])
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "fisher_verdict.py"), str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == [f"- {fisher_verdict(fisher_means({lb: _rows(250, s)}), lb)}" for lb, s in SHIFTS]
    with path.open("a", newline="", encoding="utf-8") as handle:
        for row in _rows(500, 0.05):
            csv.writer(handle).writerow(["dykaf-s0", "dykaf", *row])
    script = str(root / "bench" / "fisher_verdict.py")
    by_step = subprocess.run(
        [sys.executable, script, str(path), "--by-step", "--labels", "dykaf"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert by_step == [
        f"- step {step}: {fisher_verdict(fisher_means({'dykaf': _rows(step, shift)}), 'dykaf')}"
        for step, shift in ((250, 0.0), (500, 0.05))
    ]


def _value_axes(fig: object) -> list[tuple[object, str]]:
    """The value axis of each drawn panel: x for a dot plot, y for curves."""
    out = []
    for ax in fig.axes:  # type: ignore[attr-defined]
        if ax.lines:
            out.append((ax, "x" if ax.get_xlabel().startswith("at step") else "y"))
    return out


@pytest.mark.parametrize("steps", [(250,), (250, 500)])
def test_close_values_are_shown_plainly_with_their_spread(tmp_path: Path, steps: tuple[int, ...]) -> None:
    """Methods 1.5e-5 apart (as on a real run's diag_mass): no offset label ("1e−5+8.614e−1"), an
    axis not narrower than MIN_RELATIVE_SPAN of the value, and the spread written in the panel."""
    from worker import fisher_plot

    rows = []
    for step in steps:
        for i, method in enumerate(("optimal", "own", "dykaf", "soap_shampoo")):
            for metric in ("kron_rel_err", "diag_mass"):
                rows.append((step, LAYER, method, metric, 0.8614 + 0.5e-5 * i))
    fig = plot_fisher(fisher_means({"dykaf": rows}), "dykaf", {"dykaf": "C0"}, tmp_path / "f.png", "t")
    assert fig is not None and (tmp_path / "f.png").is_file()
    panels = _value_axes(fig)
    assert len(panels) == 2
    for ax, axis in panels:
        value_axis = getattr(ax, f"{axis}axis")
        formatter = value_axis.get_major_formatter()
        assert formatter.get_useOffset() is False and formatter.get_offset() == ""
        low, high = ax.get_xlim() if axis == "x" else ax.get_ylim()
        assert high - low >= fisher_plot.MIN_RELATIVE_SPAN * 0.8614 and low < 0.8614 < 0.86142 < high
        labels = [t.get_text() for t in value_axis.get_ticklabels() if t.get_text()]
        assert labels and all("e" not in label for label in labels), labels
        notes = [t.get_text() for t in ax.texts]
        assert notes == ["values within 1.5e-05 of each other"]


def test_spread_out_values_keep_their_fitted_axis(tmp_path: Path) -> None:
    one = fisher_means({"dykaf": _rows(250, 0.0)})
    fig = plot_fisher(one, "dykaf", {"dykaf": "C0"}, tmp_path / "one.png", "t")
    kron = fig.axes[0]  # type: ignore[union-attr]
    low, high = kron.get_xlim()
    assert high - low < 0.2 and len(kron.texts) == 0  # 0.50..0.61: fitted, nothing to annotate
