"""Take the README's job-page screenshot from a real job on a running server.

    ./lab up                                      # submits examples/quick.yaml; wait until it succeeds
    .venv/bin/python docs/screenshot.py --job 1   # → docs/screenshots/job.png

The page is opened in Debian's Chromium through Playwright (the browser the dashboard tests use),
1366 px wide, and captured once every chart has been drawn (the dashboard's
``dykaf:charts-rendered`` performance mark). The README shows what a user's first job looks like,
so the screenshot comes from the job ``./lab up`` runs, not from a test's toy job.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DYKAF_CHROMIUM", "/usr/bin/chromium")  # Debian's, never a downloaded one
WIDTH = 1366


def job_status(server: str, job_id: int) -> str:
    with urllib.request.urlopen(f"{server.rstrip('/')}/api/v1/jobs/{job_id}", timeout=10) as response:
        return str(json.load(response)["status"])


def capture(server: str, job_id: int, out: Path, timeout_s: float = 60.0) -> None:
    from playwright.sync_api import sync_playwright

    status = job_status(server, job_id)
    if status != "succeeded":
        raise SystemExit(f"job {job_id} is {status!r}: wait until it has succeeded")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            page.goto(f"{server.rstrip('/')}/jobs/{job_id}")
            page.wait_for_function(
                "performance.getEntriesByName('dykaf:charts-rendered').length > 0", timeout=timeout_s * 1000
            )
            page.wait_for_timeout(500)  # Plotly's transitions
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--job", type=int, required=True, help="id of a finished job")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots" / "job.png")
    args = parser.parse_args(argv)
    capture(args.server, args.job, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
