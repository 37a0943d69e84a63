"""End to end in headless Chromium against the real server (`python -m cdp.cli serve`).

Debian's `chromium` is driven through Playwright's Python API with `executable_path`; the
browser is never downloaded. If it cannot start the tests fail (in CI and locally alike).
Screenshots go to `test-artifacts/dashboards/`.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from cdp import migrate
from cdp.auth import Role
from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from identity.rules import IdentityRules
from tests.conftest import make_key
from tests.dashboards.conftest import aware, load_job_runs

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "dashboards"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EVENTS = 3000


@dataclass(frozen=True)
class Server:
    """The running server and the keys to use it."""

    url: str
    viewer_key: str
    admin_key: str

    def api(self, path: str, **params: str) -> httpx.Response:
        """GET a management API route with the admin key."""
        return httpx.get(
            self.url + path,
            params=params,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=30,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_up(url: str, process: subprocess.Popen[bytes], deadline_s: float) -> None:
    """Poll /healthz until the server answers (a readiness condition, not a fixed sleep)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not answer /healthz in time")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The platform served on a free port over a seeded warehouse."""
    from benchmarks.dashboards import seed_warehouse
    from benchmarks.dashboards_sample import seed_ledger, seed_segments

    data_dir = tmp_path_factory.mktemp("dashboards-e2e")
    settings = Settings(data_dir=data_dir)
    migrate.upgrade(settings.db_url)
    db = Database(settings.db_url)
    viewer_key = make_key(db, Role.viewer, "e2e viewer")
    admin_key = make_key(db, Role.admin, "e2e admin")
    today = datetime.now(UTC).date()
    load_job_runs(
        db,
        [
            ("ingestion.pull", "succeeded", aware(today - timedelta(days=d), 3))
            for d in range(0, 20, 2)
        ]
        + [("identity.resolve", "failed", aware(today - timedelta(days=d), 4)) for d in (1, 5)],
    )
    db.dispose()
    with Warehouse(settings.warehouse_file, memory_limit="1GB", threads=2) as warehouse:
        seed_warehouse(warehouse, EVENTS, days=60, end=today)
        # Orders get amounts, identity resolves them into profiles, and the benchmark's
        # set-based seeders add a programme with its ledger and three segments with history.
        warehouse.execute(
            Query(
                "UPDATE events SET properties = json_object('total', event_id % 97 + 5) "
                "WHERE event = 'Order Completed'"
            )
        )
        identity_service.resolve(warehouse, settings=settings, rules=IdentityRules())
        db = Database(settings.db_url)
        seed_ledger(db, warehouse, history_end=datetime.now(UTC))
        seed_segments(db, warehouse, last=today)
        db.dispose()
    port = _free_port()
    env = {
        **os.environ,
        "CDP_DATA_DIR": str(data_dir),
        "CDP_SCHEDULER__ENABLED": "false",
        "CDP_LOG_JSON": "false",
        "CDP_LOG_LEVEL": "WARNING",
        "CDP_DUCKDB_THREADS": "2",
        "CDP_DUCKDB_MEMORY_LIMIT": "1GB",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "cdp.cli", "serve", "--port", str(port), "--no-scheduler"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_until_up(url, process, 60)
        except RuntimeError as exc:
            process.kill()
            _, err = process.communicate(timeout=10)
            pytest.fail(f"{exc}: {err.decode(errors='replace')[-2000:]}")
        yield Server(url=url, viewer_key=viewer_key, admin_key=admin_key)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium under Playwright; failing (never skipping) when it cannot start."""
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as exc:  # turned into a failure: a missing browser must be seen
            pytest.fail(
                f"headless Chromium could not start ({CHROMIUM}; CI={os.environ.get('CI')!r}): "
                f"install Debian's chromium package. {type(exc).__name__}: {exc}"
            )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    """A fresh browser context (no cookies) on a laptop-sized window."""
    context = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True)
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert errors == [], errors


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _sign_in(page: Page, server: Server, path: str = "/dashboards/data-health") -> None:
    page.goto(server.url + path)
    assert "/dashboards/sign-in" in page.url
    page.fill("#api_key", server.viewer_key)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{path}*")
    if path != "/dashboards":
        _ready(page)


def _ready(page: Page) -> None:
    page.wait_for_selector("body[data-state=ready]")


def _number(page: Page, widget_id: str) -> float:
    """The number a widget shows (its exact value; the text is the same, rounded)."""
    value = page.get_attribute(f"#{widget_id} .kpi-value", "data-value")
    text = page.inner_text(f"#{widget_id} .kpi-value").replace(",", "")
    assert value is not None
    assert float(text) == round(float(value), 2)
    return float(value)


def _widgets(page: Page) -> list[dict[str, Any]]:  # Any: JSON config
    config: list[dict[str, Any]] = page.evaluate(
        "JSON.parse(document.getElementById('dashboard-config').textContent).widgets"
    )
    return config


def _api_of(server: Server, widget: dict[str, Any]) -> dict[str, Any]:  # Any: JSON
    """The same series from the management KPI API (bearer key), for comparison."""
    query = widget["dataUrl"].split("?", 1)[1]
    metric = widget["metric"]
    response = httpx.get(
        f"{server.url}/api/kpis/{metric}?{query}",
        headers={"Authorization": f"Bearer {server.viewer_key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _painted_pixels(page: Page, widget_id: str) -> int:
    return int(
        page.evaluate(
            """(id) => {
                const canvas = document.querySelector('#' + id + ' canvas');
                const ctx = canvas.getContext('2d');
                const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
                let painted = 0;
                for (let i = 3; i < data.length; i += 4) { if (data[i] > 0) painted++; }
                return painted;
            }""",
            widget_id,
        )
    )


def _check_page_against_api(page: Page, server: Server) -> None:
    """Every widget on the page shows what the KPI API answers."""
    widgets = _widgets(page)
    assert widgets
    for widget in widgets:
        api = _api_of(server, widget)
        assert page.get_attribute(f"#{widget['id']}", "data-state") == "ready"
        if widget["chart"] == "number" and api["total"] is None:
            # A level with no value in the range (e.g. nothing resolved yet) shows a dash.
            assert page.inner_text(f"#{widget['id']} .kpi-value") == "\u2013", widget
        elif widget["chart"] == "number":
            assert _number(page, widget["id"]) == api["total"], widget
        elif widget["chart"] == "table":
            cells = page.eval_on_selector_all(
                f"#{widget['id']} tbody td.num",
                "tds => tds.filter(td => td.dataset.value !== '')"
                ".map(td => Number(td.dataset.value))",
            )
            assert sorted(cells) == sorted(p["value"] for p in api["points"]), widget
            heads = page.eval_on_selector_all(
                f"#{widget['id']} thead th.num", "ths => ths.map(th => th.textContent)"
            )
            assert heads == (api["keys"] or [api["title"]]), widget
        else:
            drawn = page.evaluate(
                "(id) => window.cdpDashboard.charts[id].data.datasets"
                ".map(d => ({label: d.label, data: d.data}))",
                widget["id"],
            )
            expected_keys = api["keys"] or [api["title"]]
            assert [d["label"] for d in drawn] == expected_keys
            for dataset in drawn:
                key = None if not api["keys"] else dataset["label"]
                shown = [v for v in dataset["data"] if v is not None]
                assert shown == [p["value"] for p in api["points"] if p["key"] == key]
            assert _painted_pixels(page, widget["id"]) > 500, widget


def test_data_health_shows_the_kpi_api_numbers_and_draws_its_charts(
    page: Page, server: Server
) -> None:
    _sign_in(page, server)
    assert page.inner_text("h1") == "Data health"
    _check_page_against_api(page, server)
    total = server.api("/api/kpis/events_received")
    assert _number(page, "w0") == total.json()["total"] > 0
    _shot(page, "data-health-laptop")


def test_changing_the_date_range_reloads_every_widget(page: Page, server: Server) -> None:
    _sign_in(page, server)
    before = _number(page, "w0")
    today = datetime.now(UTC).date()
    start, end = today - timedelta(days=50), today - timedelta(days=40)
    page.fill("#range-from", start.isoformat())
    page.fill("#range-to", end.isoformat())
    page.click("#range-apply")
    page.wait_for_url(f"**from={start.isoformat()}**")
    _ready(page)
    assert f"{start.isoformat()} → {end.isoformat()}" in page.inner_text("#w4 .widget-sub")
    after = _number(page, "w0")
    assert after != before
    _check_page_against_api(page, server)
    page.click("[data-preset='7d']")
    page.wait_for_url("**to=*")
    _ready(page)
    _check_page_against_api(page, server)
    assert "active" in (page.get_attribute("[data-preset='7d']", "class") or "")
    _shot(page, "data-health-7-days")


def test_custom_dashboard_created_through_the_api_renders(page: Page, server: Server) -> None:
    created = httpx.post(
        server.url + "/api/dashboards",
        json={
            "title": "Weekly traffic",
            "description": "Made by the end-to-end test.",
            "widgets": [
                {"metric": "events_received", "chart": "number", "range": "90d"},
                {
                    "metric": "events_received",
                    "breakdown": "source",
                    "grain": "week",
                    "chart": "bar",
                    "range": "90d",
                },
                {
                    "title": "Identifiers by kind",
                    "metric": "identifiers_seen",
                    "breakdown": "identifier_kind",
                    "grain": "week",
                    "chart": "table",
                    "range": "90d",
                },
                {"metric": "job_runs", "breakdown": "job", "chart": "line", "range": "30d"},
            ],
        },
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    _sign_in(page, server, "/dashboards")
    page.click("text=Weekly traffic")
    page.wait_for_url(f"**/dashboards/custom/{created.json()['id']}")
    _ready(page)
    assert page.inner_text("h1") == "Weekly traffic"
    _check_page_against_api(page, server)
    assert (
        _number(page, "w0")
        == server.api(
            "/api/kpis/events_received",
            **{"from": (datetime.now(UTC).date() - timedelta(days=89)).isoformat()},
        ).json()["total"]
    )
    _shot(page, "custom-dashboard")


def test_chart_data_downloads_as_csv(page: Page, server: Server) -> None:
    _sign_in(page, server)
    widget = _widgets(page)[4]
    with page.expect_download() as download_info:
        page.click(f"#{widget['id']} a.csv")
    download = download_info.value
    path = download.path()
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    api = _api_of(server, widget)
    assert download.suggested_filename.endswith(".csv")
    assert [(r["period"], r["source"], int(r["value"])) for r in rows] == [
        (p["period"], p["key"], p["value"]) for p in api["points"]
    ]


def _numbers(page: Page, widget_id: str) -> list[float]:
    values: list[float] = page.eval_on_selector_all(
        f"#{widget_id} tbody td.num",
        "tds => tds.filter(td => td.dataset.value !== '').map(td => Number(td.dataset.value))",
    )
    return values


def _widget_of(page: Page, metric: str) -> dict[str, Any]:  # Any: JSON config
    return next(w for w in _widgets(page) if w["metric"] == metric)


def test_programme_page_follows_the_programme_and_date_range_selectors(
    page: Page, server: Server
) -> None:
    _sign_in(page, server, "/dashboards/programme")
    assert page.inner_text("h1") == "Programme"
    assert page.query_selector(".coming") is None  # every programme metric is drawn
    assert page.is_enabled("#program")
    _check_page_against_api(page, server)
    members = _number(page, "w0")
    assert members == server.api("/api/kpis/members").json()["total"] > 0
    assert sum(_numbers(page, _widget_of(page, "top_rewards")["id"])) > 0
    vs = _widget_of(page, "member_vs_non_member")
    heads = page.eval_on_selector_all(f"#{vs['id']} thead th.num", "t => t.map(h => h.textContent)")
    assert heads[:2] == ["members: average basket", "non-members: average basket"]
    _shot(page, "programme-all")
    [program] = server.api("/api/loyalty/programs").json()["items"]
    page.select_option("#program", program["id"])
    page.wait_for_url(f"**program_id={program['id']}**")
    _ready(page)
    assert page.input_value("#program") == program["id"]
    scoped = [w for w in _widgets(page) if f"program_id={program['id']}" in w["dataUrl"]]
    assert len(scoped) == len(_widgets(page))  # every programme widget is scoped
    _check_page_against_api(page, server)
    assert _number(page, "w0") == members  # one programme holds every member
    today = datetime.now(UTC).date()
    start, end = today - timedelta(days=20), today - timedelta(days=10)
    page.fill("#range-from", start.isoformat())
    page.fill("#range-to", end.isoformat())
    page.click("#range-apply")
    page.wait_for_url(f"**from={start.isoformat()}**")
    _ready(page)
    assert f"program_id={program['id']}" in page.url  # the programme stays chosen
    _check_page_against_api(page, server)
    issued = _widget_of(page, "points_issued")
    expected = server.api(
        "/api/kpis/points_issued",
        **{"from": start.isoformat(), "to": end.isoformat(), "program_id": program["id"]},
    ).json()
    drawn = page.evaluate(
        "(id) => window.cdpDashboard.charts[id].data.datasets[0].data", issued["id"]
    )
    assert sum(drawn) == expected["total"] > 0
    _shot(page, "programme-chosen-range")
    with page.expect_download() as download_info:
        page.click(f"#{_widget_of(page, 'tier_movements')['id']} a.csv")
    rows = list(csv.DictReader(io.StringIO(Path(download_info.value.path()).read_text())))
    moves = _api_of(server, _widget_of(page, "tier_movements"))
    assert [(r["period"], r["direction"], int(r["value"])) for r in rows] == [
        (p["period"], p["key"], p["value"]) for p in moves["points"]
    ]


def test_audiences_page_compares_two_chosen_segments(page: Page, server: Server) -> None:
    _sign_in(page, server, "/dashboards/audiences")
    assert page.inner_text("h1") == "Audiences"
    assert page.query_selector(".coming") is None
    _check_page_against_api(page, server)
    segments = {s["name"]: s["id"] for s in server.api("/api/segments").json()["items"]}
    assert page.input_value("#segment-a") == segments["App users"]  # first two by name
    assert page.input_value("#segment-b") == segments["Newsletter readers"]
    _shot(page, "audiences")
    page.select_option("#segment-b", segments["Regular buyers"])
    page.wait_for_url(f"**segment_b={segments['Regular buyers']}**")
    _ready(page)
    _check_page_against_api(page, server)
    overlap = _widget_of(page, "segment_overlap")
    api = _api_of(server, overlap)
    assert api["segments"] == [segments["App users"], segments["Regular buyers"]]
    latest = max(p["period"] for p in api["points"])
    first_row = page.eval_on_selector_all(
        f"#{overlap['id']} tbody tr:first-child td.num",
        "t => t.map(td => Number(td.dataset.value))",
    )
    assert first_row == [p["value"] for p in api["points"] if p["period"] == latest]
    assert sum(first_row) > 0
    with page.expect_download() as download_info:
        page.click(f"#{overlap['id']} a.csv")
    rows = list(csv.DictReader(io.StringIO(Path(download_info.value.path()).read_text())))
    assert [(r["period"], r["standing"], int(r["value"])) for r in rows] == [
        (p["period"], p["key"], p["value"]) for p in api["points"]
    ]
    page.click("[data-preset='7d']")
    page.wait_for_url("**to=*")
    _ready(page)
    assert f"segment_b={segments['Regular buyers']}" in page.url
    _check_page_against_api(page, server)
    _shot(page, "audiences-chosen-7-days")


def test_phone_width_has_no_sideways_scrolling_and_sign_out_ends_the_session(
    page: Page, server: Server
) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    _sign_in(page, server)
    _check_page_against_api(page, server)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    _shot(page, "data-health-phone")
    page.click("text=Sign out")
    page.wait_for_url("**/dashboards/sign-in")
    page.goto(server.url + "/dashboards")
    assert "/dashboards/sign-in" in page.url
    _shot(page, "sign-in-phone")
