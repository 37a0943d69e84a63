"""The loyalty API as a loyalty manager checks it by hand: the tier-change feed, tier history
and progress, KPIs, merges, rewards and cancellations, the tier job, and two programmes
running on the same events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from loyalty import ledger, service
from loyalty.models import LedgerEntry, Member, Program
from loyalty.schemas import RewardCreate, RuleCreate, TierCreate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import (
    Profiles,
    add_base_rule,
    earn,
    make_member,
    make_program,
    run_job,
)
from tests.loyalty.events import ev
from tests.loyalty.identity_data import profile_of, resolve, write_events
from tests.loyalty.test_engine import _process

H = dict[str, str]
Json = dict[str, Any]  # Any: a JSON document


def _post(client: TestClient, url: str, body: Json, headers: H, status: int = 200) -> Json:
    answer = client.post(url, json=body, headers=headers)
    assert answer.status_code == status, answer.text
    return dict(answer.json())


def _get(client: TestClient, url: str, headers: H) -> Any:  # Any: a JSON document
    answer = client.get(url, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _programme(client: TestClient, headers: H, **fields: Any) -> str:  # Any: JSON fields
    body = {"name": "Club", "status": "active", **fields}
    return str(_post(client, "/api/loyalty/programs", body, headers, 201)["id"])


def _ladder(client: TestClient, headers: H, program_id: str) -> tuple[str, str]:
    """Silver from 100 and Gold from 500 qualifying points."""
    url = f"/api/loyalty/programs/{program_id}/tiers"
    silver = _post(client, url, {"name": "Silver", "rank": 1, "threshold": 100}, headers, 201)
    gold = _post(client, url, {"name": "Gold", "rank": 2, "threshold": 500}, headers, 201)
    return str(silver["id"]), str(gold["id"])


def _enrol(client: TestClient, headers: H, program_id: str, profile_id: str) -> str:
    url = f"/api/loyalty/programs/{program_id}/members"
    return str(_post(client, url, {"profile_id": profile_id}, headers)["id"])


def _adjust(
    client: TestClient, headers: H, member_id: str, points: int, *, qualifying: bool = True
) -> Json:
    body = {"points": points, "reason": "by hand", "qualifying": qualifying}
    return _post(client, f"/api/loyalty/members/{member_id}/adjustments", body, headers, 201)


def _moves(changes: list[Json]) -> list[tuple[str, str | None, str | None, str]]:
    return [(c["member_id"], c["from_tier_id"], c["to_tier_id"], c["reason"]) for c in changes]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_tier_change_feed_lists_upgrades_and_a_downgrade_in_order_paginated_since_an_instant(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    ids = profiles("ann", "bob")
    program = _programme(client, loyalty_headers, tier_grace_days=0)
    silver, gold = _ladder(client, loyalty_headers, program)
    ann = _enrol(client, loyalty_headers, program, ids["ann"])
    bob = _enrol(client, loyalty_headers, program, ids["bob"])
    start = datetime.now(UTC)
    _adjust(client, loyalty_headers, ann, 150)  # 150: Silver
    _adjust(client, loyalty_headers, bob, 600)  # 600: straight to Gold, one movement
    _adjust(client, loyalty_headers, ann, 400)  # 550: Gold
    _adjust(client, loyalty_headers, ann, -300)  # 250: below Gold, no change until re-evaluation
    feed_url = f"/api/loyalty/programs/{program}/tier-changes"
    since = {"since": start.isoformat()}
    before = client.get(feed_url, params=since, headers=loyalty_headers).json()
    assert before["total"] == 3
    moved = _post(client, f"/api/loyalty/programs/{program}/tiers/reevaluate", {}, loyalty_headers)
    assert (moved["upgrades"], moved["downgrades"], moved["members"]) == (0, 1, [ann])
    expected = [
        (ann, None, silver, "upgrade"),
        (bob, None, gold, "upgrade"),
        (ann, silver, gold, "upgrade"),
        (ann, gold, silver, "downgrade"),
    ]
    whole = client.get(feed_url, params=since, headers=loyalty_headers).json()
    assert _moves(whole["items"]) == expected
    assert [c["metric_value"] for c in whole["items"]] == [150, 600, 550, 250]
    ats = [datetime.fromisoformat(c["at"]) for c in whole["items"]]
    assert ats == sorted(ats)
    assert start <= ats[0]
    first = client.get(feed_url, params={**since, "limit": 3}, headers=loyalty_headers).json()
    assert (first["total"], first["next_offset"]) == (4, 3)
    second = client.get(
        feed_url, params={**since, "limit": 3, "offset": 3}, headers=loyalty_headers
    ).json()
    assert second["next_offset"] is None
    assert _moves(first["items"] + second["items"]) == expected
    # `since` is inclusive: from the third movement on.
    later = client.get(feed_url, params={"since": whole["items"][2]["at"]}, headers=loyalty_headers)
    assert _moves(later.json()["items"]) == expected[2:]
    after = {"since": (datetime.now(UTC) + timedelta(seconds=1)).isoformat()}
    assert client.get(feed_url, params=after, headers=loyalty_headers).json()["items"] == []


def test_tier_change_feed_reads_a_since_without_zone_as_utc(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    program = _programme(client, loyalty_headers)
    _, _gold = _ladder(client, loyalty_headers, program)
    ann = _enrol(client, loyalty_headers, program, profiles("ann")["ann"])
    _adjust(client, loyalty_headers, ann, 500)
    feed_url = f"/api/loyalty/programs/{program}/tier-changes"
    for since, count in (("2020-01-01T00:00:00", 1), ("2020-01-01", 1), ("2999-01-01T00:00", 0)):
        answer = client.get(feed_url, params={"since": since}, headers=loyalty_headers)
        assert answer.status_code == 200, (since, answer.text)
        assert len(answer.json()["items"]) == count, since
    missing = client.get(feed_url, headers=loyalty_headers)
    assert missing.status_code == 422


def _feed(client: TestClient, headers: H, program_id: str, **params: Any) -> Json:  # Any: params
    url = f"/api/loyalty/programs/{program_id}/tier-changes"
    return dict(_get(client, f"{url}?{urlencode(params)}", headers))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_tier_change_feed_shows_a_late_event_s_upgrade_dated_before_the_last_poll(
    db: Database, client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    ids = profiles("ann", "bob")
    program = _programme(client, loyalty_headers)
    silver, _ = _ladder(client, loyalty_headers, program)
    with db.begin() as session:
        stored = service.get_program(session, program_id=program)
        add_base_rule(session, stored)
    ann = _enrol(client, loyalty_headers, program, ids["ann"])
    bob = _enrol(client, loyalty_headers, program, ids["bob"])
    _adjust(client, loyalty_headers, bob, 150)
    polled = _feed(client, loyalty_headers, program, since="2020-01-01T00:00:00Z")["items"]
    assert _moves(polled) == [(bob, None, silver, "upgrade")]
    last = polled[-1]
    # Ann's order of two days ago arrives only now (a late event, a file loaded today).
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    _process(db, stored, [ev(ids["ann"], two_days_ago, order_id="late", total=120)])
    for params in (
        {"since": last["recorded_at"]},  # re-read from the last instant, inclusive
        {"since": last["recorded_at"], "after_id": last["id"]},  # or strictly after the last
    ):
        items = _feed(client, loyalty_headers, program, **params)["items"]
        news = [c for c in items if c["id"] != last["id"]]
        assert _moves(news) == [(ann, None, silver, "upgrade")], params
        # It took effect at the event; it was recorded after everything polled before.
        assert datetime.fromisoformat(news[0]["at"]) == two_days_ago
        assert news[0]["recorded_at"] > last["recorded_at"]
    assert (
        _feed(client, loyalty_headers, program, since=last["recorded_at"], after_id=last["id"])[
            "total"
        ]
        == 1
    )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_tier_change_feed_walks_one_transaction_s_changes_once_each_in_the_order_made(
    db: Database, client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    ids = profiles("ann", "bob", "cara")
    program = _programme(client, loyalty_headers, tier_grace_days=0)
    silver, gold = _ladder(client, loyalty_headers, program)
    with db.begin() as session:
        stored = service.get_program(session, program_id=program)
        add_base_rule(session, stored)
    ann, bob, cara = (
        _enrol(client, loyalty_headers, program, ids[p]) for p in ("ann", "bob", "cara")
    )
    # One batch: Ann up to Silver then Gold, Bob and Cara to Silver, all in one commit.
    base = datetime.now(UTC) - timedelta(days=3)
    batch = [
        ev(ids["ann"], base, order_id="a1", total=150),
        ev(ids["bob"], base + timedelta(minutes=1), order_id="b1", total=100),
        ev(ids["ann"], base + timedelta(minutes=2), order_id="a2", total=400),
        ev(ids["cara"], base + timedelta(minutes=3), order_id="c1", total=200),
    ]
    _process(db, stored, batch)
    whole = _feed(client, loyalty_headers, program, since="2020-01-01T00:00:00Z")["items"]
    assert _moves(whole) == [
        (ann, None, silver, "upgrade"),
        (bob, None, silver, "upgrade"),
        (ann, silver, gold, "upgrade"),
        (cara, None, silver, "upgrade"),
    ]
    stamps = [c["recorded_at"] for c in whole]
    assert len(set(stamps)) == 4  # no ties: a keyset cursor is exact
    # A consumer that keeps the last (recorded_at, id) and reads one change at a time.
    walked: list[str] = []
    cursor = {"since": "2020-01-01T00:00:00Z"}
    for _ in range(10):
        page = _feed(client, loyalty_headers, program, limit=1, **cursor)
        if not page["items"]:
            break
        walked.append(page["items"][0]["id"])
        cursor = {"since": page["items"][0]["recorded_at"], "after_id": page["items"][0]["id"]}
    assert walked == [c["id"] for c in whole]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_tier_change_committed_after_a_later_one_still_follows_it_in_the_feed(
    db: Database, client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    """PostgreSQL runs writers side by side: a long transaction (a backfill) that records a
    change and commits after a short one must not show its change behind the short one's."""
    ids = profiles("ann", "bob")
    program = _programme(client, loyalty_headers)
    silver, _ = _ladder(client, loyalty_headers, program)
    ann = _enrol(client, loyalty_headers, program, ids["ann"])
    bob = _enrol(client, loyalty_headers, program, ids["bob"])
    with db.begin() as long:
        service.adjust_points(
            long, member_id=ann, points=150, reason="slow", actor="test", qualifying=True
        )
        long.flush()
        _adjust(client, loyalty_headers, bob, 150)  # its own transaction, committed first
        polled = _feed(client, loyalty_headers, program, since="2020-01-01T00:00:00Z")["items"]
        assert _moves(polled) == [(bob, None, silver, "upgrade")]
    last = polled[-1]
    news = _feed(client, loyalty_headers, program, since=last["recorded_at"], after_id=last["id"])
    assert _moves(news["items"]) == [(ann, None, silver, "upgrade")]


def test_member_tier_history_and_tier_progress_in_the_balance(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    ids = profiles("ann", "bob")
    program = _programme(client, loyalty_headers, tier_grace_days=0)
    silver, gold = _ladder(client, loyalty_headers, program)
    ann = _enrol(client, loyalty_headers, program, ids["ann"])
    balance_url = f"/api/loyalty/members/{ann}/balance"
    history_url = f"/api/loyalty/members/{ann}/tiers"
    assert _get(client, history_url, loyalty_headers) == []
    tier = _get(client, balance_url, loyalty_headers)["tier"]
    assert (tier["tier_id"], tier["tier_name"], tier["metric"], tier["value"]) == (
        None,
        None,
        "points",
        0,
    )
    assert (tier["next_tier_id"], tier["next_tier_name"], tier["next_threshold"]) == (
        silver,
        "Silver",
        100,
    )
    assert tier["missing"] == 100
    # Points that do not qualify change the balance, not the progress.
    _adjust(client, loyalty_headers, ann, 1000, qualifying=False)
    _adjust(client, loyalty_headers, ann, 130)
    balance = _get(client, balance_url, loyalty_headers)
    assert (balance["active"], balance["qualifying_points"]) == (1130, 130)
    tier = balance["tier"]
    assert (tier["tier_name"], tier["value"], tier["next_tier_name"], tier["missing"]) == (
        "Silver",
        130,
        "Gold",
        370,
    )
    _adjust(client, loyalty_headers, ann, 370)
    tier = _get(client, balance_url, loyalty_headers)["tier"]
    assert (tier["tier_id"], tier["value"]) == (gold, 500)
    assert (tier["next_tier_id"], tier["next_threshold"], tier["missing"]) == (None, None, None)
    _adjust(client, loyalty_headers, ann, -450)
    _post(client, f"/api/loyalty/programs/{program}/tiers/reevaluate", {}, loyalty_headers)
    history = _get(client, history_url, loyalty_headers)
    assert _moves(history) == [
        (ann, None, silver, "upgrade"),
        (ann, silver, gold, "upgrade"),
        (ann, gold, None, "downgrade"),
    ]
    assert [h["metric_value"] for h in history] == [130, 500, 50]
    tier = _get(client, balance_url, loyalty_headers)["tier"]
    assert (tier["tier_id"], tier["value"], tier["next_tier_id"], tier["missing"]) == (
        None,
        50,
        silver,
        50,
    )
    # A programme without a ladder has no tier block; an unknown member is a 404.
    other = _programme(client, loyalty_headers, name="No tiers")
    bob = _enrol(client, loyalty_headers, other, ids["bob"])
    assert _get(client, f"/api/loyalty/members/{bob}/balance", loyalty_headers)["tier"] is None
    unknown = client.get("/api/loyalty/members/nobody/tiers", headers=loyalty_headers)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "loyalty.member_not_found"


def _history_for_kpis(db: Database, now: datetime) -> tuple[Program, dict[str, str]]:
    """A small programme history (see the KPI test for the figures it should give)."""
    day = timedelta(days=1)
    program = make_program(
        db,
        timezone="Europe/Paris",
        point_value=0.02,
        currency="EUR",
        expiry_policy="rolling",
        expiry_months=1,
        tier_grace_days=0,
    )
    with db.begin() as session:
        add_base_rule(session, program)
        for name, rank, threshold in (("Silver", 1, 100), ("Gold", 2, 500)):
            service.create_tier(
                session,
                program_id=program.id,
                data=TierCreate(name=name, rank=rank, threshold=threshold),
            )
    enrolled = {
        # 23:30 UTC on 31 January is 00:30 on 1 February in Paris: a February enrolment.
        "ann": datetime(2026, 1, 31, 23, 30, tzinfo=UTC),
        "bob": datetime(2026, 1, 15, 12, tzinfo=UTC),
        "cara": datetime(2026, 2, 10, 12, tzinfo=UTC),
        "dan": datetime(2026, 3, 5, 12, tzinfo=UTC),
        "erin": datetime(2026, 2, 20, 12, tzinfo=UTC),
    }
    ids = {}
    for profile, at in enrolled.items():
        with db.begin() as session:
            ids[profile] = service.change_membership(
                session, program_id=program.id, profile_id=profile, action="enrol", at=at
            ).id
    member = {p: Member(id=i, program_id=program.id, profile_id=p) for p, i in ids.items()}
    earn(db, program, member["ann"], 100, at=now - 40 * day, key="ann-old")
    with db.begin() as session:
        # Ann reaches Silver 35 days ago: a movement older than 30 days.
        service.reevaluate_tiers(session, program_id=program.id, now=now - 35 * day)
    earn(db, program, member["ann"], 200, at=now - 2 * day, key="ann-new")
    earn(db, program, member["bob"], 480, at=now - 5 * day, key="bob")
    earn(db, program, member["dan"], 40, at=now - 10 * day, key="dan")
    # Cara buys for 80 and returns 30 of it: 80 earned, 30 reversed.
    order = [
        ev("cara", now - 3 * day, event_id=1, order_id="o1", total=80),
        ev(
            "cara", now - 3 * day + timedelta(hours=1), "Order Refunded", 2, order_id="o1", total=30
        ),
    ]
    _process(db, program, order, now=now)
    with db.begin() as session:
        assert service.expire_points(session, program_id=program.id, now=now) == 1  # Ann's 100
        voucher = service.create_reward(
            session, program_id=program.id, data=RewardCreate(name="Voucher", points_cost=150)
        )
        service.redeem(session, member_id=ids["bob"], reward_id=voucher.id, now=now - day)
        taken = service.redeem(session, member_id=ids["ann"], reward_id=voucher.id, now=now - day)
        service.cancel_redemption(session, redemption_id=taken.id, reason="changed her mind")
        for profile, points, qualifying in (("cara", 30, False), ("ann", -20, False)):
            service.adjust_points(
                session,
                member_id=ids[profile],
                points=points,
                reason="gesture",
                actor="test",
                qualifying=qualifying,
                now=now - day,
            )
        # Erin reaches Silver 20 days ago, then loses those points again.
        for points, at in ((100, now - 20 * day), (-100, now - 19 * day)):
            service.adjust_points(
                session,
                member_id=ids["erin"],
                points=points,
                reason="goodwill, then taken back",
                actor="test",
                qualifying=True,
                now=at,
            )
        # Dan turns out to be Bob: his 40 points and their history become Bob's (Gold).
        service.merge_profiles(
            session, program_id=program.id, from_profile_id="dan", to_profile_id="bob"
        )
        service.change_membership(
            session, program_id=program.id, profile_id="cara", action="opt_out"
        )
        # Tonight's re-evaluation: Erin goes down (no grace in this programme).
        service.reevaluate_tiers(session, program_id=program.id, now=now)
    return program, ids


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kpis_give_the_figures_counted_by_hand(
    db: Database, client: TestClient, loyalty_headers: H
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    program, ids = _history_for_kpis(db, now)
    k = _get(client, f"/api/loyalty/programs/{program.id}/kpis", loyalty_headers)
    # Dan was merged away: four members, Cara (opted out) among them.
    assert k["members"] == 4
    # Ann, Bob (Dan's earning included) and Cara earned or redeemed in 30 days; Erin only had
    # adjustments. A merged-away membership is not a member of its own.
    assert k["active_members_30d"] == 3
    assert k["enrolment_by_month"] == [
        {"period": "2026-01", "count": 1},  # Bob
        {"period": "2026-02", "count": 3},  # Ann (local time), Cara, Erin
    ]
    # Issued: earned 100 + 200 (Ann) + 480 (Bob) + 40 (Dan) + 80 (Cara), credited by hand
    # 30 (Cara) + 100 (Erin). Debits by hand (Ann 20, Erin 100) are not negative issuance.
    issued = 100 + 200 + 480 + 40 + 80 + 30 + 100
    assert k["points_issued"] == issued == 1030
    assert k["points_redeemed"] == 150  # Bob's voucher; Ann's was cancelled
    assert (k["points_expired"], k["points_reversed"]) == (100, 30)
    # Left: Ann 200 - 20, Bob 480 - 150 + 40, Cara 80 - 30 + 30, Erin 0.
    assert k["points_outstanding"] == 180 + 370 + 80 == issued - 150 - 100 - 30 - 20 - 100
    assert (k["liability"], k["currency"]) == (12.6, "EUR")
    assert k["breakage_rate"] == 100 / 1030
    assert k["redemption_rate"] == 150 / 1030
    # Active members by tier: Ann Silver (300 qualifying), Bob Gold (480 + Dan's 40), Erin
    # none (100 - 100); Cara opted out.
    assert k["tier_distribution"] == {"Silver": 1, "Gold": 1, "none": 1}
    # In 30 days: Erin up (20 days ago), Bob up (at the merge), Erin down (tonight); Ann's
    # upgrade is 35 days old.
    assert k["tier_movements_30d"] == {"upgrade": 2, "downgrade": 1}
    assert (k["member_orders"], k["member_average_basket"]) == (1, 80.0)
    with db.begin() as session:
        assert ledger.lots_sum(session, member_id=ids["bob"]) == 370


def test_kpis_of_an_unknown_programme_are_a_404(client: TestClient, loyalty_headers: H) -> None:
    answer = client.get("/api/loyalty/programs/nope/kpis", headers=loyalty_headers)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "loyalty.program_not_found"


def test_tier_change_feed_of_an_unknown_programme_is_a_404(
    client: TestClient, loyalty_headers: H
) -> None:
    answer = client.get(
        "/api/loyalty/programs/nope/tier-changes",
        params={"since": "2026-01-01T00:00:00Z"},
        headers=loyalty_headers,
    )
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "loyalty.program_not_found"


def _balance(client: TestClient, headers: H, member_id: str) -> int:
    return int(_get(client, f"/api/loyalty/members/{member_id}/balance", headers)["active"])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_merges_endpoint_folds_re_keys_and_replays(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    ids = profiles("ann", "guest", "lone")
    program = _programme(client, loyalty_headers)
    ann = _enrol(client, loyalty_headers, program, ids["ann"])
    guest = _enrol(client, loyalty_headers, program, ids["guest"])
    lone = _enrol(client, loyalty_headers, program, ids["lone"])
    _adjust(client, loyalty_headers, ann, 200, qualifying=False)
    _adjust(client, loyalty_headers, guest, 50, qualifying=False)
    url = f"/api/loyalty/programs/{program}/merges"
    body = {"from_profile_id": ids["guest"], "to_profile_id": ids["ann"], "reason": "same email"}
    keyed = {**loyalty_headers, "Idempotency-Key": "merge-1"}
    merged = _post(client, url, body, keyed)
    assert merged == {
        "program_id": program,
        "kind": "merge",
        "from_member_id": guest,
        "to_member_id": ann,
        "points_moved": 50,
    }
    assert _post(client, url, body, keyed) == merged  # a retry replays the first answer
    # Sent again without a key, the merge is already applied: nothing moves.
    assert _post(client, url, body, loyalty_headers)["points_moved"] == 0
    assert (_balance(client, loyalty_headers, ann), _balance(client, loyalty_headers, guest)) == (
        250,
        0,
    )
    absorbed = _get(client, f"/api/loyalty/members/{guest}", loyalty_headers)
    assert (absorbed["status"], absorbed["merged_into"]) == ("merged", ann)
    history = _get(client, f"/api/loyalty/members/{ann}/history", loyalty_headers)["items"]
    # The survivor's ledger shows the absorbed membership's entries too.
    assert sorted((e["kind"], e["points"]) for e in history) == [
        ("adjust", 50),
        ("adjust", 200),
        ("merge", -50),
        ("merge", 50),
    ]
    # Only the absorbed profile is a member: its membership now belongs to the survivor.
    rekeyed = _post(
        client, url, {"from_profile_id": ids["lone"], "to_profile_id": "new"}, loyalty_headers
    )
    assert (rekeyed["from_member_id"], rekeyed["to_member_id"], rekeyed["points_moved"]) == (
        lone,
        lone,
        0,
    )
    members_url = f"/api/loyalty/programs/{program}/members"
    found = _get(client, f"{members_url}?profile_id=new", loyalty_headers)["items"]
    assert [m["id"] for m in found] == [lone]
    # Neither profile a member: nothing to do.
    nobody = _post(client, url, {"from_profile_id": "x", "to_profile_id": "y"}, loyalty_headers)
    assert (nobody["from_member_id"], nobody["to_member_id"], nobody["points_moved"]) == (
        None,
        None,
        0,
    )
    missing = client.post(
        "/api/loyalty/programs/nope/merges",
        json={"from_profile_id": "a", "to_profile_id": "b"},
        headers=loyalty_headers,
    )
    assert missing.status_code == 404


def test_a_merge_of_a_profile_into_itself_is_refused_and_changes_nothing(
    db: Database, client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    ann_profile = profiles("ann")["ann"]
    program = _programme(client, loyalty_headers)
    ann = _enrol(client, loyalty_headers, program, ann_profile)
    _adjust(client, loyalty_headers, ann, 200, qualifying=False)
    answer = client.post(
        f"/api/loyalty/programs/{program}/merges",
        json={"from_profile_id": ann_profile, "to_profile_id": ann_profile},
        headers=loyalty_headers,
    )
    assert answer.status_code == 422, answer.text
    member = _get(client, f"/api/loyalty/members/{ann}", loyalty_headers)
    assert (member["status"], member["merged_into"]) == ("active", None)
    assert _balance(client, loyalty_headers, ann) == 200
    # Called directly (as identity's merges are applied), the same merge is a no-op.
    with db.begin() as session:
        _, _, moved = service.merge_profiles(
            session, program_id=program, from_profile_id=ann_profile, to_profile_id=ann_profile
        )
        assert moved == 0
        assert service.get_member(session, member_id=ann).status == "active"
    assert _balance(client, loyalty_headers, ann) == 200


def test_rewards_are_created_listed_cheapest_first_and_read_with_their_stock(
    client: TestClient, loyalty_headers: H
) -> None:
    program = _programme(client, loyalty_headers)
    _, gold = _ladder(client, loyalty_headers, program)
    url = f"/api/loyalty/programs/{program}/rewards"
    keyed = {**loyalty_headers, "Idempotency-Key": "tote"}
    tote_body = {"name": "Tote bag", "kind": "product", "points_cost": 1200, "stock": 3}
    tote = _post(client, url, tote_body, keyed, 201)
    assert _post(client, url, tote_body, keyed, 201) == tote  # one reward for one key
    assert (tote["status"], tote["stock"], tote["program_id"]) == ("active", 3, program)
    voucher = _post(client, url, {"name": "Voucher", "points_cost": 500}, loyalty_headers, 201)
    assert (voucher["kind"], voucher["stock"], voucher["per_member_limit"]) == (
        "coupon",
        None,
        None,
    )
    private = _post(
        client,
        url,
        {"name": "Private sale", "kind": "event_access", "points_cost": 300, "min_tier_id": gold},
        loyalty_headers,
        201,
    )
    listed = _get(client, url, loyalty_headers)
    assert [r["name"] for r in listed["items"]] == ["Private sale", "Voucher", "Tote bag"]
    assert listed["total"] == 3
    page = _get(client, f"{url}?limit=2&offset=2", loyalty_headers)
    assert ([r["id"] for r in page["items"]], page["next_offset"]) == ([tote["id"]], None)
    assert _get(client, f"/api/loyalty/rewards/{private['id']}", loyalty_headers) == private
    for bad in (
        {"name": "Free", "points_cost": 0},
        {"name": "Minus", "points_cost": 10, "stock": -1},
        {"name": "Odd", "points_cost": 10, "kind": "cash"},
    ):
        assert client.post(url, json=bad, headers=loyalty_headers).status_code == 422, bad
    wrong_tier = client.post(
        url, json={"name": "x", "points_cost": 10, "min_tier_id": "nope"}, headers=loyalty_headers
    )
    assert wrong_tier.status_code == 404
    assert wrong_tier.json()["error"]["code"] == "loyalty.tier_not_found"
    unknown = client.get("/api/loyalty/rewards/nope", headers=loyalty_headers)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (
        404,
        "loyalty.reward_not_found",
    )
    assert (
        client.get("/api/loyalty/programs/nope/rewards", headers=loyalty_headers).status_code == 404
    )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_redeem_and_cancel_over_http_replay_refuse_a_second_cancel_and_give_stock_back(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    program = _programme(client, loyalty_headers)
    ann = _enrol(client, loyalty_headers, program, profiles("ann")["ann"])
    _adjust(client, loyalty_headers, ann, 500, qualifying=False)
    reward = _post(
        client,
        f"/api/loyalty/programs/{program}/rewards",
        {"name": "Tote bag", "kind": "product", "points_cost": 200, "stock": 2},
        loyalty_headers,
        201,
    )
    reward_url = f"/api/loyalty/rewards/{reward['id']}"
    redeem_url = f"/api/loyalty/members/{ann}/redemptions"
    body = {"reward_id": reward["id"]}
    no_key = client.post(redeem_url, json=body, headers=loyalty_headers)
    assert (no_key.status_code, no_key.json()["error"]["code"]) == (
        422,
        "loyalty.idempotency_key_required",
    )
    keyed = {**loyalty_headers, "Idempotency-Key": "tote-1"}
    redemption = _post(client, redeem_url, body, keyed, 201)
    assert _post(client, redeem_url, body, keyed, 201) == redemption
    assert (redemption["status"], redemption["points"]) == ("issued", 200)
    assert redemption["coupon_code"].startswith("LOY-")
    assert (
        _balance(client, loyalty_headers, ann),
        _get(client, reward_url, loyalty_headers)["stock"],
    ) == (
        300,
        1,
    )
    cancel_url = f"/api/loyalty/redemptions/{redemption['id']}/cancel"
    cancel_key = {**loyalty_headers, "Idempotency-Key": "cancel-1"}
    cancelled = _post(client, cancel_url, {"reason": "damaged"}, cancel_key)
    assert (cancelled["id"], cancelled["status"]) == (redemption["id"], "cancelled")
    assert cancelled["cancel_entry_id"] is not None
    assert cancelled["cancelled_at"] is not None
    # A retry of the same cancellation replays it; another cancellation is refused.
    assert _post(client, cancel_url, {"reason": "damaged"}, cancel_key) == cancelled
    again = client.post(cancel_url, json={"reason": "twice"}, headers=loyalty_headers)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "loyalty.redemption_already_cancelled"
    assert "cancelled already" in again.json()["error"]["message"]
    assert (
        _balance(client, loyalty_headers, ann),
        _get(client, reward_url, loyalty_headers)["stock"],
    ) == (
        500,
        2,
    )
    history = _get(client, f"/api/loyalty/members/{ann}/history", loyalty_headers)["items"]
    assert [(e["kind"], e["points"]) for e in history] == [
        ("refund", 200),
        ("redeem", -200),
        ("adjust", 500),
    ]
    listed = _get(client, redeem_url, loyalty_headers)
    assert [(r["id"], r["status"]) for r in listed["items"]] == [(redemption["id"], "cancelled")]
    unknown = client.post("/api/loyalty/redemptions/nope/cancel", json={}, headers=loyalty_headers)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (
        404,
        "loyalty.redemption_not_found",
    )


def test_instants_without_a_zone_in_request_bodies_are_read_as_utc(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    program = _programme(client, loyalty_headers)
    reward = client.post(
        f"/api/loyalty/programs/{program}/rewards",
        json={"name": "Summer", "points_cost": 5, "valid_until": "2030-07-01T00:00:00"},
        headers=loyalty_headers,
    )
    assert reward.status_code == 201, reward.text
    assert datetime.fromisoformat(reward.json()["valid_until"]) == datetime(2030, 7, 1, tzinfo=UTC)
    member = client.post(
        f"/api/loyalty/programs/{program}/members",
        json={"profile_id": profiles("ann")["ann"], "enrolled_at": "2025-01-01T08:00:00"},
        headers=loyalty_headers,
    )
    assert member.status_code == 200, member.text
    assert datetime.fromisoformat(member.json()["enrolled_at"]) == datetime(
        2025, 1, 1, 8, tzinfo=UTC
    )
    rule = client.post(
        f"/api/loyalty/programs/{program}/rules",
        json={
            "name": "Summer bonus",
            "event_name": "Order Completed",
            "formula": {"type": "fixed", "points": 5},
            "starts_at": "2030-06-01T00:00:00",
            "ends_at": "2030-09-01T00:00:00",
        },
        headers=loyalty_headers,
    )
    assert rule.status_code == 201, rule.text
    assert datetime.fromisoformat(rule.json()["starts_at"]) == datetime(2030, 6, 1, tzinfo=UTC)


def test_the_tier_job_downgrades_after_the_grace_period_only(
    db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    now = datetime.now(UTC)
    day = timedelta(days=1)
    program = make_program(db, tier_grace_days=30)
    with db.begin() as session:
        silver, gold = (
            service.create_tier(
                session,
                program_id=program.id,
                data=TierCreate(name=name, rank=rank, threshold=threshold),
            ).id
            for name, rank, threshold in (("Silver", 1, 100), ("Gold", 2, 500))
        )
    earnings = {
        # Gold 400 days ago, 150 since: Silver's worth once the old points leave the window.
        "ann": [(600, 400), (150, 100)],
        # Gold 380 days ago: below only since the old points left the window (days ago).
        "bob": [(600, 380)],
        # Gold 10 days ago: stays.
        "cara": [(600, 10)],
    }
    ids = {}
    for profile, credits in earnings.items():
        ids[profile] = make_member(db, program, profile).id
        for points, days_ago in credits:
            with db.begin() as session:
                service.adjust_points(
                    session,
                    member_id=ids[profile],
                    points=points,
                    reason="qualifying",
                    actor="test",
                    qualifying=True,
                    now=now - days_ago * day,
                )
    with db.begin() as session:
        # Last month's run: Ann's 600 had left the 12-month window, Bob's not yet.
        assert service.reevaluate_tiers(session, program_id=program.id, now=now - 31 * day) == []
    run = run_job(settings, db, warehouse, "loyalty.reevaluate_tiers")
    assert (run.status, run.rows) == ("succeeded", 1)
    with db.begin() as session:
        tiers_now = {p: session.get(Member, i).tier_id for p, i in ids.items()}  # type: ignore[union-attr]
        assert tiers_now == {"ann": silver, "bob": gold, "cara": gold}
        bob = session.get(Member, ids["bob"])
        assert bob is not None
        assert bob.below_tier_since is not None
        assert now <= bob.below_tier_since  # Bob's grace starts with this run
        history = service.tier_history(session, member_id=ids["ann"])
        assert [(c.from_tier_id, c.to_tier_id, c.reason, c.metric_value) for c in history] == [
            (None, gold, "upgrade", 600),
            (gold, silver, "downgrade", 150),
        ]
    # The next night changes nothing: Bob is still within his grace period.
    again = run_job(settings, db, warehouse, "loyalty.reevaluate_tiers")
    assert (again.status, again.rows) == ("succeeded", 0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_two_programmes_earn_on_the_same_events_each_by_its_rules_and_redeem_apart(
    db: Database, warehouse: Warehouse, settings: Settings, client: TestClient, loyalty_headers: H
) -> None:
    # "Points": everyone, 1 point per unit spent. "Stamps": enrolled members only, 10 per
    # order, 50 on the first one, doubled from Silver (2 orders) on.
    points = make_program(db, name="Points", enrolment="automatic")
    stamps = make_program(db, name="Stamps", tier_metric="orders")
    with db.begin() as session:
        add_base_rule(session, points)
        for rule in (
            RuleCreate(
                name="stamp", event_name="Order Completed", formula={"type": "fixed", "points": 10}
            ),
            RuleCreate(
                name="welcome",
                event_name="Order Completed",
                formula={"type": "fixed", "points": 50},
                limit_per_member=1,
                apply_tier_multiplier=False,
            ),
        ):
            service.create_rule(session, program_id=stamps.id, data=rule)
        service.create_tier(
            session,
            program_id=stamps.id,
            data=TierCreate(name="Silver", rank=1, threshold=2, multiplier=2),
        )
    ann, bob = [("user_id", "ann")], [("user_id", "bob")]
    write_events(
        warehouse,
        [
            (ann, "Order Completed", 40),
            (bob, "Order Completed", 25),
            (bob, "Order Completed", 30),
            (ann, "Order Completed", 15),
            (bob, "Order Completed", 12.5),
            (bob, "Order Refunded", 30),
        ],
        properties=[{"order_id": o} for o in ("a1", "b1", "b2", "a2", "b3", "b2")],
    )
    resolve(warehouse)
    bob_profile = profile_of(warehouse, "user_id", "bob")
    with db.begin() as session:
        stamps_bob = service.change_membership(
            session,
            program_id=stamps.id,
            profile_id=bob_profile,
            action="enrol",
            at=datetime(2026, 3, 1, tzinfo=UTC),
        ).id
    run = run_job(settings, db, warehouse, "loyalty.process_events")
    assert run.status == "succeeded", run.error

    def ledger_of(program: Program, profile: str) -> tuple[str, list[tuple[str, int]]]:
        url = f"/api/loyalty/programs/{program.id}/members"
        found = _get(client, f"{url}?profile_id={profile}", loyalty_headers)["items"]
        if not found:
            return "", []
        member_id = str(found[0]["id"])
        items = _get(client, f"/api/loyalty/members/{member_id}/history", loyalty_headers)["items"]
        return member_id, [(e["kind"], e["points"]) for e in reversed(items)]

    points_bob, bob_points = ledger_of(points, bob_profile)
    # 25 + 30 + 12 (12.5 rounded down), then b2's 30 taken back.
    assert bob_points == [("earn", 25), ("earn", 30), ("earn", 12), ("reverse", -30)]
    assert ledger_of(points, profile_of(warehouse, "user_id", "ann"))[1] == [
        ("earn", 40),
        ("earn", 15),
    ]
    # b1: 10 + 50 welcome; b2: 10 (Silver only after it); b3: 10 x 2; b2 refunded: its 10.
    member_id, entries = ledger_of(stamps, bob_profile)
    assert member_id == stamps_bob
    assert sorted(entries) == sorted(
        [("earn", 10), ("earn", 50), ("earn", 10), ("earn", 20), ("reverse", -10)]
    )
    assert ledger_of(stamps, profile_of(warehouse, "user_id", "ann")) == ("", [])
    assert (
        _balance(client, loyalty_headers, points_bob),
        _balance(client, loyalty_headers, stamps_bob),
    ) == (37, 80)
    tier = _get(client, f"/api/loyalty/members/{stamps_bob}/balance", loyalty_headers)["tier"]
    assert (tier["tier_name"], tier["metric"]) == ("Silver", "orders")
    assert (
        _get(client, f"/api/loyalty/members/{points_bob}/balance", loyalty_headers)["tier"] is None
    )
    # A redemption in one programme leaves the other alone, and a reward of one programme
    # cannot be redeemed with the other's points.
    with db.begin() as session:
        mug = service.create_reward(
            session, program_id=points.id, data=RewardCreate(name="Mug", points_cost=20, stock=5)
        ).id
    keyed = {**loyalty_headers, "Idempotency-Key": "mug"}
    redemption = _post(
        client, f"/api/loyalty/members/{points_bob}/redemptions", {"reward_id": mug}, keyed, 201
    )
    assert (
        _balance(client, loyalty_headers, points_bob),
        _balance(client, loyalty_headers, stamps_bob),
    ) == (17, 80)
    wrong = client.post(
        f"/api/loyalty/members/{stamps_bob}/redemptions",
        json={"reward_id": mug},
        headers={**loyalty_headers, "Idempotency-Key": "mug-stamps"},
    )
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (404, "loyalty.reward_not_found")
    _post(client, f"/api/loyalty/redemptions/{redemption['id']}/cancel", {}, loyalty_headers)
    assert (
        _balance(client, loyalty_headers, points_bob),
        _balance(client, loyalty_headers, stamps_bob),
    ) == (37, 80)
    with db.begin() as session:
        for member_id in (points_bob, stamps_bob):
            written = session.scalars(
                select(LedgerEntry.points).where(LedgerEntry.member_id == member_id)
            ).all()
            assert sum(written) == ledger.lots_sum(session, member_id=member_id)
    # Processing again awards nothing twice, in either programme.
    assert run_job(settings, db, warehouse, "loyalty.process_events").rows == 0
