"""Token shards: how fast windows come out, how much memory that costs, how fast prepare-data runs.

    python bench/data_loader.py --out bench/results/shards            # ~2 GB of synthetic shards in --work
    python bench/data_loader.py --out /tmp/x --gigabytes 0.05 --quick  # seconds (the test's size)

1. Loader speed: ``WindowBatches.batch`` (the runner's own call) over memory-mapped synthetic shards,
   context 1024, batch 16, in one process; the same windows from an in-memory array are the baseline
   of the same run (``vs_in_memory``).
2. Memory: the resident set size (``/proc/self/status`` VmRSS) after a first short real run on the
   shards (the worker's start: torch imported, a model built), then while the batch stream walks
   every window of ``--gigabytes`` of shards once (an epoch: every page of every shard is read), then
   after another real ``execute_run`` (tiny LLaMA) on the same shards; reported as growth over the
   start. A CPU cannot train a model through 2 GB of tokens in a benchmark's time, so the epoch is the
   runner's batch call alone; the runs show the same path inside training.
3. prepare-data: MB/s of UTF-8 text with 1 and with every process, byte and BPE tokenizers, on the
   standard library's source (``stdlib_code``, the first ``--prepare-docs`` files).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])


CONTEXT, BATCH = 1024, 16


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def synthetic_shards(folder: Path, gigabytes: float, shard_tokens: int = 100_000_000) -> Path:
    """uint16 shards of random tokens (vocabulary 50 257) with a valid manifest; reused when present."""
    from worker.lm.shards import FORMAT, MANIFEST, shard_name, write_json_atomic

    total = int(gigabytes * 1e9 / 2)
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("train_tokens") == total:
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, written, index = [], 0, 0
    while written < total:
        n = min(shard_tokens, total - written)
        tokens = rng.integers(0, 50257, n, dtype=np.uint16)
        tokens.tofile(folder / shard_name("train", index))
        shards.append(
            {
                "file": shard_name("train", index),
                "split": "train",
                "tokens": n,
                "max_token": int(tokens.max()),
                "end": {"doc": 0, "offset": 0},
            }
        )
        written, index = written + n, index + 1
    val = rng.integers(0, 50257, 1_000_000, dtype=np.uint16)
    val.tofile(folder / shard_name("val", 0))
    shards.append(
        {
            "file": shard_name("val", 0),
            "split": "val",
            "tokens": len(val),
            "max_token": 50256,
            "end": {"doc": 0, "offset": 0},
        }
    )
    write_json_atomic(
        folder / MANIFEST,
        {
            "format": FORMAT,
            "dtype": "uint16",
            "complete": True,
            "train_tokens": total,
            "val_tokens": len(val),
            "tokenizer": {
                "kind": "synthetic",
                "name": "random uint16",
                "vocab_size": 50257,
                "eos_id": 50256,
                "sha256": "0" * 64,
            },
            "separator": {"token_id": 50256, "placement": "none (synthetic)"},
            "source": {"kind": "synthetic"},
            "shards": shards,
        },
    )
    return folder


def loader_speed(folder: Path, seconds: float) -> dict[str, Any]:
    from worker.lm.data import WindowBatches
    from worker.lm.shards import TokenSpace, open_shards

    shards = open_shards(folder)
    mapped = WindowBatches(shards.train, CONTEXT, BATCH, seed=0)
    first = shards.train.parts[0]
    in_memory = WindowBatches(TokenSpace([np.array(first)]), CONTEXT, BATCH, seed=0)

    def rate(batches: WindowBatches) -> float:
        count, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            for _ in range(50):
                batches.batch(count)
                count += 1
        return count * BATCH * CONTEXT / (time.perf_counter() - began)

    memory_rate = rate(in_memory)
    mapped_rate = rate(mapped)
    return {
        "tokens_per_s": mapped_rate,
        "in_memory_tokens_per_s": memory_rate,
        "vs_in_memory": mapped_rate / memory_rate,
        "context": CONTEXT,
        "batch": BATCH,
    }


def _short_run(folder: Path, steps: int) -> str:
    """A real run (tiny LLaMA) on the shards through the worker's code path; returns its status."""
    from server.jobs.spec import parse_job
    from worker.training.runner import execute_run
    from worker.training.sinks import MemorySink

    task = {
        "arch": "llama",
        "n_layer": 1,
        "n_head": 2,
        "d_model": 32,
        "context": 128,
        "batch_size": 8,
        "steps": steps,
        "warmup_steps": 1,
        "eval_every": steps,
        "eval_batches": 1,
        "fisher_every": 0,
        "corpus": {"name": "shards", "path": str(folder)},
    }
    job = parse_job({"name": "rss", "device": "cpu", "optimizers": [{"name": "adamw"}], "task": task})
    (spec,) = job.expand()
    return execute_run(spec, MemorySink()).status


def memory_epoch(folder: Path, quick: bool) -> dict[str, Any]:
    """RSS growth while the batch stream reads every window of the shards once, and after real runs.

    The start is measured after a first short run on the shards, i.e. a worker that has imported
    torch, built a model and opened the shards: what grows after that is what the data cost.
    """
    from worker.lm.data import WindowBatches
    from worker.lm.shards import open_shards

    before_first_run = rss_mb()
    first_status = _short_run(folder, 3)
    start = rss_mb()
    shards = open_shards(folder)
    batches = WindowBatches(shards.train, CONTEXT, 64, seed=0)
    n_batches = batches.n_windows // 64
    peak, began = start, time.perf_counter()
    for index in range(n_batches):
        batches.batch(index)
        if index % 256 == 0:
            peak = max(peak, rss_mb())
    epoch_s = time.perf_counter() - began
    peak = max(peak, rss_mb())
    after_epoch = rss_mb()
    status = _short_run(folder, 3 if quick else 20)
    return {
        "shard_gigabytes": sum(p.nbytes for p in shards.train.parts) / 1e9,
        "rss_before_first_run_mb": before_first_run,
        "rss_start_mb": start,
        "rss_peak_during_epoch_mb": peak,
        "rss_growth_epoch_mb": peak - start,
        "rss_after_epoch_mb": after_epoch,
        "epoch_tokens_per_s": n_batches * 64 * CONTEXT / epoch_s,
        "run_status": f"{first_status}, {status}",
        "rss_after_run_mb": rss_mb(),
        "rss_growth_with_run_mb": rss_mb() - start,
    }


def prepare_speed(work: Path, documents: int) -> list[dict[str, Any]]:
    from worker.lm.prepare import Source, prepare_data

    rows = []
    for tokenizer in ("byte", "bpe"):
        for processes in sorted({1, os.cpu_count() or 1}):
            out = Path(tempfile.mkdtemp(dir=work, prefix=f"prep-{tokenizer}-{processes}-"))
            report = prepare_data(
                Source("stdlib_code"),
                out,
                tokenizer=tokenizer,
                vocab_size=4096,
                bpe_sample_chars=2_000_000,
                processes=processes,
                max_documents=documents,
                progress=False,
                val_fraction=0.1,
            )
            rows.append(
                {
                    "tokenizer": tokenizer,
                    "processes": processes,
                    "mb_text": report.bytes_read / 1e6,
                    "seconds": report.seconds,
                    "mb_per_s": report.bytes_read / 1e6 / report.seconds,
                    "tokens_per_s": report.new_tokens / report.seconds,
                }
            )
    return rows


def markdown(result: dict[str, Any]) -> str:
    speed, memory = result["loader"], result["memory"]
    lines = [
        f"Loader (one process, context {speed['context']}, batch {speed['batch']}): "
        f"{speed['tokens_per_s'] / 1e6:.1f} M tokens/s from memory-mapped shards, "
        f"{speed['in_memory_tokens_per_s'] / 1e6:.1f} M tokens/s from an in-memory array "
        f"(ratio {speed['vs_in_memory']:.2f}).",
        "",
        f"Memory over an epoch of {memory['shard_gigabytes']:.2f} GB of shards: RSS "
        f"{memory['rss_start_mb']:.0f} MB at start (after a first run), peak growth "
        f"{memory['rss_growth_epoch_mb']:.0f} MB during the epoch "
        f"({memory['epoch_tokens_per_s'] / 1e6:.1f} M tokens/s), growth "
        f"{memory['rss_growth_with_run_mb']:.0f} MB after a real run on the shards ({memory['run_status']}).",
        "",
        "| tokenizer | processes | MB of text | seconds | MB/s | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["prepare"]:
        lines.append(
            f"| {row['tokenizer']} | {row['processes']} | {row['mb_text']:.1f} | {row['seconds']:.1f} | "
            f"{row['mb_per_s']:.2f} | {row['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dykaf-shards-bench")
    parser.add_argument(
        "--gigabytes", type=float, default=2.0, help="synthetic shards read in the memory test"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per loader-speed measurement")
    parser.add_argument(
        "--prepare-docs", type=int, default=400, help="stdlib files tokenised per prepare run"
    )
    parser.add_argument("--quick", action="store_true", help="short real run (the test's setting)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DYKAF_DATA_ROOTS", os.pathsep.join([str(args.work.resolve()), os.getcwd()]))
    folder = synthetic_shards(args.work / f"synthetic-{args.gigabytes:g}gb", args.gigabytes)
    result = {
        "loader": loader_speed(folder, args.seconds),
        "memory": memory_epoch(folder, args.quick),
        "prepare": prepare_speed(args.work, args.prepare_docs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_loader.json").write_text(json.dumps(result, indent=2))
    (args.out / "data_loader.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
