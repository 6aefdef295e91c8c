"""bench/ is a package: every script runs as ``python -m bench.NAME`` and as ``python bench/NAME.py``,
imports its siblings as ``bench.NAME`` and never imports tests/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
PREAMBLE = "if not __package__:"


def _imports(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_a_script_imports_the_repository_as_packages_only(script: Path) -> None:
    source = script.read_text()
    tree = ast.parse(source)
    siblings = {p.stem for p in SCRIPTS} | {"_common"}
    for name in _imports(tree):
        top = name.split(".")[0]
        assert top != "tests", f"{script.name} imports {name}: a benchmark must not import tests/"
        assert top not in siblings, f"{script.name} imports {name}: import siblings as bench.{top}"
    # The only sys.path change is the start-up line that makes `python bench/NAME.py` behave like
    # `python -m bench.NAME` (repository root instead of bench/ as the first entry).
    assert "sys.path.insert" not in source and "sys.path.append" not in source
    assert source.count("sys.path[0] =") == 1 and PREAMBLE in source, script.name
    assert 'if __name__ == "__main__":' in source, f"{script.name} is not runnable"
    assert ast.get_docstring(tree), f"{script.name} does not say what question it answers"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_script_answers_help_as_a_module(script: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{script.stem}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:200]


def test_a_script_run_by_path_imports_its_siblings_through_the_package(tmp_path: Path) -> None:
    # fisher_breakdown imports bench.gpu_check and bench._common: that works from any directory.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fisher_breakdown.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fisher_time_s" in proc.stdout


def test_markdown_table_aligns_numbers_right() -> None:
    from bench._common import markdown_table

    table = markdown_table(["shape", "ms"], [("48×32", 1.5)])
    assert table.splitlines() == ["| shape | ms |", "|---|---:|", "| 48×32 | 1.5 |"]
