"""Backfill from the warehouse is set-based and gives the ledger of one-by-one processing."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select

from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from identity import service as identity_service
from identity.rules import IdentityRules
from loyalty import engine, service
from loyalty.models import (
    Activity,
    LedgerEntry,
    Lot,
    LotDraw,
    Member,
    Program,
    Rule,
    Tier,
    TierChange,
)
from loyalty.schemas import RuleCreate, TierCreate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, add_base_rule, make_program
from tests.loyalty.events import ev

RULES: list[dict[str, Any]] = [  # Any: rule JSON
    {"name": "base", "formula": {"type": "per_amount", "rate": 1}, "cap_per_day": 150},
    {
        "name": "shoes x2",
        "formula": {
            "type": "per_line",
            "default_multiplier": 0,
            "lines": [{"match": {"category": ["shoes"]}, "multiplier": 1}],
        },
        "cap_per_month": 200,
    },
    {"name": "first", "formula": {"type": "fixed", "points": 100}, "limit_per_member": 1},
    {"name": "budget", "formula": {"type": "fixed", "points": 20}, "budget": 400},
    {
        "name": "flash",
        "priority": 1,
        "exclusive": True,
        "formula": {"type": "per_amount", "rate": 5, "rounding": "half_up"},
        # Capped: once a member's day is used up, the later rules earn again on its orders.
        "cap_per_day": 300,
        "starts_at": (T0 + timedelta(days=10)).isoformat(),
        "ends_at": (T0 + timedelta(days=12)).isoformat(),
    },
    {
        "name": "review",
        "event_name": "Review Submitted",
        "formula": {"type": "fixed", "points": 15},
        "cap_per_month": 30,
    },
]


TIERS = (("Silver", 1, 250.0, 1.5), ("Gold", 2, 700.0, 2.0))


def _history(seed: int, n: int = 90, *, guests: bool = False) -> list[dict[str, Any]]:  # Any: rows
    """`guests`: half the refunds come from a profile that is no member (a till return
    without the card, say): they must still reverse the order's points."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []  # Any: rows
    orders: list[tuple[str, str]] = []
    at = T0
    for i in range(1, n + 1):
        at += timedelta(hours=rng.randint(1, 20))
        profile = f"p{rng.randint(1, 6)}"
        roll = rng.random()
        if roll < 0.65:
            order = f"o{i}"
            orders.append((profile, order))
            products: list[dict[str, Any]] = [  # Any: product JSON
                {
                    "sku": f"s{rng.randint(1, 9)}",
                    "category": rng.choice(["shoes", "hats", "tees"]),
                    "price": round(rng.uniform(3, 80), 2),
                    "quantity": rng.randint(1, 3),
                }
                for _ in range(rng.randint(1, 3))
            ]
            total = round(sum(float(p["price"]) * int(p["quantity"]) for p in products), 2)
            rows.append(ev(profile, at, event_id=i, order_id=order, total=total, products=products))
        elif roll < 0.85:
            rows.append(ev(profile, at, "Review Submitted", i))
        elif orders:
            who, order = rng.choice(orders)
            if guests and rng.random() < 0.5:
                who = "guest"
            rows.append(ev(who, at, "Order Refunded", i, order_id=order, total=rng.randint(1, 60)))
        else:
            rows.append(ev(profile, at, "Page Viewed", i))
    return rows


def _load_warehouse(warehouse: Warehouse, rows: list[dict[str, Any]]) -> None:  # Any: rows
    table = (
        pl.DataFrame(rows)
        .with_columns(
            pl.lit(1, dtype=pl.Int64).alias("batch_id"),
            pl.col("profile_id").alias("user_id"),
            pl.lit(None, dtype=pl.String).alias("anonymous_id"),
            pl.col("timestamp").dt.replace_time_zone(None),
            pl.col("timestamp").dt.replace_time_zone(None).alias("received_at"),
            pl.lit(None, dtype=pl.String).alias("traits"),
            pl.lit(None, dtype=pl.String).alias("context"),
        )
        .to_arrow()
    )
    with warehouse.cursor() as cur:
        cur.register("incoming", table)
        cur.execute(
            "INSERT INTO events SELECT event_id, message_id, source_id, batch_id, type, event,"
            " user_id, anonymous_id, timestamp, received_at, properties::JSON, traits::JSON,"
            " context::JSON FROM incoming"
        )
        cur.unregister("incoming")
        ids = pl.DataFrame(
            {
                "event_id": [r["event_id"] for r in rows],
                "kind": ["user_id"] * len(rows),
                "value": [r["profile_id"] for r in rows],
            },
            schema={"event_id": pl.Int64, "kind": pl.String, "value": pl.String},
        )
        cur.register("incoming_ids", ids.to_arrow())
        cur.execute("INSERT INTO event_identifiers SELECT * FROM incoming_ids")
        cur.unregister("incoming_ids")
    identity_service.resolve(warehouse, settings=Settings(), rules=IdentityRules())


def profile_of(warehouse: Warehouse, user_id: str) -> str:
    """The profile identity resolved for a user id."""
    profile_id = identity_service.lookup(warehouse, kind="user_id", value=user_id)
    assert profile_id is not None
    return profile_id


def _programme_with_rules(db: Database, name: str) -> Program:
    program = make_program(
        db,
        name=name,
        enrolment="automatic",
        timezone="Europe/Paris",
        pending_days=3,
        expiry_policy="rolling",
        expiry_months=6,
    )
    with db.begin() as session:
        for rule in RULES:
            body = {"event_name": "Order Completed", **rule}
            service.create_rule(session, program_id=program.id, data=RuleCreate(**body))
        # Upgrades happen mid-history; later events earn with the new multiplier, and a
        # rule reads the tier in its condition.
        for name, rank, threshold, multiplier in TIERS:
            service.create_tier(
                session,
                program_id=program.id,
                data=TierCreate(name=name, rank=rank, threshold=threshold, multiplier=multiplier),
            )
        service.create_rule(
            session,
            program_id=program.id,
            data=RuleCreate(
                name="gold review bonus",
                event_name="Review Submitted",
                condition={"field": "member.tier", "value": "Gold"},
                formula={"type": "fixed", "points": 7},
                apply_tier_multiplier=False,
            ),
        )
    return program


def _ledger(db: Database, program: Program) -> list[tuple[Any, ...]]:
    with db.begin() as session:
        rows = session.execute(
            select(
                Member.profile_id,
                LedgerEntry.id,
                LedgerEntry.message_id,
                Rule.name,
                LedgerEntry.kind,
                LedgerEntry.points,
                LedgerEntry.qualifying_points,
                LedgerEntry.unrecovered,
                LedgerEntry.local_date,
                LedgerEntry.pending_until,
                LedgerEntry.expires_at,
                Lot.remaining,
            )
            .join(Member, Member.id == LedgerEntry.member_id)
            .outerjoin(Rule, Rule.id == LedgerEntry.rule_id)
            .outerjoin(Lot, Lot.entry_id == LedgerEntry.id)
            .where(LedgerEntry.program_id == program.id)
        ).all()
        members = session.execute(
            select(Member.profile_id, Member.enrolled_at, Tier.name, Member.tier_since)
            .outerjoin(Tier, Tier.id == Member.tier_id)
            .where(Member.program_id == program.id)
        ).all()
        changes = session.execute(
            select(Member.profile_id, TierChange.reason, TierChange.at, TierChange.metric_value)
            .join(Member, Member.id == TierChange.member_id)
            .where(TierChange.program_id == program.id)
        ).all()
    return sorted((tuple(str(v) for v in r) for r in [*rows, *members, *changes]), key=str)


def _upgrades(db: Database, program: Program) -> list[tuple[str, datetime]]:
    with db.begin() as session:
        rows = session.execute(
            select(Member.profile_id, TierChange.at)
            .join(Member, Member.id == TierChange.member_id)
            .where(TierChange.program_id == program.id, TierChange.reason == "upgrade")
        ).all()
    return [(str(p), at) for p, at in rows]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("guests", [False, True], ids=["members", "guest-refunds"])
def test_backfill_gives_the_same_ledger_as_processing_events_one_by_one(
    db: Database, warehouse: Warehouse, guests: bool
) -> None:
    rows = _history(seed=7, guests=guests)
    _load_warehouse(warehouse, rows)
    program = _programme_with_rules(db, "club")
    with db.begin() as session:
        result, mark = service.backfill(session, warehouse, program_id=program.id)
    assert mark == len(rows)
    assert result.credits > 50
    assert result.reversals > 3
    # Several members went up mid-history, some twice, well before the last event.
    upgrades = _upgrades(db, program)
    assert len(upgrades) >= 4
    assert len({p for p, _ in upgrades}) < len(upgrades)
    assert min(at for _, at in upgrades) < rows[len(rows) // 2]["timestamp"]
    set_based = _ledger(db, program)
    with db.begin() as session:
        again, _ = service.backfill(session, warehouse, program_id=program.id)
    assert (again.credits, again.reversals, again.enrolled) == (0, 0, 0)
    assert _ledger(db, program) == set_based
    _forget(db, program)
    with db.begin() as session:
        events = service.read_events(
            warehouse,
            after_event_id=0,
            up_to_event_id=mark,
            names=["Order Completed", "Order Refunded", "Review Submitted"],
        )
    for i in range(events.height):
        with db.begin() as session:
            stored = session.get(Program, program.id)
            assert stored is not None
            engine.process_events(session, program=stored, events=events.slice(i, 1))
    assert _ledger(db, program) == set_based
    if guests:
        # The guests' refunds reversed their orders' points (on the buyers' members).
        guest_refunds = {r["message_id"] for r in rows if r["profile_id"] == "guest"}
        keys = [f"event:{m}:reverse:{program.id}" for m in guest_refunds]
        with db.begin() as session:
            reversed_ = session.scalar(
                select(func.count()).where(
                    LedgerEntry.kind == "reverse", LedgerEntry.idempotency_key.in_(keys)
                )
            )
        assert guest_refunds
        assert reversed_


def _forget(db: Database, program: Program) -> None:
    """Erase what processing wrote for the programme, to process the history again."""
    with db.begin() as session:
        entries = select(LedgerEntry.id).where(LedgerEntry.program_id == program.id)
        session.execute(delete(LotDraw).where(LotDraw.entry_id.in_(entries)))
        session.execute(delete(Lot).where(Lot.program_id == program.id))
        session.execute(delete(LedgerEntry).where(LedgerEntry.program_id == program.id))
        session.execute(delete(Activity).where(Activity.program_id == program.id))
        session.execute(delete(TierChange).where(TierChange.program_id == program.id))
        session.execute(delete(Member).where(Member.program_id == program.id))


def test_sync_processes_only_events_after_the_mark(
    db: Database, warehouse: Warehouse, client: TestClient, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db, enrolment="automatic")
    with db.begin() as session:
        add_base_rule(session, program)
    _load_warehouse(warehouse, [ev("a", T0, event_id=1, total=10)])
    url = f"/api/loyalty/programs/{program.id}/sync"
    first = client.post(url, headers=loyalty_headers).json()
    assert (first["credits"], first["points"], first["last_event_id"]) == (1, 10, 1)
    _load_warehouse(warehouse, [ev("a", T0, event_id=2, total=5)])
    second = client.post(url, headers=loyalty_headers).json()
    assert (second["events"], second["credits"], second["last_event_id"]) == (1, 1, 2)
    backfilled = client.post(
        f"/api/loyalty/programs/{program.id}/backfill", headers=loyalty_headers
    ).json()
    assert (backfilled["events"], backfilled["credits"]) == (2, 0)
    with db.begin() as session:
        member = service.member_by_profile(
            session, program_id=program.id, profile_id=profile_of(warehouse, "a")
        )
        assert service.member_balance(session, member_id=member.id)[1].active == 15


def test_sync_in_capped_chunks_gives_the_same_ledger_as_one_backfill(
    db: Database, warehouse: Warehouse
) -> None:
    rows = _history(seed=11)
    _load_warehouse(warehouse, rows)
    program = _programme_with_rules(db, "club")
    with db.begin() as session:
        service.backfill(session, warehouse, program_id=program.id)
    at_once = _ledger(db, program)
    _forget(db, program)
    with db.begin() as session:
        stored = session.get(Program, program.id)
        assert stored is not None
        stored.last_event_id = 0
    marks: list[int] = []
    while not marks or marks[-1] < len(rows):
        with db.begin() as session:
            _, mark = service.sync_program(session, warehouse, program_id=program.id, max_events=25)
        marks.append(mark)
    assert marks == [25, 50, 75, len(rows)]
    assert _ledger(db, program) == at_once


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_backfill_follows_event_time_when_sources_were_loaded_out_of_order(
    db: Database, warehouse: Warehouse
) -> None:
    # Ids no longer follow time (as when a till file is imported after the web stream):
    # the backfill still earns as one-by-one processing in time order does, across slices.
    rows = _history(seed=5)
    shuffled = list(range(1, len(rows) + 1))
    random.Random(3).shuffle(shuffled)
    for row, new_id in zip(rows, shuffled, strict=True):
        row["event_id"], row["message_id"] = new_id, f"m{new_id}"
    _load_warehouse(warehouse, sorted(rows, key=lambda r: r["event_id"]))
    program = _programme_with_rules(db, "club")
    with db.begin() as session:
        result = service.process_range(
            session,
            warehouse,
            program_id=program.id,
            after_event_id=0,
            up_to_event_id=len(rows),
            batch_size=20,
            by_time=True,
        )
    assert result.credits > 50
    by_slices = _ledger(db, program)
    _forget(db, program)
    events = service.read_events(
        warehouse,
        after_event_id=0,
        up_to_event_id=len(rows),
        names=["Order Completed", "Order Refunded", "Review Submitted"],
    ).sort("timestamp", "event_id")
    for i in range(events.height):
        with db.begin() as session:
            stored = session.get(Program, program.id)
            assert stored is not None
            engine.process_events(session, program=stored, events=events.slice(i, 1))
    assert _ledger(db, program) == by_slices
