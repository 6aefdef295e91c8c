"""The dashboard colours each optimizer as the PNGs do (``server/palette.py``): its rule for labels
against the Python one, and the traces a job page actually draws."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from server import palette
from server.core.config import Settings
from server.crud.metrics import insert_fisher, insert_metrics
from server.db import migrate
from server.db.session import dispose_engines, get_engine
from tests.support.browser import create_api_key, launch_chromium, require_chromium, running_server
from tests.support.services import FAST, tiny_job


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Settings, str, str]]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("colors")
    settings = Settings(data_dir=root / "lab", **FAST)
    migrate.upgrade(settings.database_url)
    key = create_api_key(settings.database_url)
    with running_server(settings, root / "server.log") as server, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(base_url=server.url)
        page.set_default_timeout(30_000)
        yield page, settings, key, server.url
        browser.close()
    dispose_engines()


PAIRS = [
    ["soap", "soap"],
    ["adamw", "adamw"],
    ["DyKAF fast", "dykaf"],
    ["dykaf[lr=0.02]", "dykaf"],
    ["mystery", "not-registered"],
    ["muon", "muon"],
]


def test_js_colour_rule_is_the_python_one(served: tuple[Any, Settings, str, str]) -> None:
    page = served[0]
    page.goto("/")
    js = page.evaluate(
        "async (pairs) => { const m = await import('/static/js/charts.js');"
        " return { labels: [...m.colorMap(pairs)], methods: m.METHOD_STYLE }; }",
        PAIRS,
    )
    assert dict(js["labels"]) == palette.label_colors((label, opt) for label, opt in PAIRS)
    assert {m: style["color"] for m, style in js["methods"].items()} == {
        m: color for m, (_, color, _) in palette.METHOD_STYLE.items()
    }


def test_a_job_page_draws_each_optimizer_in_its_colour(served: tuple[Any, Settings, str, str]) -> None:
    page, settings, key, url = served
    spec = {
        **tiny_job(),
        "optimizers": [{"name": "soap"}, {"name": "adamw"}, {"name": "dykaf", "label": "DyKAF fast"}],
    }
    request = urllib.request.Request(
        f"{url}/api/v1/jobs",
        data=json.dumps(spec).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        job = json.loads(response.read())
    rows, fisher = [], []
    for run in job["runs"]:
        for step in range(1, 13):
            rows.append((run["id"], "train_loss", step, 4.0 - 0.1 * step, step * 0.01))
        for method, value in (("optimal", 0.5), ("dykaf", 0.52), ("soap_shampoo", 0.6), ("own", 0.55)):
            fisher.append((run["id"], 12, "blocks.0.attn.qkv.weight", method, "kron_rel_err", value))
    with get_engine(settings.database_url).begin() as conn:
        insert_metrics(conn, rows)
        insert_fisher(conn, fisher)
    page.goto(f"/jobs/{job['id']}")
    deadline = time.monotonic() + 30
    drawn: dict[str, str] = {}
    while time.monotonic() < deadline and len(drawn) < 3:
        drawn = page.evaluate(
            "() => Object.fromEntries((document.getElementById('chart-train').data || [])"
            ".filter((t) => t.meta && t.meta.role === 'mean').map((t) => [t.meta.label, t.line.color]))"
        )
        time.sleep(0.2)
    expected = palette.label_colors((run["label"], run["optimizer"]) for run in job["runs"])
    assert expected == {
        "soap": palette.OPTIMIZER_COLORS["soap"],
        "adamw": palette.OPTIMIZER_COLORS["adamw"],
        "DyKAF fast": palette.OPTIMIZER_COLORS["dykaf"],
    }
    assert {label: drawn.get(label) for label in expected} == expected, drawn
