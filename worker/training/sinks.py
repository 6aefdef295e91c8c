"""Where measurements go. The training loop talks to a ``MetricSink`` and knows nothing about
storage: in-memory (tests, summaries), CSV files (the local command line) and, in the service, a
database sink with the same four methods.

After a resume the runner logs again the steps that followed the checkpoint; sinks that persist
should therefore treat (run, step, metric) as a key and overwrite.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from worker.training.measure import METRIC_NAMES

FISHER_COLUMNS = ("step", "layer", "method", "metric", "value")


@runtime_checkable
class MetricSink(Protocol):
    """Receives per-step metrics and Fisher diagnostic rows."""

    def log_metrics(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None: ...

    def log_fisher(self, rows: Iterable[Sequence[Any]]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class MemorySink:
    """Keeps everything in lists; ``series(name)`` gives (step, value) pairs for one metric."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float], float]] = []
        self.fisher: list[tuple[Any, ...]] = []
        self.closed = False

    def log_metrics(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None:
        self.records.append((step, dict(metrics), wall_time))

    def log_fisher(self, rows: Iterable[Sequence[Any]]) -> None:
        self.fisher.extend(tuple(row) for row in rows)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(step, m[name]) for step, m, _ in self.records if name in m]


class NullSink:
    """Discards everything: the sink of the ranks other than rank 0 in a multi-device run."""

    def log_metrics(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None:
        pass

    def log_fisher(self, rows: Iterable[Sequence[Any]]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class JsonLinesSink:
    """Appends one JSON object per call to a file (``{"step", "metrics", "wall_time"}`` or
    ``{"fisher": [...]}``), flushed on ``flush``: how rank 0 of a multi-device run started outside
    the service hands its metrics back to the process that launched it (``read_json_lines``).
    Non-finite floats are written as JSON's NaN/Infinity extensions, which ``json`` reads back."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    def log_metrics(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None:
        record = {
            "step": int(step),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "wall_time": wall_time,
        }
        self._handle.write(json.dumps(record) + "\n")

    def log_fisher(self, rows: Iterable[Sequence[Any]]) -> None:
        materialised = [list(row) for row in rows]
        if materialised:
            self._handle.write(json.dumps({"fisher": materialised}) + "\n")

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_json_lines(path: str | Path, into: MetricSink) -> None:
    """Replay a ``JsonLinesSink`` file into another sink (a partly written last line is skipped)."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "fisher" in record:
                into.log_fisher([tuple(row) for row in record["fisher"]])
            else:
                into.log_metrics(record["step"], record["metrics"], record["wall_time"])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class CsvSink:
    """Wide per-step rows (one column per metric) plus optional Fisher rows, appended to CSV files.

    ``static`` columns (run key, optimizer, seed …) are prepended to every row, so several runs can
    share one file. The header is written when the file is new or empty.
    """

    def __init__(
        self,
        path: str | Path,
        fisher_path: str | Path | None = None,
        static: Mapping[str, Any] | None = None,
        columns: Sequence[str] = METRIC_NAMES,
    ) -> None:
        self.static = dict(static or {})
        self.columns = list(columns)
        self._metrics = self._open(Path(path), [*self.static, "step", "wall_time", *self.columns])
        self._fisher = (
            self._open(Path(fisher_path), [*self.static, *FISHER_COLUMNS])
            if fisher_path is not None
            else None
        )

    @staticmethod
    def _open(path: Path, header: list[str]) -> tuple[Any, Any]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists() or path.stat().st_size == 0
        handle = path.open("a", newline="", encoding="utf-8")
        writer = csv.writer(handle)
        if fresh:
            writer.writerow(header)
        return handle, writer

    def log_metrics(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None:
        unknown = set(metrics) - set(self.columns)
        if unknown:
            raise ValueError(f"metrics without a CSV column: {sorted(unknown)}")
        row = [*self.static.values(), step, _cell(wall_time), *(_cell(metrics.get(c)) for c in self.columns)]
        self._metrics[1].writerow(row)

    def log_fisher(self, rows: Iterable[Sequence[Any]]) -> None:
        if self._fisher is None:
            return
        for row in rows:
            self._fisher[1].writerow([*self.static.values(), *(_cell(v) for v in row)])

    def flush(self) -> None:
        self._metrics[0].flush()
        if self._fisher is not None:
            self._fisher[0].flush()

    def close(self) -> None:
        self._metrics[0].close()
        if self._fisher is not None:
            self._fisher[0].close()


class MultiSink:
    """Fans every call out to several sinks (e.g. memory for the summary and CSV for the user)."""

    def __init__(self, *sinks: MetricSink) -> None:
        self.sinks = sinks

    def log_metrics(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None:
        for sink in self.sinks:
            sink.log_metrics(step, metrics, wall_time)

    def log_fisher(self, rows: Iterable[Sequence[Any]]) -> None:
        materialised = list(rows)
        for sink in self.sinks:
            sink.log_fisher(materialised)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
