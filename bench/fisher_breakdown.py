"""Where does a real run's own Fisher-diagnostics time (``fisher_time_s``) go, by kind of work?
(Per-layer and modeled costs of the probes in isolation: ``bench/fisher_cost.py``.)

    python -m bench.fisher_breakdown --out results/              # CUDA when present
    python -m bench.fisher_breakdown --out /tmp/x --dry-run      # CPU, tiny sizes: checks the script
    python -m bench.fisher_breakdown --parts runs --repeat 2 --no-compare --no-larger   # cold vs warm
    python -m bench.fisher_breakdown --parts runs --repeat 2 --no-compare --no-larger --no-warmup

Three parts, each written to ``--out`` as soon as it finishes:

* ``runs``: ``bench/default_task.yaml`` (and, on a GPU, the same three optimizers on a 6-layer,
  d = 384 model) through ``worker.training.runner.execute_run``, each once with diagnostics and once
  without (``fisher_every: 0``). Every ``timed_diagnostics`` call of the runner is recorded with its
  step and kind (observe / submit_report / finished_reports / close), so the product's own
  ``fisher_time_s`` splits into per-step observes, the first observe of each report cycle (shadow
  initialisation and the CUDA-graph capture), report submission and the waits for reports. The
  with/without difference of ``train_time_s`` shows cost that ``fisher_time_s`` cannot see (a
  background report competing with training for the GPU or the interpreter). The runner warms the
  device once per process before a run's clocks start (``worker/training/warmup.py``; its time is
  the ``warm-up`` column); ``--no-warmup`` turns that off, so that pass 1 of ``--repeat 2`` shows
  the process's start-up costs where a run would otherwise pay them.
* ``report``: one report of a probed layer under ``torch.profiler``: the operators it spends its
  time in.
* ``eigh``: ``torch.linalg.eigh`` of the factor sizes a report decomposes, float32 and float64,
  on the device and on the host.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import ROOT
from bench.gpu_check import DRY_RUN_DEFAULT_TASK
from worker.training.measure import synchronize  # torch only: the device's bare Python has it

OPTIMIZERS = ("adamw", "soap", "dykaf")
LARGER_MODEL = {"n_layer": 6, "n_head": 6, "d_model": 384, "context": 256, "batch_size": 32}


def traced_run(task: dict[str, Any], optimizer: str, device: str) -> dict[str, Any]:
    """One run through the worker; returns its summary and every timed diagnostics call."""
    from server.jobs.spec import JobSpec
    from worker.training import runner as runner_module
    from worker.training.runner import execute_run
    from worker.training.sinks import MemorySink

    calls: list[tuple[int, str, float]] = []
    original = runner_module._Run.timed_diagnostics

    def traced(self: Any, work: Any) -> Any:
        result, spent = original(self, work)
        func = work.func if isinstance(work, functools.partial) else work
        calls.append((self.step, getattr(func, "__name__", str(func)), spent))
        return result, spent

    job = JobSpec.model_validate(
        {
            "name": "breakdown",
            "device": device,
            "seeds": [0],
            "task": {"kind": "pretrain", **task},
            "optimizers": [{"name": optimizer}],
        }
    )
    (run,) = job.expand()
    runner_module._Run.timed_diagnostics = traced  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        result = execute_run(run, MemorySink(), device=device)
        wall = time.perf_counter() - started
    finally:
        runner_module._Run.timed_diagnostics = original  # type: ignore[method-assign]
    summary = result.summary
    by_kind: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for _, kind, spent in calls:
        by_kind[kind] += spent
        counts[kind] += 1
    active = [spent for _, kind, spent in calls if kind == "observe"]
    return {
        "status": result.status,
        "reason": result.reason,
        "wall_s": round(wall, 3),
        "train_time_s": summary.get("train_time_s"),
        "step_time_ms": summary.get("step_time_ms"),
        "fisher_time_s": summary.get("fisher_time_s"),
        "fisher_overhead": summary.get("fisher_overhead"),
        "device_warmup_s": summary.get("device_warmup_s"),
        "seconds_by_kind": {k: round(v, 4) for k, v in by_kind.items()},
        "calls_by_kind": dict(counts),
        "observe_median_ms": round(1000 * statistics.median(active), 3) if active else None,
        "largest_calls": [(s, k, round(t * 1000, 2)) for s, k, t in sorted(calls, key=lambda c: -c[2])[:8]],
    }


def runs_part(
    device: str,
    dry_run: bool,
    optimizers: tuple[str, ...] = OPTIMIZERS,
    compare: bool = True,
    larger: bool = True,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Every (task, optimizer) run ``repeat`` times in this process, labelled by pass: with
    ``repeat`` 2 and this part run first, pass 1 holds the process's first use of each library
    (cuSOLVER, kernels loaded lazily) and pass 2 the same runs warm."""
    import yaml

    default = yaml.safe_load((ROOT / "bench" / "default_task.yaml").read_text())["task"]
    default = {k: v for k, v in default.items() if k != "kind"}
    variants: list[tuple[str, dict[str, Any]]] = [("default task", default)]
    if dry_run:
        variants = [("default task (tiny)", DRY_RUN_DEFAULT_TASK)]
    elif device == "cuda" and larger:
        variants.append(("6 x 384 model, 500 steps", {**default, **LARGER_MODEL}))
    rows = []
    passes = [
        (f"{label}, pass {n}" if repeat > 1 else label, task)
        for n in range(1, repeat + 1)
        for label, task in variants
    ]
    for label, task in passes:
        for optimizer in optimizers:
            row: dict[str, Any] = {"task": label, "optimizer": optimizer}
            row["with"] = traced_run(task, optimizer, device)
            if not compare:
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            row["without"] = traced_run({**task, "fisher_every": 0}, optimizer, device)
            with_t, without_t = row["with"]["train_time_s"], row["without"]["train_time_s"]
            if with_t and without_t:
                row["train_time_rise"] = round(with_t / without_t - 1, 4)
            if row["with"]["wall_s"] and row["without"]["wall_s"]:
                row["wall_rise"] = round(row["with"]["wall_s"] / row["without"]["wall_s"] - 1, 4)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def report_part(device: str, dry_run: bool) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    from dykaf.fisher import LayerProbe

    dev = torch.device(device)
    shapes = [(16, 24)] if dry_run else [(128, 384), (384, 1152)]
    out = []
    for rows, cols in shapes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        param = torch.nn.Parameter(torch.zeros(rows, cols, device=dev))
        probe = LayerProbe(param, "bench", window=32, beta=0.95)
        for _ in range(40):
            probe.observe(torch.randn(rows, cols, generator=gen).to(dev))
        probe.report(0)  # warm-up: solver workspaces, cuBLAS handles
        synchronize(dev)
        timings = []
        for _ in range(3):
            began = time.perf_counter()
            probe.report(0)
            synchronize(dev)
            timings.append(time.perf_counter() - began)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            probe.report(0)
            synchronize(dev)
        sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=48)
        cpu_table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=48
        )
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
        syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "aten::_local_scalar_dense")
        entry = {
            "shape": f"{rows}x{cols}",
            "report_ms": round(1000 * statistics.median(timings), 2),
            "kernel_launches": launches,
            "host_syncs": syncs,
            "by_device_time": table,
            "by_host_time": cpu_table,
        }
        print(f"report {rows}x{cols}: {entry['report_ms']} ms, {launches} launches, {syncs} syncs")
        print(table, flush=True)
        out.append(entry)
    return out


def eigh_part(device: str, dry_run: bool) -> list[dict[str, Any]]:
    sizes = [16, 48] if dry_run else [128, 384, 512, 1152, 1536]
    places = [torch.device("cpu")] + ([torch.device("cuda")] if device == "cuda" else [])
    out = []
    for n in sizes:
        base = torch.randn(n, n, dtype=torch.float64)
        sym = base @ base.T / n + torch.eye(n, dtype=torch.float64)
        for place in places:
            for dtype in (torch.float32, torch.float64):
                mat = sym.to(device=place, dtype=dtype)
                torch.linalg.eigh(mat)
                synchronize(place)
                times = []
                for _ in range(5):
                    began = time.perf_counter()
                    torch.linalg.eigh(mat)
                    synchronize(place)
                    times.append(time.perf_counter() - began)
                row = {
                    "n": n,
                    "device": place.type,
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms": round(1000 * statistics.median(times), 3),
                }
                print(row, flush=True)
                out.append(row)
    return out


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1000 * seconds:.0f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as tables: eigh sizes, profiled reports, and each run's diagnostics time by kind."""
    lines = [f"# Fisher diagnostics time by kind — {report['device']} (torch {report['torch']})", ""]
    eighs = report.get("eigh")
    if isinstance(eighs, list):
        lines += [
            "## `torch.linalg.eigh`, ms (median of 5)",
            "",
            "| n | device | float32 | float64 |",
            "|---:|---|---:|---:|",
        ]
        cells: dict[tuple[int, str], dict[str, float]] = defaultdict(dict)
        for row in eighs:
            cells[(row["n"], row["device"])][row["dtype"]] = row["ms"]
        lines += [
            f"| {n} | {dev} | {v.get('float32', '')} | {v.get('float64', '')} |"
            for (n, dev), v in cells.items()
        ]
        lines.append("")
    reports = report.get("report")
    if isinstance(reports, list):
        lines += [
            "## One report of a probed layer (W = 32, no own state)",
            "",
            "| layer | report ms | kernel launches | host syncs |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['shape']} | {r['report_ms']} | {r['kernel_launches']} | {r['host_syncs']} |"
            for r in reports
        ]
        lines.append("")
    runs = report.get("runs")
    if isinstance(runs, list):
        lines += [
            "## Runs: the product's `fisher_time_s` by kind",
            "",
            "observe: all timed observes (median of one active step); largest: the three slowest",
            "observes (shadow (re)initialisation at a burn-in's start, once the CUDA-graph capture);",
            "close: the wait for the last report. Without: the same run with `fisher_every: 0`.",
            "Warm-up: the process's device start-up the run paid before its clocks started (first run).",
            "",
            "| task | optimizer | train s | fisher ms | overhead | observe ms (median) "
            "| largest, ms @ step | close ms | train s without | warm-up ms |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        for row in runs:
            w, wo = row["with"], row.get("without") or {}
            kinds = w["seconds_by_kind"]
            largest = [(s, ms) for s, kind, ms in w["largest_calls"] if kind == "observe"][:3]
            cells = [
                row["task"],
                row["optimizer"],
                f"{w['train_time_s']:.2f}",
                _ms(w["fisher_time_s"]),
                f"{100 * w['fisher_overhead']:.1f} %",
                f"{_ms(kinds.get('observe'))} ({w['observe_median_ms']})",
                ", ".join(f"{ms:.0f} @ {s}" for s, ms in largest),
                _ms(kinds.get("close")),
                f"{wo['train_time_s']:.2f}" if wo.get("train_time_s") else "",
                _ms(w.get("device_warmup_s")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--parts", default="eigh,report,runs")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="runs part: these optimizers")
    parser.add_argument(
        "--no-compare", action="store_true", help="runs part: skip the runs without diagnostics"
    )
    parser.add_argument("--no-larger", action="store_true", help="runs part: only the default task")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs part: passes over the runs in this process (2: cold, then warm)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="runs part: skip the runner's once-per-process device warm-up (worker/training/warmup.py)",
    )
    parser.add_argument(
        "--render", type=Path, help="only print the Markdown of a saved fisher_breakdown.json"
    )
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(args.render.read_text())), end="")
        return 0
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if args.no_warmup:
        from worker.training import warmup

        warmup.WARMED_DEVICE_TYPES = ()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    runs = functools.partial(
        runs_part,
        optimizers=tuple(args.optimizers.split(",")),
        compare=not args.no_compare,
        larger=not args.no_larger,
        repeat=args.repeat,
    )
    parts = {"eigh": eigh_part, "report": report_part, "runs": runs}
    for name in args.parts.split(","):
        began = time.perf_counter()
        try:
            report[name] = parts[name](device, args.dry_run)
        except Exception as exc:  # a broken part must not lose the others' figures
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"part {name} failed: {exc!r}", file=sys.stderr, flush=True)
        print(f"== {name} took {time.perf_counter() - began:.1f}s", flush=True)
        (args.out / "fisher_breakdown.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "fisher_breakdown.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
