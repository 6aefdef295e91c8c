"""Command-line entry points for data and model sizes: ``prepare-data`` and ``presets``.

Kept out of ``worker/cli.py`` (which only registers them) so that file stays a thin table of commands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def prepare_data_command(
    source: Annotated[
        str,
        typer.Argument(
            help="pydoc | stdlib_code | a .txt/.jsonl/.parquet file, folder or glob | hf:NAME (a Hugging "
            "Face dataset id or local dataset folder, streamed)"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the shards and manifest.json")],
    tokenizer: Annotated[
        str,
        typer.Option(
            help="byte | bpe (trained on a sample of the source) | a HF tokenizer's folder or hub id"
        ),
    ] = "byte",
    vocab_size: Annotated[int, typer.Option(min=300, max=1_048_576, help="BPE vocabulary size")] = 32_768,
    bpe_sample_chars: Annotated[int, typer.Option(min=1, help="characters of text the BPE is trained on")] = (
        20_000_000
    ),
    val_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="share of documents held out (by content hash)")
    ] = 0.005,
    shard_tokens: Annotated[int, typer.Option(min=1024, help="tokens per shard file")] = 100_000_000,
    processes: Annotated[
        int | None, typer.Option(min=1, help="tokenizer processes (default: every core)")
    ] = None,
    max_documents: Annotated[int | None, typer.Option(min=1, help="stop after this many documents")] = None,
    text_field: Annotated[str, typer.Option(help="field holding the text (jsonl, parquet, hf)")] = "text",
    file_format: Annotated[str, typer.Option("--format", help="auto | text | jsonl | parquet")] = "auto",
    hf_config: Annotated[str | None, typer.Option(help="dataset configuration (hf:)")] = None,
    hf_split: Annotated[str, typer.Option(help="dataset split (hf:)")] = "train",
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Tokenise a corpus into token shards for `corpus: {name: shards, path: OUT}` (resumable)."""
    from worker.lm.prepare import Source, describe, prepare_data
    from worker.lm.shards import ShardError

    if file_format not in ("auto", "text", "jsonl", "parquet"):
        typer.echo(f"--format must be auto, text, jsonl or parquet, not {file_format!r}", err=True)
        raise typer.Exit(2)
    src = Source(source, file_format, text_field, hf_config, hf_split)
    n_proc = processes or os.cpu_count() or 1
    try:
        report = prepare_data(
            src,
            out,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            bpe_sample_chars=bpe_sample_chars,
            val_fraction=val_fraction,
            shard_tokens=shard_tokens,
            processes=n_proc,
            max_documents=max_documents,
            progress=not quiet,
        )
    except (ShardError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"prepare-data: {exc}", err=True)
        raise typer.Exit(2) from None
    if report.seconds:
        rate = report.bytes_read / 1e6 / report.seconds
        typer.echo(
            f"{report.new_tokens:,} tokens in {report.seconds:.1f} s "
            f"({report.new_tokens / report.seconds:,.0f} tokens/s, {rate:.1f} MB/s of text, "
            f"{n_proc} processes)"
        )
    else:
        typer.echo("already complete; nothing to do")
    typer.echo(f"{out}: {describe(report.manifest)}")


def presets_command() -> None:
    """List the model presets: shape, parameter count and the Chinchilla token count (20/parameter)."""
    from rich.console import Console

    from worker.lm.presets import preset_table

    Console().print(preset_table())


def register(app: typer.Typer) -> None:
    app.command("prepare-data")(prepare_data_command)
    app.command("presets")(presets_command)
