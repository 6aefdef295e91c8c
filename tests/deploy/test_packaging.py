"""The wheel carries what a plain `pip install .` needs: migrations, dashboard assets, the CLI."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_migrations_and_dashboard(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("dykaf_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "migrations/env.py" in names and "migrations/script.py.mako" in names
    assert any(n.startswith("migrations/versions/") and n.endswith(".py") for n in names)
    assert "web/templates/job.html" in names
    assert any(n.startswith("web/static/js/") for n in names)
    assert "dykaf/optimizer.py" in names and "dykaf/fisher/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dykaf-lab = worker.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith("tests/") for n in names)
