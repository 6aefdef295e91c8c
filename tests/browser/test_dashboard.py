"""The dashboard in a real browser: Debian's Chromium (Playwright) against a real uvicorn server and
a real Celery worker (embedded mode: SQLite + the SQLAlchemy broker).

Covered: the JS units against their Python counterparts; validation messages from the browser's
own checks and from the API's 422; a job created from the form runs to ``succeeded`` while its
page updates live, with the expected number of traces in the loss and Fisher charts; the three CSV
downloads; cancelling a running job from the job list and deleting it from its page; a hostile job
name stays text; the job list reconnects after the server restarts.

Without /usr/bin/chromium the tests skip (and fail under ``DYKAF_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from server.core.config import Settings
from server.crud.metrics import insert_fisher, insert_metrics
from server.csv_export import FISHER_HEADER, METRICS_HEADER, RUNS_FIXED
from server.db import migrate
from server.db.models import FisherValue, Job, MetricPoint, Run
from server.db.session import dispose_engines, get_engine, session_scope
from tests.support.browser import (
    ServerProcess,
    create_api_key,
    launch_chromium,
    plotly_traces,
    require_chromium,
)
from tests.support.services import FAST, WorkerProcess, tiny_job

TERMINAL = {"succeeded", "failed", "diverged", "cancelled"}
XSS_NAME = "<img src=x onerror=window.__xss=1>"


@dataclass
class Stack:
    settings: Settings
    server: ServerProcess
    worker: WorkerProcess
    key: str
    root: Path

    def api(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(
            f"{self.server.url}/api/v1{path}", data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def get(self, path: str) -> Any:
        status, body = self.api("GET", path, auth=False)
        assert status == 200, (path, status, body)
        return body

    def wait_job(self, job_id: int, ok: Any, timeout: float = 150.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.get(f"/jobs/{job_id}")
            if ok(job):
                return job
            time.sleep(0.2)
        raise AssertionError(
            f"job {job_id}: condition not met in {timeout}s; last {job}\n{self.worker.log()[-3000:]}"
        )


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium()


@pytest.fixture(scope="module")
def stack(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("dashboard")
    settings = Settings(data_dir=root / "lab", **FAST)
    migrate.upgrade(settings.database_url)
    key = create_api_key(settings.database_url)
    server = ServerProcess(settings, root / "server.log").start()
    worker = WorkerProcess(settings, root / "worker.log", "dash")
    try:
        yield Stack(settings, server, worker, key, root)
    finally:
        worker.stop()
        server.stop()
        dispose_engines()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


def open_context(browser: Any, base_url: str, key: str | None) -> Any:
    context = browser.new_context(
        base_url=base_url, viewport={"width": 1366, "height": 900}, accept_downloads=True
    )
    if key:
        context.add_init_script(f"localStorage.setItem('dykaf.apiKey', {json.dumps(key)})")
    return context


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    context = open_context(browser, stack.server.url, stack.key)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(20_000)
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# ---------------------------------------------------------------------------------------- units
def test_js_units_match_python(page: Any, stack: Stack) -> None:
    """stats.js (run count and labels, %g, range checks, EMA) against the Python side. The summary
    is the server's (tests/server/test_summary.py); the page only lays it out."""
    from dykaf.baselines.registry import all_schemas, optimizer_schema, validate_hyperparameters
    from server.jobs.spec import JobSpec

    page.goto("/")
    stats = "const m = await import('/static/js/stats.js');"

    specs = [
        tiny_job(seeds=(0, 1, 2)),
        {**tiny_job(seeds=(0, 1)), "sweep_selection": "first_seed"},
        {
            **tiny_job(seeds=(5,)),
            "optimizers": [
                {"name": "adamw", "sweep": {"lr": [1e-5, 3e-4, 0.001], "beta2": [0.95, 0.999]}},
                {"name": "dykaf", "label": "DyKAF fast", "sweep": {"precondition_1d": [True, False]}},
                {"name": "muon", "sweep": {"lr": [0.02, 0.0125], "nesterov": [True]}},
            ],
        },
    ]
    for spec in specs:
        js = page.evaluate(
            f"async (spec) => {{ {stats} return [m.runCount(spec), m.runLabels(spec)]; }}", spec
        )
        parsed = JobSpec.model_validate(spec)
        assert js[0] == parsed.run_count()
        if parsed.sweep_selection == "all_seeds":
            assert js[1] == [f"{r.label} · seed {r.seed}" for r in parsed.expand()]

    values = [1e-5, 3e-4, 0.1 + 0.2, 123456.7, 1234567.0, -0.00012345678, 2.5, 1e21, 0.5]
    got = page.evaluate(f"async (vs) => {{ {stats} return vs.map(m.formatG); }}", values)
    assert got == [f"{v:g}" for v in values]

    # Client-side range checks agree with the registry for every numeric hyperparameter.
    cases = []
    for schema in all_schemas():
        for hp, entry in schema["hyperparameters"].items():
            if entry["type"] not in ("number", "integer"):
                continue
            probes = {-1.0, 0.0, 0.5, 1.0, 2.5, 1e9}
            for bound in ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum"):
                if bound in entry:
                    probes |= {entry[bound], entry[bound] + 1e-9, entry[bound] - 1e-9}
            cases += [(schema["name"], hp, v) for v in sorted(probes)]
    verdicts = page.evaluate(
        f"""async (cases) => {{ {stats}
            const schemas = await (await fetch('/api/v1/optimizers')).json();
            const by = Object.fromEntries(schemas.map((s) => [s.name, s.hyperparameters]));
            return cases.map(([o, hp, v]) => m.checkValue(by[o][hp], v) === null);
        }}""",
        cases,
    )
    for (name, hp, value), ok_js in zip(cases, verdicts, strict=True):
        try:
            validate_hyperparameters(name, {hp: value})
            ok_py = True
        except ValueError:
            ok_py = False
        assert ok_js == ok_py, (name, hp, value, optimizer_schema(name)["hyperparameters"][hp])

    # Bias-corrected EMA (TensorBoard's smoothing) with a missing value.
    series = [1.0, 2.0, None, 4.0, 3.0]
    weight = 0.6
    expected: list[float | None] = []
    last, k = 0.0, 0
    for v in series:
        if v is None:
            expected.append(None)
            continue
        k += 1
        last = last * weight + (1 - weight) * v
        expected.append(last / (1 - weight**k))
    got_ema = page.evaluate(f"async ([s, w]) => {{ {stats} return m.ema(s, w); }}", [series, weight])
    assert [None if a is None else round(a, 12) for a in got_ema] == [
        None if b is None else round(b, 12) for b in expected
    ]


# ----------------------------------------------------------------------------------- new job
def field(page: Any, loc: str) -> Any:
    return page.locator(f'[data-loc="{loc}"]')


def error_of(page: Any, loc: str) -> Any:
    """The error message element of a field (the one its input's aria-describedby names)."""
    described = field(page, loc).get_attribute("aria-describedby")
    return page.locator(f"#{described}")


TINY_TASK = {
    "n_layer": "1",
    "n_head": "2",
    "d_model": "16",
    "context": "16",
    "batch_size": "4",
    "steps": "30",
    "warmup_steps": "2",
    "eval_every": "10",
    "eval_batches": "1",
    "log_every": "1",
    "fisher_every": "10",
    "corpus.max_chars": "20000",
}


def fill_tiny_form(page: Any, name: str) -> None:
    page.goto("/new")
    page.wait_for_selector("body[data-form-ready='1']")
    field(page, "name").fill(name)
    field(page, "seeds").fill("0, 1")
    field(page, "target_loss").fill("5.2")
    field(page, "device").select_option("cpu")
    for key, value in TINY_TASK.items():
        field(page, f"task.{key}").fill(value)


def test_validation_messages(page: Any) -> None:
    fill_tiny_form(page, "validation")
    assert page.locator(".opt-card").count() == 2
    # Browser-side: a range check next to the field, and the submit is refused.
    lr = field(page, "optimizers.0.hyperparameters.lr")
    lr.fill("-1")
    expect_text(error_of(page, "optimizers.0.hyperparameters.lr"), "≥ 0")
    assert lr.get_attribute("aria-invalid") == "true"
    field(page, "task.steps").fill("abc")
    expect_text(error_of(page, "task.steps"), "not a number")
    page.click("#submit")
    expect_text(page.locator("#form-error"), "Fix the 2 highlighted fields")
    assert "/new" in page.url
    lr.fill("0.003")
    field(page, "task.steps").fill("30")
    assert error_of(page, "optimizers.0.hyperparameters.lr").inner_text() == ""
    # Sweep values are checked too, and the preview counts the grid.
    sweep = field(page, "optimizers.1.sweep.lr")
    sweep.fill("0.001, 20")
    expect_text(error_of(page, "optimizers.1.sweep.lr"), "20")
    sweep.fill("0.001, 0.01")
    expect_text(page.locator("#run-count"), "6")  # (1 + 2 sweep points) x 2 seeds
    sweep.fill("")
    expect_text(page.locator("#run-count"), "4")
    # Server-side: a cross-field rule only the API knows (d_model divisible by n_head) comes back as
    # a 422 whose loc names the task; the message lands in the task's section.
    field(page, "task.n_head").fill("3")
    page.click("#submit")
    expect_text(page.locator('[data-group-loc="task"]'), "divisible by n_head")
    assert "/new" in page.url
    # A duplicate label is caught before submitting.
    field(page, "task.n_head").fill("2")
    page.select_option("#add-optimizer", "adamw")
    page.click("#add-optimizer-button")
    page.click("#submit")
    expect_text(error_of(page, "optimizers.2.label"), "already used")


def expect_text(locator: Any, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            last = locator.inner_text(timeout=1000)
        except Exception:
            last = ""
        if text in last:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not found; last text {last!r}")


def fisher_methods(stack: Stack, job: dict[str, Any], label: str, metric: str) -> dict[str, set[str]]:
    run_ids = "&".join(f"run_id={r['id']}" for r in job["runs"] if r["label"] == label)
    series = stack.get(f"/jobs/{job['id']}/fisher?metric={metric}&{run_ids}")["series"]
    out: dict[str, set[str]] = {}
    for s in series:
        out.setdefault(s["layer"], set()).add(s["method"])
    return out


def test_form_job_runs_live_with_charts_and_downloads(page: Any, stack: Stack, browser: Any) -> None:
    fill_tiny_form(page, "form job")
    expect_text(page.locator("#run-count"), "4")
    spec_preview = json.loads(page.locator("#spec-json").text_content())
    assert spec_preview["seeds"] == [0, 1] and spec_preview["task"]["steps"] == 30
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])

    # Live: the page shows the job running (or already further), then succeeded, without reloads.
    page.wait_for_selector("#job-title .badge", timeout=30_000)
    seen = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = page.get_attribute("#job-title .badge", "data-status")
        seen.add(status)
        if status in TERMINAL:
            break
        time.sleep(0.25)
    assert status == "succeeded", (seen, stack.worker.log()[-3000:])
    assert seen & {"queued", "running"}, seen
    job = stack.get(f"/jobs/{job_id}")
    assert [r["status"] for r in job["runs"]] == ["succeeded"] * 4

    # Loss curves: per label a mean line and a min-max band across the two seeds.
    page.wait_for_function(
        "() => ['#chart-train', '#chart-val'].every((s) => { const el = document.querySelector(s); "
        "return el && el.data && el.data.length === 4; })"
    )
    assert plotly_traces(page, "#chart-train") == 4 and plotly_traces(page, "#chart-val") == 4
    roles = page.evaluate("document.querySelector('#chart-val').data.map((t) => [t.meta.role, t.meta.label])")
    assert roles == [["band", "adamw"], ["mean", "adamw"], ["band", "dykaf"], ["mean", "dykaf"]]
    val_steps = page.evaluate("document.querySelector('#chart-val').data[1].x")
    assert val_steps == [0, 10, 20, 30]
    # Individual seeds on demand: one more line per run.
    page.check("#show-seeds")
    page.wait_for_function("() => document.querySelector('#chart-train').data.length === 8")
    # Tokens on the x-axis: batch 4 x context 16 tokens per step.
    page.select_option("#x-axis", "tokens")
    page.wait_for_function("() => document.querySelector('#chart-val').data[1].x[1] === 640")
    page.select_option("#x-axis", "time")
    page.wait_for_function(
        "() => { const x = document.querySelector('#chart-val').data[1].x; "
        "return x[3] > x[1] && x[3] < 600; }"
    )
    page.check("#log-y")
    page.wait_for_function("() => document.querySelector('#chart-train').layout.yaxis.type === 'log'")
    assert page.evaluate("document.querySelector('#chart-train').layout.shapes[0].y0") == 5.2
    page.uncheck("#show-seeds")
    page.uncheck("#log-y")
    page.select_option("#x-axis", "step")
    page.wait_for_function("() => document.querySelector('#chart-train').data.length === 4")

    # Fisher fidelity: one kron_rel_err trace per method measured on the selected label's runs.
    expected = fisher_methods(stack, job, "dykaf", "kron_rel_err")
    assert expected and all({"optimal", "own"} <= m for m in expected.values()), expected
    for layer, methods in expected.items():
        sel = f'[data-chart="fisher:kron_rel_err:{layer}"]'
        page.wait_for_function(
            f"() => {{ const el = document.querySelector('{sel}'); return el && el.data; }}"
        )
        assert plotly_traces(page, sel) == len(methods), (layer, methods)
        assert (
            plotly_traces(page, f'[data-chart="fisher:precond_rel_err:{layer}"]') == 1
        )  # only DyKAF has one
        diag = fisher_methods(stack, job, "dykaf", "diag_mass")[layer]
        assert plotly_traces(page, f'[data-chart="fisher:diag_mass:{layer}"]') == len(diag)
    assert page.locator(".fisher-layer").count() == len(expected)
    page.select_option("#fisher-label", "adamw")
    adamw = fisher_methods(stack, job, "adamw", "kron_rel_err")
    layer, methods = next(iter(adamw.items()))
    assert "own" not in methods
    page.wait_for_function(
        f"() => document.querySelector('[data-chart=\"fisher:kron_rel_err:{layer}\"]')"
        f".data.length === {len(methods)}"
    )
    page.select_option("#fisher-label", "dykaf")
    # Every optimizer's gradient stream in one table, the numbers the Python side computes too.
    from worker.fisher_plot import fisher_means, rows_from_series

    kron = stack.get(f"/jobs/{job['id']}/fisher?metric=kron_rel_err")["series"]
    means = fisher_means(rows_from_series(kron))
    page.click("#fisher-streams summary")
    assert page.locator("#fisher-streams tbody tr").count() == 2
    header = page.locator("#fisher-streams thead th").all_text_contents()
    assert header[:5] == ["gradients of", "own", "DyKAF", "DyKAF-seq", "SOAP/Shampoo"], header
    for label in ("adamw", "dykaf"):
        cells = page.locator(f'#fisher-streams tbody tr[data-label="{label}"] td').all_text_contents()
        shown = dict(zip(header, cells, strict=True))
        gaps = [
            value - means[(label, layer, "kron_rel_err", "optimal")][step]
            for (lb, layer, metric, method), values in means.items()
            if (lb, metric, method) == (label, "kron_rel_err", "dykaf")
            for step, value in values.items()
        ]
        assert gaps and shown["DyKAF"] == f"{sum(gaps) / len(gaps):.4f}", (label, shown)

    # Summary and runs tables: the server's summary, laid out (best marks and winner included).
    summary = stack.get(f"/jobs/{job_id}/summary")
    assert page.locator("#summary-table tbody tr").count() == 2
    assert page.locator('#summary-table td[data-col="runs"]').all_inner_texts() == ["2/2", "2/2"]
    marked = {
        (c.get_attribute("data-col"), c.evaluate("(td) => td.parentElement.dataset.label"))
        for c in page.locator("#summary-table td.best").all()
    }
    assert marked and marked == {(k, label) for k, labels in summary["best"].items() for label in labels}
    shown = page.locator('#summary-table tr[data-label="dykaf"] td[data-col="final_val_loss"]').inner_text()
    row = next(r for r in summary["rows"] if r["label"] == "dykaf")
    assert shown == f"{row['final_val_loss_mean']:.3f} ± {row['final_val_loss_std']:.3f}"
    assert (
        summary["winner_text"]
        and page.locator("#summary-winner").inner_text() == f"Best: {summary['winner_text']}"
    )
    # The Fisher probes' own cost, per optimizer (diagnostics ran every 10 steps): a percentage.
    diag_cells = page.locator('#summary-table td[data-col="fisher_overhead"]').all_inner_texts()
    percentages = [re.fullmatch(r"\d+(\.\d)?\s?%", c.strip()) for c in diag_cells]
    assert len(diag_cells) == 2 and all(percentages), diag_cells
    assert page.locator('#summary-table td.best[data-col="fisher_overhead"]').count() == 0
    assert page.locator("#runs-table tbody tr").count() == 4
    assert page.locator("#runs-table tbody tr").first.get_attribute("data-status") == "succeeded"

    # Downloads: with the key (fetched with Authorization, handed over as a blob) ...
    with session_scope(stack.settings.database_url) as session:
        n_metrics = session.scalar(
            select(func.count()).select_from(MetricPoint).join(Run).where(Run.job_id == job_id)
        )
        n_fisher = session.scalar(
            select(func.count()).select_from(FisherValue).join(Run).where(Run.job_id == job_id)
        )
    downloads = {}
    for kind in ("metrics_csv", "runs_csv", "summary_csv", "fisher_csv"):
        with page.expect_download() as info:
            page.click(f'[data-download="{kind}"]')
        download = info.value
        assert download.suggested_filename == f"job-{job_id}-{kind.replace('_csv', '')}.csv"
        downloads[kind] = list(csv.reader(io.StringIO(Path(download.path()).read_text())))
    assert tuple(downloads["metrics_csv"][0]) == METRICS_HEADER
    assert len(downloads["metrics_csv"]) - 1 == n_metrics > 0
    assert tuple(downloads["fisher_csv"][0]) == FISHER_HEADER
    assert len(downloads["fisher_csv"]) - 1 == n_fisher > 0
    assert tuple(downloads["runs_csv"][0][: len(RUNS_FIXED)]) == RUNS_FIXED
    assert len(downloads["runs_csv"]) - 1 == 4
    assert [r[1] for r in downloads["summary_csv"]] == ["label", "adamw", "dykaf"]  # one row per optimizer
    # ... and without a key (a plain link: the browser streams the file to disk).
    context = open_context(browser, stack.server.url, None)
    try:
        anon = context.new_page()
        anon.goto(f"/jobs/{job_id}")
        anon.wait_for_selector("body[data-charts='ready']")
        assert anon.locator("button[data-action]").count() == 0  # no write actions without a key
        with anon.expect_download() as info:
            anon.click('[data-download="metrics_csv"]')
        rows = list(csv.reader(io.StringIO(Path(info.value.path()).read_text())))
        assert len(rows) - 1 == n_metrics
    finally:
        context.close()

    # The whole page renders to an image (the README's comes from a real job: docs/screenshot.py).
    target = stack.root / "job.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 50_000

    # The jobs list names the winner of the finished job.
    page.goto("/")
    expect_text(page.locator(f'tr[data-job-id="{job_id}"] td[data-col="winner"]'), summary["winner"]["label"])


@dataclass
class DirectRun:
    """A job with one running run written straight into the database (never enqueued), so a test
    controls exactly when its points arrive; ``advance`` reports progress as a worker would."""

    stack: Stack
    job_id: int
    run_id: int

    def advance(self, step: int) -> None:
        from server.crud import jobs as jobs_crud

        with session_scope(self.stack.settings.database_url) as session:
            jobs_crud.lock_job(session, self.job_id)
            session.execute(update(Run).where(Run.id == self.run_id).values(step=step))


@contextlib.contextmanager
def direct_run(stack: Stack, body: dict[str, Any], step: int) -> Iterator[DirectRun]:
    """``DirectRun`` of ``body``'s first run, running at ``step``; cancelled afterwards."""
    from server.crud import jobs as jobs_crud
    from server.jobs.spec import JobSpec

    with session_scope(stack.settings.database_url) as session:
        job = jobs_crud.create_job(session, JobSpec.model_validate(body), auto_queue="cpu")
        job_id, run_id = job.id, job.runs[0].id
        jobs_crud.lock_job(session, job_id)
        session.execute(update(Run).where(Run.id == run_id).values(status="running", attempt=1, step=step))
        jobs_crud.recompute_job(session, job_id)
    try:
        yield DirectRun(stack, job_id, run_id)
    finally:
        with session_scope(stack.settings.database_url) as session:
            jobs_crud.lock_job(session, job_id)
            session.execute(update(Run).where(Run.job_id == job_id).values(status="cancelled", reason="test"))
            jobs_crud.recompute_job(session, job_id)


def test_curves_grow_live(page: Any, stack: Stack) -> None:
    """A running job's curves and progress follow the database without a reload."""
    engine = get_engine(stack.settings.database_url)
    with direct_run(stack, {**tiny_job(name="live curves", seeds=(0,)), "device": "cpu"}, step=5) as run:

        def points(lo: int, hi: int) -> None:
            with engine.begin() as conn:
                rows = [(run.run_id, "train_loss", s, 5.0 - 0.05 * s, float(s)) for s in range(lo, hi + 1)]
                insert_metrics(conn, rows)
            run.advance(hi)

        points(1, 5)
        page.goto(f"/jobs/{run.job_id}")
        count = (
            "() => { const d = document.querySelector('#chart-train').data; "
            "return d && d.length === 1 ? d[0].x.length : -1; }"
        )
        page.wait_for_function(f"() => ({count})() === 5")
        expect_text(page.locator("#job-progress"), "5/24 steps")
        points(6, 9)
        page.wait_for_function(f"() => ({count})() === 9", timeout=15_000)
        expect_text(page.locator("#job-progress"), "9/24 steps")


def test_summary_lists_only_configurations_whose_curves_are_charted(page: Any, stack: Stack) -> None:
    """Live view, one state: a configuration that finished while its points are still on their way
    is not in the summary table until its curves are on the charts."""
    engine = get_engine(stack.settings.database_url)
    with direct_run(stack, {**tiny_job(name="one state", seeds=(0,)), "device": "cpu"}, step=4) as run:
        with session_scope(stack.settings.database_url) as session:
            from server.crud import jobs as jobs_crud

            jobs_crud.lock_job(session, run.job_id)
            other = session.scalars(select(Run).where(Run.job_id == run.job_id, Run.id != run.run_id)).one()
            other.status, other.step, other.summary = "succeeded", 12, {"final_val_loss": 4.0}
            other_id = other.id
        with engine.begin() as conn:
            insert_metrics(
                conn, [(run.run_id, "train_loss", s, 5.0 - 0.05 * s, float(s)) for s in range(1, 5)]
            )
        run.advance(4)
        page.goto(f"/jobs/{run.job_id}")
        page.wait_for_selector("body[data-charts='ready']")
        expect_text(page.locator("#summary-wrap"), "1 configuration not listed until its curves arrive")
        assert page.locator('#summary-table tr[data-label="dykaf"]').count() == 0
        with engine.begin() as conn:
            insert_metrics(conn, [(other_id, "train_loss", s, 4.0, float(s)) for s in range(1, 13)])
        run.advance(5)
        page.wait_for_selector('#summary-table tr[data-label="dykaf"]', timeout=15_000)
        assert "not listed" not in page.locator("#summary-wrap").inner_text()
        assert page.locator(
            '#summary-table tr[data-label="dykaf"] td[data-col="final_val_loss"]'
        ).inner_text() == ("4.000")


def test_a_job_that_ended_early_says_how_far_it_got(page: Any, stack: Stack) -> None:
    """Cancelled part-way: progress is the steps trained, partial runs are marked and not averaged."""
    from server.crud import jobs as jobs_crud
    from server.jobs.spec import JobSpec

    body = {**tiny_job(name="stopped early", seeds=(0, 1)), "device": "cpu"}
    with session_scope(stack.settings.database_url) as session:
        job = jobs_crud.create_job(session, JobSpec.model_validate(body), auto_queue="cpu")
        job_id = job.id
        jobs_crud.lock_job(session, job_id)
        outcomes = [
            ("succeeded", 12, 3.0),
            ("cancelled", 3, 5.5),
            ("succeeded", 12, 2.5),
            ("cancelled", 0, None),
        ]
        for run, (status, step, loss) in zip(job.runs, outcomes, strict=True):
            run.status, run.step, run.reason = status, step, None if status == "succeeded" else "test"
            run.summary = None if loss is None else {"final_val_loss": loss}
        session.flush()
        jobs_crud.recompute_job(session, job_id)
        run_ids = [run.id for run in job.runs]
    with get_engine(stack.settings.database_url).begin() as conn:
        for run_id, (_, step, _) in zip(run_ids, outcomes, strict=True):
            insert_metrics(conn, [(run_id, "train_loss", s, 4.0, float(s)) for s in range(1, step + 1)])
    page.goto(f"/jobs/{job_id}")
    page.wait_for_selector("body[data-charts='ready']")
    expect_text(page.locator("#job-progress"), "stopped at 56% · 27/48 steps")
    adamw = page.locator('#summary-table tr[data-label="adamw"]')
    assert adamw.get_attribute("data-partial") == "true"
    assert adamw.locator('td[data-col="runs"]').inner_text().split("\n") == [
        "1/2",
        "1 stopped early (not averaged)",
    ]
    assert adamw.locator('td[data-col="final_val_loss"]').inner_text() == "3.000"  # not 4.250
    expect_text(page.locator("#summary-wrap"), "counted but not averaged")
    assert page.locator("#summary-winner").count() == 0  # no winner of an incomplete comparison
    page.goto("/")
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    expect_text(row, "27/48 steps")
    assert row.locator('td[data-col="winner"]').inner_text() == "–"


def test_one_fisher_report_is_a_dot_plot_until_the_next_arrives(page: Any, stack: Stack) -> None:
    """A run that has reported once (a short run reports only at its last step) shows each method
    side by side, the floor as a line; a second report turns the same charts into curves."""
    engine = get_engine(stack.settings.database_url)
    layer = "blocks.0.attn.qkv.weight"
    values = {"optimal": 0.50, "dykaf": 0.52, "dykaf_seq": 0.53, "soap_shampoo": 0.61}
    body = {**tiny_job(name="one report", seeds=(0,)), "optimizers": [{"name": "dykaf"}]}
    chart = f"document.querySelector('[data-chart=\"fisher:kron_rel_err:{layer}\"]')"
    with direct_run(stack, body, step=10) as run:

        def report(step: int, shift: float) -> None:
            with engine.begin() as conn:
                rows = [(run.run_id, step, layer, m, "kron_rel_err", v + shift) for m, v in values.items()]
                insert_fisher(conn, rows)
            run.advance(step)

        report(10, 0.0)
        page.goto(f"/jobs/{run.job_id}")
        page.wait_for_function(f"() => {chart} && {chart}.data && {chart}.data.length === 4")
        shown = page.evaluate(
            f"""() => {{ const el = {chart};
                return {{ type: el.layout.yaxis.type, title: el.layout.title.text,
                          points: el.data.map((t) => [t.y[0], t.x[0]]),
                          floor: el.layout.shapes.map((s) => s.x0) }}; }}"""
        )
        assert shown["type"] == "category" and shown["title"].endswith("step 10"), shown
        # Top-down in the legend's order (Plotly draws the first category at the bottom).
        names = ["optimal (floor)", "DyKAF", "DyKAF-seq", "SOAP/Shampoo"]
        assert shown["points"] == [[n, v] for n, v in zip(names, values.values(), strict=True)][::-1]
        assert shown["floor"] == [values["optimal"]]
        # The verdict: every method's mean distance to the floor, and DyKAF's share of SOAP's gap.
        expect_text(
            page.locator("#fisher-verdict"),
            "On dykaf's gradients (1 layer × 1 report), mean kron_rel_err above the floor: "
            "DyKAF 0.0200 · DyKAF-seq 0.0300 · SOAP/Shampoo 0.1100. "
            "DyKAF's factors close 82% of SOAP/Shampoo's gap.",
        )
        assert page.locator("#fisher-streams").is_hidden()  # one gradient stream: the line says it all
        report(20, -0.1)
        page.wait_for_function(f"() => {chart}.data[0].x.length === 2", timeout=15_000)
        assert page.evaluate(f"() => [{chart}.layout.yaxis.type, {chart}.data[0].x]") == ["linear", [10, 20]]


def test_new_job_from_an_existing_spec(page: Any, stack: Stack) -> None:
    """ "Edit as new job" opens the form filled with the job's spec (sweeps and labels included)."""
    from server.crud import jobs as jobs_crud
    from server.jobs.spec import JobSpec

    raw = tiny_job(name="template", seeds=(3, 4, 5))
    raw["target_loss"] = 4.25
    raw["optimizers"] = [
        {"name": "adamw", "hyperparameters": {"lr": 0.002}, "sweep": {"beta2": [0.95, 0.99]}},
        {"name": "dykaf", "label": "DyKAF slow", "hyperparameters": {"lr": 0.001}},
    ]
    with session_scope(stack.settings.database_url) as session:
        job = jobs_crud.create_job(session, JobSpec.model_validate(raw), auto_queue="cpu")
        job_id = job.id
        jobs_crud.lock_job(session, job_id)
        session.execute(update(Run).where(Run.job_id == job_id).values(status="cancelled", reason="test"))
        jobs_crud.recompute_job(session, job_id)
    page.goto(f"/jobs/{job_id}")
    page.click('[data-action="copy"]')
    page.wait_for_selector("body[data-form-ready='1']")
    expect_text(page.locator("#new-banner"), f"job #{job_id}")
    assert field(page, "name").input_value() == "template"
    assert field(page, "seeds").input_value() == "3, 4, 5"
    assert field(page, "target_loss").input_value() == "4.25"
    assert field(page, "task.steps").input_value() == "12"
    assert field(page, "optimizers.0.hyperparameters.lr").input_value() == "0.002"
    assert field(page, "optimizers.0.sweep.beta2").input_value() == "0.95, 0.99"
    assert field(page, "optimizers.1.label").input_value() == "DyKAF slow"
    expect_text(page.locator("#run-count"), "9")  # (2 sweep points + 1) x 3 seeds
    preview = json.loads(page.locator("#spec-json").text_content())
    assert preview["optimizers"][0]["sweep"] == {"beta2": [0.95, 0.99]}
    assert preview["optimizers"][1] == {
        "name": "dykaf",
        "label": "DyKAF slow",
        "hyperparameters": {"lr": 0.001},
    }


def test_cancel_from_job_list_then_delete(page: Any, stack: Stack) -> None:
    spec = tiny_job(name="long job", steps=5000, seeds=(0,))
    spec["optimizers"] = [{"name": "adamw"}]
    spec["task"].update(eval_every=1000, fisher_every=0, checkpoint_every=0, log_every=5)
    status, job = stack.api("POST", "/jobs", spec)
    assert status == 201, job
    job_id = job["id"]
    stack.wait_job(
        job_id, lambda j: j["runs"][0]["status"] == "running" and j["runs"][0]["step"] > 0, timeout=90
    )

    page.goto("/")
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    expect_attr(row, "data-status", "running")
    row.locator('[data-action="cancel"]').click()
    expect_text(page.locator("#confirm-text"), "Cancel job")
    page.click("#confirm-yes")
    expect_attr(row, "data-status", "cancelled", timeout=30)
    job = stack.get(f"/jobs/{job_id}")
    assert job["status"] == "cancelled" and job["runs"][0]["step"] < 5000
    assert job["runs"][0]["reason"]

    # Status filter: the cancelled job is listed under "cancelled" and not under "succeeded".
    page.select_option("#status-filter", "succeeded")
    page.wait_for_function(f"() => !document.querySelector('tr[data-job-id=\"{job_id}\"]')")
    page.select_option("#status-filter", "cancelled")
    page.wait_for_selector(f'tr[data-job-id="{job_id}"]')
    assert "status=cancelled" in page.url

    # Delete from the job page, after confirming.
    page.goto(f"/jobs/{job_id}")
    page.click('[data-action="delete"]')
    expect_text(page.locator("#confirm-text"), "cannot be undone")
    page.click("#confirm-yes")
    page.wait_for_url(re.compile(r"/$|/\?"))
    status, _ = stack.api("GET", f"/jobs/{job_id}", auth=False)
    assert status == 404


def expect_attr(locator: Any, name: str, value: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = locator.get_attribute(name, timeout=1000)
        except Exception:
            last = None
        if last == value:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never became {value!r} (last {last!r})")


def test_hostile_names_stay_text(page: Any, stack: Stack) -> None:
    """Names are validated by the API, but older rows or other writers may hold anything: the
    dashboard renders them as text everywhere (list, page title, tables, chart legends)."""
    status, job = stack.api("POST", "/jobs", tiny_job(name="to be renamed", seeds=(0,)))
    assert status == 201
    job_id = job["id"]
    stack.api("POST", f"/jobs/{job_id}/cancel")
    label = "<b>bold</b><img src=y onerror=window.__xss=2>"
    with session_scope(stack.settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(name=XSS_NAME))
        session.execute(update(Run).where(Run.job_id == job_id, Run.label == "adamw").values(label=label))
        run_id = session.scalar(select(Run.id).where(Run.job_id == job_id, Run.label == label))
    # A few points so that the label reaches the chart legends too.
    with get_engine(stack.settings.database_url).begin() as conn:
        insert_metrics(conn, [(run_id, "train_loss", s, 5.0 - 0.1 * s, float(s)) for s in range(1, 6)])
    page.goto("/")
    page.wait_for_selector(f'tr[data-job-id="{job_id}"]')
    assert page.locator(f'tr[data-job-id="{job_id}"] td.name a').inner_text() == XSS_NAME
    page.goto(f"/jobs/{job_id}")
    expect_text(page.locator("#job-title"), XSS_NAME)
    expect_text(page.locator("#runs-table"), label)
    page.wait_for_selector("body[data-charts='ready']")
    assert XSS_NAME in page.title()
    time.sleep(0.5)
    assert page.evaluate("window.__xss") is None
    assert page.locator("img").count() == 0
    assert page.locator("b", has_text="bold").count() == 0
    # Plotly draws the label literally in the legend (its pseudo-HTML is escaped).
    page.wait_for_selector("#chart-train .legendtext")
    assert label in page.locator("#chart-train .legendtext").all_text_contents()


def test_job_list_reconnects_after_server_restart(browser: Any, stack: Stack) -> None:
    server = ServerProcess(stack.settings, stack.root / "server2.log").start()
    context = open_context(browser, server.url, None)
    try:
        page = context.new_page()
        page.goto("/")
        page.wait_for_selector("body[data-loaded='1']")
        assert page.locator("tr[data-job-id]").count() >= 1
        server.stop()
        page.wait_for_selector("body[data-conn='offline']", timeout=30_000)
        expect_text(page.locator("#conn-status"), "retrying")
        expect_text(page.locator("#jobs-banner"), "Live updates paused")
        server.start()
        page.wait_for_selector("body[data-conn='online']", timeout=45_000)
        page.wait_for_function("() => document.querySelector('#jobs-banner').children.length === 0")
        # The empty state for a filter with no match.
        page.fill("#name-filter", "no job has this name")
        expect_text(page.locator("#jobs-state"), "No jobs match")
    finally:
        context.close()
        server.stop()


def test_missing_job_and_empty_states(page: Any, stack: Stack) -> None:
    page.goto("/jobs/999999")
    expect_text(page.locator("#job-root"), "Job 999999 not found")


def test_reads_behind_a_key(browser: Any, stack: Stack) -> None:
    """A deployment that requires keys for reads: the list explains the 401, and pasting a key
    into the top bar loads it without a reload."""
    server = ServerProcess(stack.settings.with_(reads_require_key=True), stack.root / "server3.log").start()
    context = open_context(browser, server.url, None)
    try:
        page = context.new_page()
        page.goto("/")
        expect_text(page.locator("#jobs-state"), "Set an API key")
        page.fill("#api-key", stack.key)
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("tr[data-job-id]", timeout=30_000)
        assert page.evaluate("localStorage.getItem('dykaf.apiKey')") == stack.key
        page.click("#key-clear")
        assert page.evaluate("localStorage.getItem('dykaf.apiKey')") is None
    finally:
        context.close()
        server.stop()


def test_classify_job_shows_its_task_metric_column_and_chart(page: Any, stack: Stack) -> None:
    """A classification job: the summary table leads with the accuracy column (best = highest) and a
    third chart draws the validation accuracy."""
    from server.crud import jobs as jobs_crud
    from server.jobs.spec import JobSpec

    body = {
        **tiny_job(name="classify demo", seeds=(0,)),
        "device": "cpu",
        "task": {
            "kind": "classify",
            "steps": 4,
            "warmup_steps": 1,
            "finetune": {"model": "builtin:tiny-bert"},
        },
    }
    with session_scope(stack.settings.database_url) as session:
        job = jobs_crud.create_job(session, JobSpec.model_validate(body), auto_queue="cpu")
        job_id = job.id
        jobs_crud.lock_job(session, job_id)
        for run, acc in zip(job.runs, (0.6, 0.8), strict=True):
            run.status, run.step = "succeeded", 4
            run.summary = {"final_val_loss": 1.0, "final_val_accuracy": acc}
        session.flush()
        jobs_crud.recompute_job(session, job_id)
        run_ids = [run.id for run in job.runs]
    with get_engine(stack.settings.database_url).begin() as conn:
        for run_id, acc in zip(run_ids, (0.6, 0.8), strict=True):
            insert_metrics(conn, [(run_id, "train_loss", s, 1.0, float(s)) for s in range(1, 5)])
            insert_metrics(conn, [(run_id, "val_accuracy", s, acc * s / 4, float(s)) for s in (0, 2, 4)])
    page.goto(f"/jobs/{job_id}")
    page.wait_for_selector("body[data-charts='ready']")
    assert page.locator("#chart-quality-box").is_visible()
    page.wait_for_function("() => (document.querySelector('#chart-quality').data || []).length > 0")
    names = page.evaluate("document.querySelector('#chart-quality').data.map((t) => t.meta && t.meta.label)")
    assert {"adamw", "dykaf"} <= set(names)
    dykaf = page.locator('#summary-table tr[data-label="dykaf"] td[data-col="final_val_accuracy"]')
    assert dykaf.inner_text() == "0.800"
    assert "best" in (dykaf.get_attribute("class") or "")
    expect_text(page.locator("#summary-winner"), "val accuracy 0.8000")
