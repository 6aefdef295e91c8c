"""What every benchmark script needs at start-up and when it writes its report.

A script run as ``python bench/NAME.py`` has ``bench/`` as ``sys.path[0]``; each script's first lines
swap it for the repository root (``if not __package__: sys.path[0] = …``), so that it imports its
siblings as ``bench.NAME``, exactly as under ``python -m bench.NAME``. That line must run before any
``bench`` import, so it cannot live here; everything after it does.
"""

from __future__ import annotations

import shlex
import socket
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (0 or None: torch's default, every core) and return the count.

    On a shared CPU one thread gives steadier timings; ratios are only compared within one run."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, for the report's header: ``python -m bench.NAME ARGS``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None else f"bench.{Path(sys.argv[0]).stem}"
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", name, *args])


def write_text(path: Path, text: str) -> Path:
    """Write a report, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GitHub Markdown table. ``align`` holds one of ``l``/``r`` per column (default: text left,
    everything after the first column right-aligned, as the reports' numbers are)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
