"""In a finished local run, how far above the floor does each method's factors sit on each
configuration's gradients, overall or report by report? Prints the product's verdict line
(``worker.fisher_plot.fisher_verdict``: the share of SOAP/Shampoo's gap DyKAF's factors close) from
the run's ``fisher.csv``, for the configurations asked for, or per report step with ``--by-step``.

    python -m bench.fisher_verdict bench/results/convergence/fisher.csv \
        --labels "adamw[lr=0.001]" "soap[lr=0.01]" "dykaf[lr=0.01]" "muon[lr=0.02]"
    dykaf-lab run bench/fisher_over_time.yaml --out runs/fisher-over-time --threads 1
    python -m bench.fisher_verdict runs/fisher-over-time/fisher.csv --by-step
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from worker.fisher_plot import fisher_means, fisher_verdict


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", type=Path, help="fisher.csv written by dykaf-lab run")
    parser.add_argument("--labels", nargs="*", help="configurations to report (default: all, in file order)")
    parser.add_argument("--by-step", action="store_true", help="one verdict per report step, not one overall")
    args = parser.parse_args()
    rows: dict[str, list[tuple[int, str, str, str, float]]] = defaultdict(list)
    with args.csv.open(newline="", encoding="utf-8") as handle:
        for r in csv.DictReader(handle):
            row = (int(r["step"]), r["layer"], r["method"], r["metric"], float(r["value"]))
            rows[r["label"]].append(row)
    labels = args.labels or list(rows)
    means = fisher_means({label: rows[label] for label in labels})
    for label in labels:
        if not args.by_step:
            print(f"- {fisher_verdict(means, label) or f'{label}: no kron_rel_err rows'}")
            continue
        for step in sorted({step for (lb, *_), values in means.items() if lb == label for step in values}):
            at_step = {key: {step: v[step]} for key, v in means.items() if step in v}
            print(f"- step {step}: {fisher_verdict(at_step, label)}")


if __name__ == "__main__":
    main()
