"""Privacy erasure: loyalty anonymises an erased member's records and keeps the sums."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cdp.config import Settings
from cdp.db import Database
from cdp.scheduler import JobRunner
from cdp.warehouse import Warehouse
from identity import service as identity_service
from loyalty import jobs, ledger, service
from loyalty.errors import MemberNotFound
from loyalty.models import (
    Activity,
    IdempotencyRecord,
    LedgerEntry,
    Lot,
    Member,
    MemberMerge,
    Program,
)
from tests.conftest import BACKENDS
from tests.loyalty.conftest import add_base_rule, make_program
from tests.loyalty.identity_data import profile_of, resolve, write_events


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_erasure_anonymises_the_member_and_keeps_the_ledger_sums(
    db: Database,
    warehouse: Warehouse,
    settings: Settings,
    client: TestClient,
    loyalty_headers: dict[str, str],
) -> None:
    program = make_program(db, enrolment="automatic")
    with db.begin() as session:
        add_base_rule(session, program)
    ann, bob = ("email", "ann@example.com"), ("email", "bob@example.com")
    write_events(
        warehouse,
        [
            ([("anonymous_id", "d1")], "Order Completed", 12),
            ([bob], "Order Completed", 7),
            ([ann], "Order Completed", 30),
        ],
        properties=[{"order_id": "A-1"}, {"order_id": "B-1"}, {"order_id": "A-2"}],
    )
    resolve(warehouse)
    # A write request whose stored response names the (device's) profile.
    enrol = client.post(
        f"/api/loyalty/programs/{program.id}/members",
        json={"profile_id": profile_of(warehouse, "anonymous_id", "d1"), "action": "enrol"},
        headers={**loyalty_headers, "Idempotency-Key": "enrol-ann"},
    )
    assert enrol.status_code == 200, enrol.text
    with db.begin() as session:
        service.sync_program(session, warehouse, program_id=program.id)
    # Ann's device and email merge: two memberships fold into one, with a recorded merge.
    write_events(warehouse, [([ann, ("anonymous_id", "d1")], "Signed In", 0)])
    resolve(warehouse)
    with db.begin() as session:
        service.sync_merges(session, warehouse, program_id=program.id)
    ann_profile = profile_of(warehouse, *ann)
    with db.begin() as session:
        member = service.member_by_profile(session, program_id=program.id, profile_id=ann_profile)
        group = service.member_group(session, member_id=member.id)
        assert len(group) == 2
        before = service.kpis(session, warehouse, program_id=program.id)
        assert service.member_balance(session, member_id=member.id)[1].active == 42
        assert session.scalar(select(func.count()).select_from(IdempotencyRecord)) == 1
    with db.begin() as session:
        identity_service.erase_profile(session, warehouse, profile_id=ann_profile, actor="dpo")
    runner = JobRunner(settings, db, warehouse)
    runner.register(*jobs.JOBS)
    assert runner.run("loyalty.apply_merges", trigger="manual").status == "succeeded"
    runner.shutdown()
    with db.begin() as session:
        with pytest.raises(MemberNotFound):
            service.member_by_profile(session, program_id=program.id, profile_id=ann_profile)
        members = session.scalars(select(Member).where(Member.id.in_(group))).all()
        assert {m.profile_id for m in members} == {f"erased:{m}" for m in group}
        assert {m.status for m in members} == {"erased", "merged"}
        # The sums stay: the balance is still a liability, entries still sum to lots.
        after = service.kpis(session, warehouse, program_id=program.id)
        assert (after.points_outstanding, after.liability) == (
            before.points_outstanding,
            before.liability,
        )
        assert ledger.entries_sum(session, member_id=member.id) == 42
        assert ledger.lots_sum(session, member_id=member.id) == 42
        # Nothing links the records to the person any more.
        entries = session.scalars(select(LedgerEntry).where(LedgerEntry.member_id.in_(group)))
        for entry in entries:
            assert (entry.event_id, entry.message_id, entry.order_id, entry.reason) == (
                None,
                None,
                None,
                None,
            )
            assert entry.idempotency_key == f"erased:{entry.id}"
        lots = session.scalars(select(Lot.order_id).where(Lot.member_id.in_(group))).all()
        assert lots
        assert set(lots) == {None}
        activity = session.scalars(select(Activity).where(Activity.member_id.in_(group))).all()
        assert len(activity) == 2
        assert {(a.event_id, a.order_id) for a in activity} == {(None, None)}
        reasons = session.scalars(select(MemberMerge.reason)).all()
        assert reasons
        assert set(reasons) == {None}
        assert session.scalar(select(func.count()).select_from(IdempotencyRecord)) == 0
        # Bob is untouched.
        bob_member = service.member_by_profile(
            session, program_id=program.id, profile_id=profile_of(warehouse, *bob)
        )
        assert service.member_balance(session, member_id=bob_member.id)[1].active == 7
        kept = session.scalars(
            select(LedgerEntry.order_id).where(LedgerEntry.member_id == bob_member.id)
        ).all()
        assert kept == ["B-1"]
        stored = session.get(Program, program.id)
        assert stored is not None
        assert stored.last_erasure_seq == 1
    # The snapshot for segment rules leaves erased members out.
    with db.begin() as session:
        assert service.publish_member_snapshot(session, warehouse) == 1
