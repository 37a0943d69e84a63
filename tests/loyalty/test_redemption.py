"""Rewards and redemptions: checks, one transaction, cancellation, and real concurrency."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select

from cdp.db import Database
from loyalty import ledger, service
from loyalty.errors import (
    InsufficientPoints,
    OutOfStock,
    RedemptionAlreadyCancelled,
    RedemptionLimitReached,
    RewardNotAvailable,
)
from loyalty.models import LedgerEntry, Lot, LotDraw, Program, Redemption, Reward, Tier
from loyalty.schemas import RewardCreate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, earn, make_member, make_program

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def _reward(db: Database, program: Program, **fields: Any) -> Reward:  # Any: reward fields
    with db.begin() as session:
        return service.create_reward(
            session,
            program_id=program.id,
            data=RewardCreate(**{"name": "Voucher", "points_cost": 100, **fields}),
        )


@pytest.fixture
def server(app: FastAPI) -> Iterator[str]:
    """The real app served by uvicorn on a free local port, in a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _redeem_concurrently(
    base: str, headers: dict[str, str], calls: list[tuple[str, str, str]]
) -> list[httpx.Response]:
    """POST every (member, reward, key) at once from a pool of 50 client threads."""

    def call(item: tuple[str, str, str]) -> httpx.Response:
        member_id, reward_id, key = item
        with httpx.Client(base_url=base, timeout=60) as client:
            return client.post(
                f"/api/loyalty/members/{member_id}/redemptions",
                json={"reward_id": reward_id},
                headers={**headers, "Idempotency-Key": key},
            )

    with ThreadPoolExecutor(max_workers=50) as pool:
        return list(pool.map(call, calls))


def test_fifty_concurrent_redemptions_against_a_balance_for_ten_let_exactly_ten_through(
    db: Database, server: str, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db)
    member = make_member(db, program)
    for i in range(4):  # several lots, so the draws interleave across lots
        earn(db, program, member, 250, key=f"lot-{i}", at=T0 + timedelta(days=i))
    reward = _reward(db, program)
    responses = _redeem_concurrently(
        server, loyalty_headers, [(member.id, reward.id, f"k{i}") for i in range(50)]
    )
    outcomes = Counter(
        r.status_code if r.status_code == 201 else r.json()["error"]["code"] for r in responses
    )
    assert outcomes == {201: 10, "loyalty.insufficient_points": 40}
    with db.begin() as session:
        assert ledger.lots_sum(session, member_id=member.id) == 0
        assert ledger.entries_sum(session, member_id=member.id) == 0
        assert all(lot.remaining >= 0 for lot in session.scalars(select(Lot)))
        drawn = session.scalars(select(LotDraw.points)).all()
        assert sum(drawn) == 1000
        codes = session.scalars(select(Redemption.coupon_code)).all()
        assert len(set(codes)) == 10


def test_concurrent_redemptions_by_many_members_never_oversell_stock(
    db: Database, server: str, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db)
    members = [make_member(db, program, f"p{i}") for i in range(10)]
    for m in members:
        earn(db, program, m, 1000, key=f"lot-{m.id}")
    reward = _reward(db, program, stock=7)
    calls = [(members[i % 10].id, reward.id, f"k{i}") for i in range(50)]
    responses = _redeem_concurrently(server, loyalty_headers, calls)
    outcomes = Counter(
        r.status_code if r.status_code == 201 else r.json()["error"]["code"] for r in responses
    )
    assert outcomes == {201: 7, "loyalty.out_of_stock": 43}
    with db.begin() as session:
        stored = session.get(Reward, reward.id)
        assert stored is not None
        assert stored.stock == 0
        spent = sum(1000 - ledger.lots_sum(session, member_id=m.id) for m in members)
        assert spent == 700


def test_concurrent_retries_with_one_key_redeem_once(
    db: Database, server: str, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db)
    member = make_member(db, program)
    earn(db, program, member, 1000)
    reward = _reward(db, program)
    responses = _redeem_concurrently(
        server, loyalty_headers, [(member.id, reward.id, "same") for _ in range(20)]
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    with db.begin() as session:
        assert ledger.lots_sum(session, member_id=member.id) == 900


def test_cancelling_a_redemption_returns_points_to_the_lots_they_came_from(db: Database) -> None:
    program = make_program(db)
    member = make_member(db, program)
    first = earn(db, program, member, 60, key="a", at=T0)
    second = earn(db, program, member, 60, key="b", at=T0 + timedelta(days=1))
    reward = _reward(db, program, stock=3)
    with db.begin() as session:
        redemption = service.redeem(session, member_id=member.id, reward_id=reward.id, now=T0)
    with db.begin() as session:
        assert service.qualifying_points(session, member_id=member.id) == 120
        lots = {lot.entry_id: lot.remaining for lot in session.scalars(select(Lot))}
        assert lots == {first.id: 0, second.id: 20}
        cancelled = service.cancel_redemption(
            session, redemption_id=redemption.id, reason="changed mind", now=T0
        )
        assert cancelled.status == "cancelled"
    with db.begin() as session:
        lots = {lot.entry_id: lot.remaining for lot in session.scalars(select(Lot))}
        assert lots == {first.id: 60, second.id: 60}
        stored = session.get(Reward, reward.id)
        assert stored is not None
        assert stored.stock == 3
        assert ledger.entries_sum(session, member_id=member.id) == 120
        assert service.qualifying_points(session, member_id=member.id) == 120
        with pytest.raises(RedemptionAlreadyCancelled):
            service.cancel_redemption(session, redemption_id=redemption.id, reason="again")


def test_cancelling_a_redemption_after_a_merge_gives_the_points_to_the_lots_holder(
    db: Database,
) -> None:
    program = make_program(db)
    absorbed = make_member(db, program, "guest")
    survivor = make_member(db, program, "account")
    earn(db, program, absorbed, 100)
    reward = _reward(db, program, points_cost=50)
    with db.begin() as session:
        redemption = service.redeem(
            session, member_id=absorbed.id, reward_id=reward.id, now=T0 + timedelta(hours=1)
        )
    with db.begin() as session:
        service.merge_profiles(
            session,
            program_id=program.id,
            from_profile_id="guest",
            to_profile_id="account",
            now=T0 + timedelta(hours=2),
        )
    with db.begin() as session:
        service.cancel_redemption(
            session, redemption_id=redemption.id, reason="t", now=T0 + timedelta(hours=3)
        )
    with db.begin() as session:
        for member, points in ((absorbed, 0), (survivor, 100)):
            assert ledger.entries_sum(session, member_id=member.id) == points
            assert ledger.lots_sum(session, member_id=member.id) == points
        stored = session.get(Redemption, redemption.id)
        assert stored is not None
        given = session.get(LedgerEntry, stored.cancel_entry_id)
        assert given is not None
        assert (given.member_id, given.points) == (survivor.id, 50)


def test_redemption_checks_tier_limit_validity_stock_and_balance(db: Database) -> None:
    program = make_program(db)
    member = make_member(db, program)
    earn(db, program, member, 1000)
    with db.begin() as session:
        gold = Tier(program_id=program.id, name="Gold", rank=2, threshold=500, benefits=[])
        session.add(gold)
        session.flush()
        gold_id = gold.id
    vip = _reward(db, program, min_tier_id=gold_id)
    once = _reward(db, program, per_member_limit=1)
    later = _reward(db, program, valid_from=T0 + timedelta(days=30))
    none_left = _reward(db, program, stock=0)
    dear = _reward(db, program, points_cost=5000)
    with db.begin() as session:
        with pytest.raises(RewardNotAvailable):
            service.redeem(session, member_id=member.id, reward_id=vip.id, now=T0)
        service.redeem(session, member_id=member.id, reward_id=once.id, now=T0)
        with pytest.raises(RedemptionLimitReached):
            service.redeem(session, member_id=member.id, reward_id=once.id, now=T0)
        with pytest.raises(RewardNotAvailable):
            service.redeem(session, member_id=member.id, reward_id=later.id, now=T0)
        with pytest.raises(OutOfStock):
            service.redeem(session, member_id=member.id, reward_id=none_left.id, now=T0)
        with pytest.raises(InsufficientPoints):
            service.redeem(session, member_id=member.id, reward_id=dear.id, now=T0)
        stored = service.get_member(session, member_id=member.id)
        stored.tier_id = gold_id
        session.flush()
        assert service.redeem(session, member_id=member.id, reward_id=vip.id, now=T0).points == 100


def test_redemption_over_http_needs_an_idempotency_key(
    db: Database, client: Any, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db)
    member = make_member(db, program)
    reward = _reward(db, program)
    resp = client.post(
        f"/api/loyalty/members/{member.id}/redemptions",
        json={"reward_id": reward.id},
        headers=loyalty_headers,
    )
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "loyalty.idempotency_key_required"
