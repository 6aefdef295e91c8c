"""One command that proves the product on a CUDA machine, in a few minutes.

    python bench/gpu_check.py --out results/            # on a CUDA machine
    python bench/gpu_check.py --out /tmp/x --dry-run    # same code paths on the CPU, tiny sizes

It prints the device, driver, torch and CUDA versions; runs the test suite's CUDA-marked tests;
times one optimizer step of adamw, soap, dykaf, dykaf-rank1 and muon on GPT-2-small layer shapes
(CUDA events, median of several refresh windows) with the FLOP floor of DyKAF's extra work; runs the
multi-device code path (torchrun, NCCL, DDP, the sharded optimizer) as a forced one-rank run; trains
the embedded pre-training task for a fixed number of steps (bf16 autocast on CUDA) for adamw, soap
and dykaf through the real worker code path; runs the default task's AdamW run first in fresh
processes, with and without the runner's device warm-up; runs ``bench/default_task.yaml`` (the
worker's defaults) the same way for the product's own ``fisher_overhead``; measures the Fisher
diagnostics' overhead on the default task as the worker schedules them; times one update of each
Kronecker-factor rule; counts the batched engine's ops per step, checks that its steps never
synchronise and times them eager and compiled (``bench/op_count.py``); and writes one JSON and one
Markdown report to --out.

It needs only what a CUDA machine with PyTorch has: sections whose packages are missing are skipped
with a line saying so (``bench/gpu_check.sh`` installs carried wheels first when there are any).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

ROOT = Path(__file__).resolve().parents[1]

TRAIN_OPTIMIZERS = ("adamw", "soap", "dykaf")
STEP_OPTIMIZERS = ("adamw", "soap", "dykaf", "dykaf-rank1", "muon")
# ``bench/default_task.yaml`` shrunk for --dry-run (seconds on a CPU), reports every 4 steps.
DRY_RUN_DEFAULT_TASK = {
    "n_layer": 1,
    "d_model": 32,
    "n_head": 2,
    "context": 32,
    "batch_size": 4,
    "steps": 8,
    "warmup_steps": 1,
    "fisher_every": 4,
    "fisher_window": 4,
    "eval_every": 4,
    "eval_batches": 1,
}


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            memory_gb=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            info["driver"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "unknown (nvidia-smi not found)"
    else:
        info["device"] = "cpu"
    return info


def cuda_tests(dry_run: bool) -> dict[str, Any]:
    """Run the suite's CUDA-marked tests (on CPU they all skip; the dry run checks the plumbing)."""
    if missing("pytest"):
        return {"skipped": "pytest is not installed"}
    files = [str(p) for p in sorted((ROOT / "tests").rglob("test_*.py")) if "cuda" in p.read_text()]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs", *files]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
    return {
        "exit_code": proc.returncode,
        "summary": tail[0],
        "seconds": round(time.perf_counter() - started, 1),
        "files": [Path(f).name for f in files],
        "dry_run": dry_run,
    }


def optimizer_steps(device: str, dry_run: bool) -> dict[str, Any]:
    absent = [m for m in missing("pytorch_optimizer") if m]
    from bench import optimizer_step

    optimizers = tuple(n for n in STEP_OPTIMIZERS if not (absent and n == "shampoo"))
    widths = [16] if dry_run else None
    result = optimizer_step.run(device, widths, optimizers)
    print(optimizer_step.markdown(result))
    return result


# Factor-rule shapes: the default task's probed layers, a GPT-2-small square and MLP matrix.
RULE_SHAPES = ((384, 128), (768, 768), (768, 3072))


def factor_rules(device: str, dry_run: bool) -> dict[str, Any]:
    """Time per Kronecker-factor update, per rule (``bench/rule_kernels.py``): on a GPU small layers
    are launch-bound, so this is where the rules' kernel counts show."""
    from bench import rule_kernels

    result = rule_kernels.run(device, [(48, 32)] if dry_run else list(RULE_SHAPES))
    print(rule_kernels.markdown(result))
    return result


def engine(device: str, dry_run: bool) -> dict[str, Any]:
    """The batched DyKAF engine (``bench/op_count.py``): aten ops per step of DyKAF, SOAP and AdamW
    on 2- and 12-layer GPT stacks, host synchronisations in steps 2–11, and ms per step of the
    6-layer d=384 stack eager and with ``compile_step``."""
    from bench import op_count

    result = op_count.engine_check(device, dry_run)
    print(op_count.engine_markdown(result))
    return result


def training(device: str, dry_run: bool) -> dict[str, Any]:
    """Train the embedded task through ``worker.training.runner.execute_run`` (no service needed)."""
    absent = missing("pydantic", "yaml")
    if absent:
        return {"skipped": f"worker code path needs {', '.join(absent)}; carry wheels (bench/gpu_check.sh)"}
    from server.jobs.spec import JobSpec
    from worker.training.runner import execute_run
    from worker.training.sinks import MemorySink

    if dry_run:
        task = {
            "n_layer": 1,
            "n_head": 2,
            "d_model": 32,
            "context": 32,
            "batch_size": 4,
            "steps": 6,
            "warmup_steps": 1,
            "eval_every": 3,
            "eval_batches": 1,
            "log_every": 1,
        }
    else:
        task = {
            "n_layer": 6,
            "n_head": 6,
            "d_model": 384,
            "context": 256,
            "batch_size": 32,
            "steps": 300,
            "warmup_steps": 30,
            "eval_every": 100,
            "eval_batches": 8,
            "log_every": 10,
        }
    job = JobSpec.model_validate(
        {
            "name": "gpu-check",
            "device": device,
            "seeds": [0],
            "task": {"kind": "pretrain", "corpus": {"name": "pydoc"}, "tokenizer": {"kind": "byte"}, **task},
            "optimizers": [{"name": name, "hyperparameters": {"lr": 3e-3}} for name in TRAIN_OPTIMIZERS],
        }
    )
    rows = []
    for run in job.expand():
        sink = MemorySink()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = execute_run(run, sink, device=device)
        seconds = time.perf_counter() - started
        summary = result.summary
        rows.append(
            {
                "optimizer": run.optimizer,
                "status": result.status,
                "reason": result.reason,
                "steps": result.final_step,
                "seconds": round(seconds, 2),
                "final_val_loss": summary.get("final_val_loss"),
                "tokens_per_s": summary.get("tokens_per_s"),
                "peak_memory_mb": summary.get("peak_memory_mb"),
                "step_time_ms": summary.get("step_time_ms"),
                "optimizer_ms": summary.get("optimizer_ms"),
                # Fisher diagnostics as the worker runs them (graphs, background reports),
                # measured by the run itself: its loop's time in diagnostics / training time.
                "fisher_overhead": summary.get("fisher_overhead"),
            }
        )
        print(rows[-1], flush=True)
    return {"task": task, "autocast": "bf16" if device == "cuda" else "none", "runs": rows}


def distributed(device: str, dry_run: bool) -> dict[str, Any]:
    """The multi-device code path on one device: torchrun, the process group (NCCL on CUDA), DDP and
    the sharded optimizer with its collectives, as a one-rank run forced onto that path
    (``Ranks.forced``; one GPU cannot host two NCCL ranks). Each optimizer and mode runs once that
    way and once in-process; the report compares their losses and tokens/s (the path's overhead)."""
    absent = missing("pydantic", "yaml")
    if absent:
        return {"skipped": f"worker code path needs {', '.join(absent)}; carry wheels (bench/gpu_check.sh)"}
    import tempfile

    from server.jobs.spec import JobSpec
    from worker.distributed.launch import launch_ranks
    from worker.training.runner import execute_run
    from worker.training.sinks import MemorySink

    size = (
        {"n_layer": 1, "n_head": 2, "d_model": 32, "context": 32, "batch_size": 4, "steps": 6}
        if dry_run
        else {"n_layer": 6, "n_head": 6, "d_model": 384, "context": 256, "batch_size": 32, "steps": 100}
    )
    task = {**size, "warmup_steps": 1, "eval_every": size["steps"], "eval_batches": 2, "log_every": 1}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for mode in ("shard", "replicate"):
            job = JobSpec.model_validate(
                {
                    "name": "gpu-check-ranks",
                    "device": device,
                    "task": {
                        "corpus": {"name": "pydoc"},
                        "tokenizer": {"kind": "byte"},
                        "distributed": mode,
                        **task,
                    },
                    "optimizers": [
                        {"name": name, "hyperparameters": {"lr": 3e-3}} for name in TRAIN_OPTIMIZERS
                    ],
                }
            )
            for run in job.expand():
                plain = execute_run(run, MemorySink(), device=device)
                folder = Path(scratch) / f"{mode}-{run.optimizer}"
                ranked = launch_ranks(
                    run,
                    folder / "launch",
                    checkpoint_dir=folder,
                    devices=["0"] if device == "cuda" else ["cpu0"],
                    force_collectives=True,
                )
                one, two = plain.summary.get("final_val_loss"), ranked.summary.get("final_val_loss")
                rows.append(
                    {
                        "optimizer": run.optimizer,
                        "mode": mode,
                        "status": ranked.status,
                        "reason": ranked.reason,
                        "val_loss_plain": one,
                        "val_loss_ranked": two,
                        "val_loss_rel_diff": abs(one - two) / abs(one) if one and two else None,
                        "tokens_per_s_plain": plain.summary.get("tokens_per_s"),
                        "tokens_per_s_ranked": ranked.summary.get("tokens_per_s"),
                        "optimizer_ms_plain": plain.summary.get("optimizer_ms"),
                        "optimizer_ms_ranked": ranked.summary.get("optimizer_ms"),
                    }
                )
                print(rows[-1], flush=True)
    return {"task": task, "backend": "nccl" if device == "cuda" else "gloo", "runs": rows}


def cold_start(device: str, dry_run: bool) -> dict[str, Any]:
    """The default task's AdamW run in two fresh processes, twice in each (``bench/fisher_breakdown.py
    --repeat 2``): once with the runner's device warm-up turned off, once with it on. Pass 1 of the
    first shows what a process's start-up costs a run's figures when nothing pays it up front, pass 2
    the warm figure; pass 1 of the second must match pass 2 if the warm-up
    (``worker/training/warmup.py``) pays all of it, and its ``device_warmup_s`` is what it moved."""
    absent = missing("pydantic", "yaml")
    if absent:
        return {"skipped": f"worker code path needs {', '.join(absent)}; carry wheels (bench/gpu_check.sh)"}
    import tempfile

    rows = []
    for warm_up in (False, True):
        with tempfile.TemporaryDirectory() as out:
            script = str(ROOT / "bench" / "fisher_breakdown.py")
            cmd = [sys.executable, script, "--out", out, "--parts", "runs", "--repeat", "2"]
            cmd += ["--no-compare", "--no-larger", "--optimizers", "adamw"]
            cmd += [] if warm_up else ["--no-warmup"]
            cmd += ["--dry-run"] if dry_run else []
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
            if proc.returncode != 0:
                return {"error": f"fisher_breakdown exited {proc.returncode}: {proc.stderr[-500:]}"}
            runs = json.loads((Path(out) / "fisher_breakdown.json").read_text())["runs"]
        for run in runs:
            with_diag = run["with"]
            rows.append(
                {
                    "warm_up": "on" if warm_up else "off",
                    "pass": run["task"].rsplit("pass ", 1)[-1],
                    "status": with_diag["status"],
                    "train_time_s": with_diag["train_time_s"],
                    "fisher_time_s": with_diag["fisher_time_s"],
                    "fisher_overhead": with_diag["fisher_overhead"],
                    "device_warmup_s": with_diag.get("device_warmup_s"),
                    "largest_calls": ", ".join(
                        f"{ms:.0f} ms @ {step} ({kind})" for step, kind, ms in with_diag["largest_calls"][:3]
                    ),
                }
            )
            print(rows[-1], flush=True)
    return {"optimizer": "adamw", "runs": rows}


def default_task(device: str, dry_run: bool) -> dict[str, Any]:
    """``bench/default_task.yaml`` (the worker's TaskSpec defaults: 500 steps, a Fisher report every
    250, each optimizer at its library-default lr) through the real worker code path: the product's
    own ``fisher_overhead`` at the default settings, the figure issue 3's 5 % target is about."""
    absent = missing("pydantic", "yaml")
    if absent:
        return {"skipped": f"worker code path needs {', '.join(absent)}; carry wheels (bench/gpu_check.sh)"}
    import yaml

    from server.jobs.spec import JobSpec
    from worker.training.runner import execute_run
    from worker.training.sinks import MemorySink

    data = yaml.safe_load((ROOT / "bench" / "default_task.yaml").read_text())
    data["device"] = device
    if dry_run:
        data["task"] = {**data["task"], **DRY_RUN_DEFAULT_TASK}
    job = JobSpec.model_validate(data)
    rows = []
    for run in job.expand():
        sink = MemorySink()
        started = time.perf_counter()
        result = execute_run(run, sink, device=device)
        summary = result.summary
        rows.append(
            {
                "optimizer": run.optimizer,
                "status": result.status,
                "steps": result.final_step,
                "seconds": round(time.perf_counter() - started, 2),
                "final_val_loss": summary.get("final_val_loss"),
                "train_time_s": summary.get("train_time_s"),
                "step_time_ms": summary.get("step_time_ms"),
                "fisher_time_s": summary.get("fisher_time_s"),
                "fisher_overhead": summary.get("fisher_overhead"),
                "fisher_rows": len(sink.fisher),
            }
        )
        print(rows[-1], flush=True)
    return {"task": data["task"], "runs": rows}


def fisher_overhead(device: str, dry_run: bool) -> dict[str, Any]:
    """Fisher diagnostics' share of training time on the embedded task, as the worker runs them
    (scheduled observe, a report every 250 steps), in isolation and over whole 250-step cycles."""
    absent = missing("pydantic", "yaml")
    if absent:
        return {"skipped": f"worker code path needs {', '.join(absent)}; carry wheels (bench/gpu_check.sh)"}
    from dataclasses import asdict

    from bench import fisher_cost

    # Every optimizer with the default (CUDA-graph shadow updates on a GPU), and AdamW — whose
    # probes run all three shadows — also eagerly, so the graphs' gain is measured in the same run.
    configs = [(name, "auto") for name in TRAIN_OPTIMIZERS] + [("adamw", "off")]
    rows = [
        fisher_cost.bench_worker(
            torch.device(device),
            name,
            steps=8 if dry_run else 20,
            fisher_every=250,
            window=4 if dry_run else 32,
            max_layers=2,
            end_to_end=None if dry_run else 250,
            replay=replay,
        )
        for name, replay in configs
    ]
    text = fisher_cost.render_worker("bench/gpu_check.py (fisher section)", rows, [50, 250])
    print(text, flush=True)
    return {"rows": [asdict(r) for r in rows], "markdown": text}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of ``rows``' ``keys``, one column each."""
    head = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return head + ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]


def pretrain_throughput(device: str, dry_run: bool) -> dict[str, Any]:
    """gpt2-124m and llama-130m, bf16, compiled, 0.26 M-token batches: see bench/pretrain_throughput.py."""
    from bench import pretrain_throughput

    return pretrain_throughput.run(device, dry_run)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check — {env.get('device')}",
        "",
        f"torch {env['torch']}, CUDA {env.get('torch_cuda')}, driver {env.get('driver', '-')}, "
        f"python {env['python']}",
        "",
    ]
    tests = report["cuda_tests"]
    lines += [
        "## CUDA tests",
        "",
        f"`{tests.get('summary') or tests.get('skipped') or tests.get('error')}`",
        "",
    ]
    steps = report["optimizer_step"]
    if "rows" in steps:
        from bench import optimizer_step

        lines += ["## One optimizer step", "", optimizer_step.markdown(steps), ""]
    else:
        lines += ["## One optimizer step", "", steps.get("skipped") or steps.get("error", ""), ""]
    ranked = report.get("distributed", {"skipped": "not in this report"})
    lines += ["## Multi-device code path on one device (forced one-rank run vs in-process)", ""]
    if "runs" in ranked:
        keys = [
            "optimizer",
            "mode",
            "status",
            "val_loss_rel_diff",
            "tokens_per_s_plain",
            "tokens_per_s_ranked",
            "optimizer_ms_plain",
            "optimizer_ms_ranked",
        ]
        lines += [
            f"Backend: {ranked['backend']}; task: {ranked['task']}",
            "",
            *_table(keys, ranked["runs"]),
            "",
        ]
    else:
        lines += [ranked.get("skipped") or ranked.get("error", ""), ""]
    train = report["training"]
    lines += ["## Training (embedded pre-training task)", ""]
    if "runs" in train:
        keys = [
            "optimizer",
            "status",
            "steps",
            "seconds",
            "final_val_loss",
            "tokens_per_s",
            "peak_memory_mb",
            "step_time_ms",
            "optimizer_ms",
            "fisher_overhead",
        ]
        lines += [f"Task: {train['task']}; autocast: {train['autocast']}", "", *_table(keys, train["runs"])]
    else:
        lines.append(train.get("skipped", ""))
    cold = report.get("cold_start", {})
    lines += ["", "## A fresh process's first run, with and without the device warm-up (AdamW)", ""]
    if "runs" in cold:
        keys = [
            "warm_up",
            "pass",
            "status",
            "train_time_s",
            "fisher_time_s",
            "fisher_overhead",
            "device_warmup_s",
            "largest_calls",
        ]
        lines += _table(keys, cold["runs"])
    else:
        lines.append(cold.get("skipped") or cold.get("error", ""))
    default = report.get("default_task", {})
    lines += ["", "## Default task (`bench/default_task.yaml`): the product's own diagnostics overhead", ""]
    if "runs" in default:
        keys = [
            "optimizer",
            "status",
            "steps",
            "seconds",
            "final_val_loss",
            "train_time_s",
            "step_time_ms",
            "fisher_time_s",
            "fisher_overhead",
            "fisher_rows",
        ]
        lines += [f"Task: {default['task']}", "", *_table(keys, default["runs"])]
    else:
        lines.append(default.get("skipped") or default.get("error", ""))
    fisher = report.get("fisher", {})
    lines += ["", "## Fisher diagnostics overhead", ""]
    lines.append(fisher.get("markdown") or fisher.get("skipped") or fisher.get("error", ""))
    batched = report.get("engine", {})
    lines += ["", "## Batched engine: ops per step, host syncs, step time", ""]
    if "counts" in batched:
        from bench import op_count

        lines.append(op_count.engine_markdown(batched, report.get("training")))
    else:
        lines.append(batched.get("skipped") or batched.get("error", ""))
    rules = report.get("factor_rules", {})
    lines += ["", "## Factor-rule updates (µs each)", ""]
    if "rows" in rules:
        from bench import rule_kernels

        lines.append(rule_kernels.markdown(rules))
    else:
        lines.append(rules.get("skipped") or rules.get("error", ""))
    pretrain = report.get("pretrain", {})
    lines += ["", "## Pre-training throughput (presets, compiled, bf16): tokens/s, MFU, optimizer share", ""]
    if "rows" in pretrain:
        from bench import pretrain_throughput

        lines.append(pretrain_throughput.markdown(pretrain))
    else:
        lines.append(pretrain.get("skipped") or pretrain.get("error", ""))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script itself")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=[
            "tests",
            "distributed",
            "cold",
            "default",
            "fisher",
            "rules",
            "engine",
            "training",
            "steps",
            "pretrain",
        ],
    )
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    report: dict[str, Any] = {"environment": environment()}
    print(json.dumps(report["environment"], indent=2), flush=True)
    # Run order: what has never run on a GPU first (tests, the fresh-process runs, the default
    # task's own overhead, the fisher section, the rewritten factor rules), so a run cut off by the
    # device's time limit keeps the figures that matter.
    sections = {
        "tests": ("cuda_tests", cuda_tests),
        "distributed": ("distributed", distributed),
        "cold": ("cold_start", cold_start),
        "default": ("default_task", default_task),
        "fisher": ("fisher", fisher_overhead),
        "rules": ("factor_rules", factor_rules),
        "engine": ("engine", engine),
        "training": ("training", training),
        "steps": ("optimizer_step", optimizer_steps),
        "pretrain": ("pretrain", pretrain_throughput),
    }
    for key, (name, fn) in sections.items():
        if key in args.skip:
            report[name] = {"skipped": "--skip"}
        else:
            report[name] = run_section(key, fn, device, args.dry_run)
        # Written after every section: on a lent GPU with minutes of budget, a run cut off by its
        # time limit still leaves the figures of the sections that finished.
        write_report(args.out, report, pending=[name for name, _ in sections.values() if name not in report])
    print(markdown(report))
    return 0


def run_section(key: str, fn: Callable[..., dict[str, Any]], device: str, dry_run: bool) -> dict[str, Any]:
    """One section's results; a broken section becomes an ``error`` entry, not lost figures."""
    started = time.perf_counter()
    try:
        result = fn(device, dry_run) if key != "tests" else fn(dry_run)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"section {key} failed: {exc!r}", file=sys.stderr)
    print(f"== {key} took {time.perf_counter() - started:.1f}s", flush=True)
    return result


def write_report(out: Path, report: dict[str, Any], pending: list[str]) -> None:
    """Write ``gpu_check.json`` and ``gpu_check.md``; sections still to run (``pending``, by report
    name) are marked as such."""
    shown = dict(report)
    for name in pending:
        shown[name] = {"skipped": "not run yet (the report is rewritten after each section)"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(shown, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(shown))


if __name__ == "__main__":
    sys.exit(main())
