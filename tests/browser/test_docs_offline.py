"""The API documentation pages (/docs, /redoc) render with no network beyond the server itself:
their Swagger UI and ReDoc assets come from an installed package, not a CDN."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from server.core.config import Settings
from server.db import migrate
from server.db.session import dispose_engines
from tests.support.browser import launch_chromium, require_chromium, running_server
from tests.support.services import FAST


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    root = tmp_path_factory.mktemp("docs")
    settings = Settings(data_dir=root / "lab", **FAST)
    migrate.upgrade(settings.database_url)
    with running_server(settings, root / "server.log") as server:
        yield server.url
    dispose_engines()


@pytest.fixture
def offline_page(server_url: str) -> Iterator[tuple[Any, list[str]]]:
    """A page whose requests to any other host than the server are aborted (and recorded)."""
    from playwright.sync_api import sync_playwright

    server_host = urlsplit(server_url).netloc
    blocked: list[str] = []

    def route(request_route: Any) -> None:
        url = request_route.request.url
        if urlsplit(url).netloc == server_host or url.startswith(("data:", "blob:")):
            request_route.continue_()
        else:
            blocked.append(url)
            request_route.abort()

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(base_url=server_url)
        page.set_default_timeout(30_000)
        page.route("**/*", route)
        yield page, blocked
        browser.close()


def test_swagger_ui_renders_every_operation_offline(offline_page: tuple[Any, list[str]]) -> None:
    page, blocked = offline_page
    page.goto("/docs")
    page.wait_for_selector(".opblock-summary-path", state="attached")
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/api/v1/jobs" in path for path in paths), paths
    assert page.locator(".info .title").inner_text().startswith("dykaf-lab")
    assert blocked == []


def test_redoc_renders_offline(offline_page: tuple[Any, list[str]]) -> None:
    page, blocked = offline_page
    page.goto("/redoc")
    page.wait_for_selector("text=Submit a comparison job", state="attached")
    # ReDoc's bundle links its "powered by" logo to its CDN: decoration, the page is complete without.
    assert [url for url in blocked if not url.endswith("/logo-mini.svg")] == []


def test_docs_assets_come_from_the_server(server_url: str) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{server_url}/docs", timeout=10) as response:
        html = response.read().decode()
    assert "cdn" not in html.lower() and "https://" not in html
