"""``fisher.png`` of a local comparison: the dashboard's Fisher-fidelity charts as one figure.

``dykaf-lab run`` has no dashboard, and ``fisher.csv`` alone does not show *why* an optimizer wins.
The figure has one row per probed layer and the dashboard's three panels:

* ``kron_rel_err`` of every method (the optimal Kronecker product, i.e. the floor; the run's own
  factors; the shadow estimators) on one configuration's gradient stream — a DyKAF one when the
  job has one, since its own factors are what the question is about;
* ``precond_rel_err`` of each configuration's own preconditioner (DyKAF and SOAP expose one);
* ``diag_mass`` of every method on the same gradient stream as the first panel.

Values are means over seeds. A short run reports once, at its last step; a line chart would then be
one dot per method on a one-step axis, so such a panel is a dot plot (methods down, value across,
the floor as a dashed line) instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from server import palette
from server.summary import FisherMeans, fisher_means, fisher_verdict, stream_label

__all__ = ["fisher_means", "fisher_verdict", "plot_fisher", "rows_from_series", "stream_label"]

# Display names, colours and line styles of the methods: one palette with the dashboard's.
METHOD_STYLE = palette.METHOD_STYLE
PANELS = ("kron_rel_err", "precond_rel_err", "diag_mass")

# (label, layer, metric, method) -> {step: mean over seeds}; the means and the verdict sentence are
# the server's (``server.summary``), so fisher.png, the API and the dashboard say the same thing.
Means = FisherMeans


def rows_from_series(series: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, str, str, str, float]]]:
    """Per label, the rows of the REST API's Fisher series (``GET /jobs/{id}/fisher``)."""
    rows: dict[str, list[tuple[int, str, str, str, float]]] = defaultdict(list)
    for s in series:
        for step, value in zip(s["step"], s["value"], strict=True):
            rows[s["label"]].append((step, s["layer"], s["method"], s["metric"], value))
    return rows


def _series(means: Means, label: str, layer: str, metric: str, key: str) -> dict[str, dict[int, float]]:
    """Per method (``key="method"``) or per label (``key="label"``, own only): ``{step: value}``."""
    if key == "method":
        found = {m: v for (lb, ly, mt, m), v in means.items() if (lb, ly, mt) == (label, layer, metric)}
        return {m: found[m] for m in METHOD_STYLE if m in found}
    return {lb: v for (lb, ly, mt, m), v in means.items() if (ly, mt, m) == (layer, metric, "own")}


# Narrowest value axis, as a fraction of the largest value shown. Methods often agree to 1e-5 (a
# DyKAF run's own factors and its shadow's, say); an axis fitted to such a spread would draw that
# difference across the whole panel (with an offset label such as "1e-5+8.614e-1") as if it
# mattered. The spread itself is written in the panel instead.
MIN_RELATIVE_SPAN = 0.05


def _show_values_plainly(ax: Any, axis: str, values: Sequence[float]) -> None:
    """Plain tick labels (no offset, no scientific notation) on ``axis`` ("x" or "y") and a range
    at least ``MIN_RELATIVE_SPAN`` of the largest value wide; a spread narrower than that is
    annotated in the panel."""
    from matplotlib.ticker import ScalarFormatter

    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    getattr(ax, f"{axis}axis").set_major_formatter(formatter)
    if not values:
        return
    low, high = min(values), max(values)
    narrowest = MIN_RELATIVE_SPAN * max(abs(low), abs(high))
    if high - low >= narrowest:
        return
    centre, half = (low + high) / 2, 0.6 * narrowest
    (ax.set_xlim if axis == "x" else ax.set_ylim)(centre - half, centre + half)
    ax.text(
        0.99,
        0.02,
        f"values within {high - low:.2g} of each other",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=7,
        color="#555555",
    )


def _draw(ax: Any, series: dict[str, dict[int, float]], styles: dict[str, tuple[str, str, str]]) -> None:
    from matplotlib.ticker import MaxNLocator

    steps = {step for values in series.values() for step in values}
    shown = [value for values in series.values() for value in values.values()]
    if len(steps) == 1:  # one report: dot plot, top-down in legend order, the floor as a line
        names = list(series)
        for row, name in enumerate(names):
            value = next(iter(series[name].values()))
            ax.plot([value], [row], "D" if name == "optimal" else "o", color=styles[name][1], markersize=7)
            if name == "optimal":
                ax.axvline(value, color=styles[name][1], linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(names)), [styles[n][0] for n in names])
        ax.xaxis.set_major_locator(MaxNLocator(5))  # close values: keep the tick labels apart
        ax.invert_yaxis()
        ax.set_xlabel(f"at step {next(iter(steps))}")
        _show_values_plainly(ax, "x", shown)
        return
    for name, values in series.items():
        label, color, dash = styles[name]
        ax.plot(list(values), list(values.values()), dash, color=color, label=label, marker=".")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    _show_values_plainly(ax, "y", shown)


def plot_fisher(
    means: Means, label: str, colors: dict[str, str], path: Path, title: str, verdict: str | None = None
) -> Any | None:
    """Draw the figure into ``path`` (``verdict``, the ``fisher_verdict`` line, under the title);
    returns the matplotlib figure (closed), or None without rows."""
    layers = sorted({layer for (_, layer, _, _) in means})
    if not layers:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(layers), 3, figsize=(16, 3.8 * len(layers)), squeeze=False)
    label_styles = {lb: (lb, color, "-") for lb, color in colors.items()}
    for row, layer in enumerate(layers):
        for col, metric in enumerate(PANELS):
            ax = axes[row][col]
            per_label = metric == "precond_rel_err"
            series = _series(means, label, layer, metric, "label" if per_label else "method")
            if series:
                _draw(ax, series, label_styles if per_label else METHOD_STYLE)
            else:
                note = "no optimizer here exposes its preconditioner" if per_label else "no values"
                ax.text(0.5, 0.5, note, ha="center", transform=ax.transAxes)
            whose = "each optimizer's own" if per_label else f"gradients of {label}"
            ax.set_title(f"{layer}\n{metric} — {whose}", fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(title if verdict is None else f"{title}\n{verdict}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
