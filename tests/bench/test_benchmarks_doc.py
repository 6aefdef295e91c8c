"""BENCHMARKS.md stays what it is for: current figures with the command behind each, short, and every
command and report it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "BENCHMARKS.md", ROOT / "README.md", ROOT / "docs" / "cluster.md"]


def test_benchmarks_is_short_and_holds_no_history() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert len(text.splitlines()) < 200
    assert not re.search(r"\bissue \d+|\(issue|\b20\d\d-\d\d-\d\d\b", text), "history belongs to git"


def test_every_bench_command_and_report_named_in_the_docs_exists() -> None:
    for doc in DOCS:
        text = doc.read_text()
        for module in re.findall(r"python3? -m bench\.([a-z_]+)\b", text):
            assert (ROOT / "bench" / f"{module}.py").exists(), f"{doc.name}: bench.{module}"
        for script in re.findall(r"(?<![\w/])bench/(\w+\.(?:py|sh|yaml))", text):
            assert (ROOT / "bench" / script).exists(), f"{doc.name}: bench/{script}"
        for report in re.findall(r"bench/results/([\w./-]+\w)", text):
            assert (ROOT / "bench" / "results" / report).exists(), f"{doc.name}: bench/results/{report}"


def test_readme_links_point_to_existing_benchmark_sections() -> None:
    headings = {
        re.sub(r"[^\w\- ]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in (ROOT / "BENCHMARKS.md").read_text().splitlines()
        if line.startswith("## ")
    }
    anchors = re.findall(r"BENCHMARKS\.md#([\w-]+)", (ROOT / "README.md").read_text())
    assert anchors and set(anchors) <= headings, (anchors, headings)
