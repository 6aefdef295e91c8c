"""Pre-training throughput at a realistic scale: tokens/s, MFU and the optimizer's share of a step.

    python bench/pretrain_throughput.py --out results/          # on a CUDA machine (a section of gpu_check)
    python bench/pretrain_throughput.py --out /tmp/x --dry-run  # tiny preset on the CPU

For ``gpt2-124m`` and ``llama-130m`` (bf16 autocast, ``torch.compile``), each of AdamW, SOAP, DyKAF and
Muon trains 50 steps at a global batch of 32 × 8 × 1024 = 262 144 tokens (gradient accumulation)
through the worker's own code path (``execute_run``), Fisher diagnostics off. Steady-state figures
are taken from the steps after the first five (the first pay for allocator growth and autotuning;
compilation itself happens before step 1 and is reported as ``compile_s``): tokens/s from the median
step time, MFU from the model FLOPs per token (6N + attention) over the device's dense bf16 peak.
The data are the embedded ``pydoc`` corpus as byte-level shards: throughput does not depend on what
the tokens say, and the vocabulary is the preset's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])


OPTIMIZERS = ("adamw", "soap", "dykaf", "muon")
PRESETS = ("gpt2-124m", "llama-130m")
LEARNING_RATES = {"adamw": 6e-4, "soap": 3e-3, "dykaf": 3e-3, "muon": 0.02}
SKIP_STEPS = 5


def task_for(preset: str, dry_run: bool) -> dict[str, Any]:
    if dry_run:
        return {
            "preset": "llama-tiny" if preset.startswith("llama") else "gpt-micro",
            "context": 32,
            "batch_size": 2,
            "grad_accum": 2,
            "steps": SKIP_STEPS + 3,
            "compile": False,
        }
    return {
        "preset": preset,
        "context": 1024,
        "batch_size": 32,
        "grad_accum": 8,
        "steps": 50,
        "compile": True,
    }


def run(device: str, dry_run: bool, presets: tuple[str, ...] = PRESETS) -> dict[str, Any]:
    """One row per (preset, optimizer) with steady-state tokens/s, MFU and optimizer share."""
    import torch

    from server.jobs.spec import JobSpec
    from worker.lm.throughput import device_peak_flops, mfu
    from worker.training.runner import execute_run
    from worker.training.sinks import MemorySink

    peak = device_peak_flops(torch.cuda.get_device_name(), bf16=True) if device == "cuda" else None
    rows = []
    for preset in presets:
        task = {
            **task_for(preset, dry_run),
            "warmup_steps": 5 if not dry_run else 1,
            "eval_every": 10_000,
            "eval_batches": 2,
            "log_every": 1,
            "fisher_every": 0,
            "corpus": {"name": "pydoc"},
        }
        task["eval_every"] = task["steps"]
        job = JobSpec.model_validate(
            {
                "name": "pretrain-throughput",
                "device": device,
                "task": task,
                "optimizers": [{"name": n, "hyperparameters": {"lr": LEARNING_RATES[n]}} for n in OPTIMIZERS],
            }
        )
        for spec in job.expand():
            sink = MemorySink()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            result = execute_run(spec, sink, device=device)
            steady = [m for step, m, _ in sink.records if step > SKIP_STEPS and "step_time" in m]
            s = result.summary
            row: dict[str, Any] = {
                "preset": preset if not dry_run else f"{preset} (dry run: {task['preset']})",
                "optimizer": spec.optimizer,
                "status": result.status,
                "reason": result.reason,
                "parameters_m": round(s.get("parameters", 0) / 1e6, 1),
                "global_batch_tokens": spec.task.batch_size * spec.task.grad_accum * spec.task.context,
                "seconds": round(time.perf_counter() - began, 1),
                "compile_s": s.get("compile_time_s"),
                "final_train_loss": s.get("final_train_loss"),
            }
            if steady and s.get("flops_per_token"):
                step_time = statistics.median(m["step_time"] for m in steady)
                tokens_per_s = row["global_batch_tokens"] / step_time
                opt = statistics.median(m["optimizer_time"] for m in steady)
                row.update(
                    tokens_per_s=round(tokens_per_s),
                    mfu=mfu(tokens_per_s, s["flops_per_token"], peak),
                    optimizer_share=opt / step_time,
                    step_time_ms=1000 * step_time,
                    peak_memory_mb=s.get("peak_memory_mb"),
                )
            rows.append(row)
            print(row, flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    for row in rows:  # DyKAF's tokens/s as a ratio to AdamW's on the same preset
        base = next((r for r in rows if r["preset"] == row["preset"] and r["optimizer"] == "adamw"), None)
        if base and base.get("tokens_per_s") and row.get("tokens_per_s"):
            row["vs_adamw"] = row["tokens_per_s"] / base["tokens_per_s"]
    return {"device_peak_flops": peak, "skip_steps": SKIP_STEPS, "rows": rows}


KEYS = [
    "preset",
    "optimizer",
    "status",
    "global_batch_tokens",
    "tokens_per_s",
    "vs_adamw",
    "mfu",
    "optimizer_share",
    "step_time_ms",
    "compile_s",
    "peak_memory_mb",
]


def markdown(result: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "-" if value is None else str(value)

    lines = [
        f"Steady state after step {result['skip_steps']}; MFU against a dense bf16 peak of "
        f"{fmt(result['device_peak_flops'])} FLOP/s (none on CPU or an unknown GPU).",
        "",
        "| " + " | ".join(KEYS) + " |",
        "|" + "---|" * len(KEYS),
    ]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k in KEYS) + " |" for row in result["rows"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    args = parser.parse_args()
    result = run("cpu" if args.dry_run else "cuda", args.dry_run, tuple(args.presets))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrain_throughput.json").write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
