"""The web pages over HTTP: sign-in and its cookie, page data routes, static files, escaping."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from cdp.auth import ApiKey, Role, hash_key, revoke_key
from cdp.db import Database
from cdp.warehouse import Warehouse
from dashboards.deps import SESSION_COOKIE
from dashboards.models import WebSession
from segments.models import SegmentsSegment
from tests.conftest import make_key
from tests.dashboards.test_router import RANGE
from tests.loyalty.conftest import make_program

PACKAGE = Path(__file__).resolve().parents[2] / "dashboards"


@pytest.fixture
def browser(app: FastAPI) -> Iterator[TestClient]:
    """A client over HTTPS, so the Secure session cookie is kept and sent back."""
    with TestClient(app, base_url="https://testserver", raise_server_exceptions=False) as c:
        yield c


def _sign_in(browser: TestClient, key: str) -> None:
    response = browser.post("/dashboards/sign-in", data={"api_key": key}, follow_redirects=False)
    assert response.status_code == 303, response.text


def test_pages_redirect_to_sign_in_and_back(browser: TestClient, viewer_key: str) -> None:
    first = browser.get("/dashboards/data-health?from=2026-01-01", follow_redirects=False)
    assert first.status_code == 303
    assert first.headers["location"].startswith("/dashboards/sign-in?next=")
    form = browser.get(first.headers["location"])
    assert 'name="api_key"' in form.text
    assert "Content-Security-Policy" in form.headers
    signed = browser.post(
        "/dashboards/sign-in",
        data={"api_key": viewer_key, "next": "/dashboards/data-health?from=2026-01-01"},
        follow_redirects=False,
    )
    assert signed.headers["location"] == "/dashboards/data-health?from=2026-01-01"
    offsite = browser.post(
        "/dashboards/sign-in",
        data={"api_key": viewer_key, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert offsite.headers["location"] == "/dashboards"


def test_session_cookie_is_secure_httponly_strict_and_never_the_key(
    browser: TestClient, db: Database, viewer_key: str
) -> None:
    response = browser.post(
        "/dashboards/sign-in", data={"api_key": viewer_key}, follow_redirects=False
    )
    header = response.headers["set-cookie"]
    assert header.startswith(f"{SESSION_COOKIE}=")
    attributes = {part.strip().lower() for part in header.split(";")}
    assert {"secure", "httponly", "samesite=strict", "path=/dashboards"} <= attributes
    token = header.split(";")[0].split("=", 1)[1]
    assert viewer_key not in header
    assert token not in viewer_key
    with db.begin() as session:
        stored = session.scalars(select(WebSession)).all()
        assert len(stored) == 1
        assert stored[0].token_hash != token


def test_bad_key_shows_the_form_again_with_an_error(browser: TestClient) -> None:
    response = browser.post("/dashboards/sign-in", data={"api_key": "cdp_nope_nope"})
    assert response.status_code == 401
    assert "not valid" in response.text
    assert SESSION_COOKIE not in response.headers.get("set-cookie", "")


def test_cross_site_sign_in_is_refused(browser: TestClient, viewer_key: str) -> None:
    response = browser.post(
        "/dashboards/sign-in",
        data={"api_key": viewer_key},
        headers={"Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


def test_sign_out_clears_the_cookie_and_ends_the_session(
    browser: TestClient, viewer_key: str
) -> None:
    _sign_in(browser, viewer_key)
    token = browser.cookies.get(SESSION_COOKIE)
    assert browser.get("/dashboards", follow_redirects=False).status_code == 200
    out = browser.post("/dashboards/sign-out", follow_redirects=False)
    assert out.status_code == 303
    assert "Max-Age=0" in out.headers["set-cookie"] or "expires=" in out.headers["set-cookie"]
    assert browser.get("/dashboards", follow_redirects=False).status_code == 303
    assert token is not None
    browser.cookies.set(SESSION_COOKIE, token, domain="testserver", path="/dashboards")
    replay = browser.get("/dashboards/api/kpis/events_received")
    assert replay.status_code == 401


def test_revoking_the_key_ends_its_sessions(browser: TestClient, db: Database) -> None:
    key = make_key(db, Role.loyalty)
    _sign_in(browser, key)
    assert browser.get("/dashboards/api/kpis/job_runs").status_code == 200
    with db.begin() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
        assert row is not None
        revoke_key(session, key_id=row.id)
    assert browser.get("/dashboards/api/kpis/job_runs").status_code == 401
    assert browser.get("/dashboards", follow_redirects=False).status_code == 303


def test_page_data_route_answers_what_the_kpi_api_answers(
    browser: TestClient, seeded: Warehouse, viewer_key: str
) -> None:
    anonymous = browser.get("/dashboards/api/kpis/events_received", params=RANGE)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "dashboards.not_signed_in"
    _sign_in(browser, viewer_key)
    params = {**RANGE, "breakdown": "source"}
    page = browser.get("/dashboards/api/kpis/events_received", params=params)
    api = browser.get(
        "/api/kpis/events_received",
        params=params,
        headers={"Authorization": f"Bearer {viewer_key}"},
    )
    assert page.json() == api.json()
    page_csv = browser.get(
        "/dashboards/api/kpis/events_received", params={**params, "format": "csv"}
    )
    assert page_csv.text.splitlines()[0] == "period,source,value"


def test_data_health_page_lays_out_widgets_with_csv_links(
    browser: TestClient, viewer_key: str
) -> None:
    _sign_in(browser, viewer_key)
    page = browser.get("/dashboards/data-health", params=RANGE)
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    config = json.loads(
        re.search(r'id="dashboard-config">(.*?)</script>', page.text, re.S).group(1)  # type: ignore[union-attr]
    )
    widgets = config["widgets"]
    assert {w["metric"] for w in widgets} == {
        "events_received",
        "identifiers_seen",
        "ingest_batches",
        "job_runs",
        "job_failures",
        "events_rejected",
        "duplicates_dropped",
        "merge_rate",
        "identifiers_per_profile",
        "blocked_values_hit",
        "events_occurred",
    }
    assert all(f"from={RANGE['from']}" in w["dataUrl"] for w in widgets)
    assert all(w["csvUrl"].endswith("format=csv") for w in widgets)
    for w in widgets:
        assert browser.get(w["dataUrl"]).status_code == 200
    assert 'value="' + RANGE["from"] + '"' in page.text
    assert "Coming with other packages" not in page.text


def _config(page: str) -> dict[str, Any]:  # Any: JSON
    found = re.search(r'id="dashboard-config">(.*?)</script>', page, re.S)
    assert found is not None
    return json.loads(found.group(1))  # type: ignore[no-any-return]


def test_programme_selector_scopes_the_programme_widgets_only(
    browser: TestClient, db: Database, viewer_key: str, admin_headers: dict[str, str]
) -> None:
    _sign_in(browser, viewer_key)
    empty = browser.get("/dashboards/programme")
    assert re.search(r'<select name="program_id" id="program"[^>]*disabled', empty.text)
    club, other = make_program(db, name="Club"), make_program(db, name="Other <b>")
    programme = browser.get("/dashboards/programme")
    assert programme.status_code == 200
    assert "Coming with other packages" not in programme.text
    assert f'<option value="{club.id}">Club</option>' in programme.text
    assert "Other &lt;b&gt;" in programme.text
    drawn = {w["metric"] for w in _config(programme.text)["widgets"]}
    assert {"tier_movements", "top_rewards", "member_vs_non_member", "members"} <= drawn
    chosen = browser.get("/dashboards/programme", params={**RANGE, "program_id": other.id})
    assert f'<option value="{other.id}" selected>' in chosen.text
    widgets = _config(chosen.text)["widgets"]
    assert all(f"program_id={other.id}" in w["dataUrl"] for w in widgets)
    assert all(f"program_id={other.id}" in w["csvUrl"] for w in widgets)
    assert f"program_id={other.id}" in chosen.text.split('class="presets"')[1].split("</div>")[0]
    # An unknown programme is not applied: the page shows every programme.
    unknown = browser.get("/dashboards/programme", params={"program_id": "nope"})
    assert all("program_id" not in w["dataUrl"] for w in _config(unknown.text)["widgets"])
    # Custom dashboards get the selector when a widget is programme-scoped, and apply it only
    # to those widgets.
    created = browser.post(
        "/api/dashboards",
        json={
            "title": "Mixed",
            "widgets": [
                {"metric": "points_issued", "chart": "number"},
                {"metric": "events_received", "chart": "number"},
            ],
        },
        headers=admin_headers,
    ).json()
    custom = browser.get(f"/dashboards/custom/{created['id']}", params={"program_id": club.id})
    assert 'id="program"' in custom.text
    points, events = _config(custom.text)["widgets"]
    assert f"program_id={club.id}" in points["dataUrl"]
    assert "program_id" not in events["dataUrl"]
    assert browser.get(points["dataUrl"]).json()["program_id"] == club.id
    plain = browser.post(
        "/api/dashboards",
        json={"title": "Plain", "widgets": [{"metric": "events_received", "chart": "number"}]},
        headers=admin_headers,
    ).json()
    assert 'id="program"' not in browser.get(f"/dashboards/custom/{plain['id']}").text
    assert browser.get("/dashboards/nope").status_code == 404


def _segment(db: Database, name: str) -> str:
    with db.begin() as session:
        row = SegmentsSegment(name=name, rule={"field": "x", "op": "=", "value": 1})
        session.add(row)
        session.flush()
        return row.id


def test_audiences_page_offers_two_segment_selectors_for_the_overlap(
    browser: TestClient, db: Database, viewer_key: str
) -> None:
    _sign_in(browser, viewer_key)
    alone = browser.get("/dashboards/audiences")
    assert 'id="needs-segments"' in alone.text
    assert "segment_overlap" not in {w["metric"] for w in _config(alone.text)["widgets"]}
    b, a, c = _segment(db, "Buyers"), _segment(db, "Active"), _segment(db, "Churned")
    page = browser.get("/dashboards/audiences", params=RANGE)
    [overlap] = [w for w in _config(page.text)["widgets"] if w["metric"] == "segment_overlap"]
    assert f"segment_a={a}&segment_b={b}" in overlap["dataUrl"]  # first two by name
    assert 'id="segment-a"' in page.text
    assert 'id="segment-b"' in page.text
    chosen = browser.get("/dashboards/audiences", params={"segment_a": c, "segment_b": a})
    [overlap] = [w for w in _config(chosen.text)["widgets"] if w["metric"] == "segment_overlap"]
    assert f"segment_a={c}&segment_b={a}" in overlap["dataUrl"]
    assert f'<option value="{c}" selected>Churned</option>' in chosen.text
    data = browser.get(overlap["dataUrl"])
    assert data.status_code == 200, data.text
    assert data.json()["keys"] == ["in both", "only in the first", "only in the second"]
    assert data.json()["segments"] == [c, a]
    csv = browser.get(overlap["csvUrl"]).text.splitlines()
    assert csv[0] == "period,standing,value"
    refused = browser.get("/dashboards/api/kpis/segment_overlap")
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "dashboards.segments_required"


def test_custom_dashboard_page_escapes_user_text(
    browser: TestClient, db: Database, admin_headers: dict[str, str], viewer_key: str
) -> None:
    hostile = "</script><script>alert(1)</script>"
    created = browser.post(
        "/api/dashboards",
        json={
            "title": hostile,
            "widgets": [
                {"metric": "events_received", "title": hostile, "chart": "number"},
                {"metric": "events_received", "breakdown": "source", "chart": "bar"},
            ],
        },
        headers=admin_headers,
    ).json()
    _sign_in(browser, viewer_key)
    page = browser.get(f"/dashboards/custom/{created['id']}")
    assert page.status_code == 200
    assert hostile not in page.text
    assert "&lt;/script&gt;" in page.text
    overview = browser.get("/dashboards")
    assert f"/dashboards/custom/{created['id']}" in overview.text
    assert browser.get("/dashboards/custom/unknown").status_code == 404


def test_static_files_are_served_from_the_package_only(browser: TestClient) -> None:
    chart = browser.get("/dashboards/static/vendor/chart.umd.min.js")
    assert chart.status_code == 200
    assert "javascript" in chart.headers["content-type"]
    assert chart.content.startswith(b"/*!\n * Chart.js v4")
    assert browser.get("/dashboards/static/..%2Fpages.py").status_code == 404
    assert browser.get("/dashboards/static/%2E%2E/%2E%2E/cdp/app.py").status_code == 404
    assert browser.get("/dashboards/static/nope.js").status_code == 404


def test_pages_load_nothing_from_other_sites() -> None:
    ours = [*PACKAGE.joinpath("templates").glob("*.html"), *PACKAGE.joinpath("static").glob("*.*")]
    assert len(ours) >= 6
    for path in ours:
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path
        assert "@import" not in text, path
        assert "url(http" not in text, path
        assert "fonts.googleapis" not in text, path
