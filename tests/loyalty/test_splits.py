"""Identity splits a profile: each ledger entry follows the identifiers of its event."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from identity import service as identity_service
from identity.schemas import UnmergeCreate
from loyalty import ledger, service
from loyalty.models import Activity, LedgerEntry, Lot, Member, Program
from loyalty.schemas import ProgramCreate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import add_base_rule
from tests.loyalty.identity_data import profile_of, resolve, write_events

DEVICE = ("anonymous_id", "dev-1")
EMAIL = ("email", "ann@example.com")


def _sync(db: Database, warehouse: Warehouse, program: Program) -> None:
    with db.begin() as session:
        service.sync_merges(session, warehouse, program_id=program.id)
        service.sync_program(session, warehouse, program_id=program.id)


def _state(db: Database, warehouse: Warehouse, program: Program) -> dict[str, tuple[int, ...]]:
    """Per identifier: the member's (balance, entries sum, lots sum, qualifying, spend)."""
    out: dict[str, tuple[int, ...]] = {}
    with db.begin() as session:
        for ident in (DEVICE, EMAIL):
            member = service.member_by_profile(
                session, program_id=program.id, profile_id=profile_of(warehouse, *ident)
            )
            group = service.member_group(session, member_id=member.id)
            spend = session.scalars(select(Activity.spend).where(Activity.member_id.in_(group)))
            out[ident[0]] = (
                service.member_balance(session, member_id=member.id)[1].active,
                sum(ledger.entries_sum(session, member_id=m) for m in group),
                ledger.lots_sum(session, member_id=member.id),
                service.qualifying_points(session, member_id=member.id),
                int(sum(spend)),
            )
    return out


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_unmerge_in_identity_splits_the_ledger_by_the_events_identifiers(
    db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    with db.begin() as session:
        program = service.create_program(
            session,
            data=ProgramCreate(name="Club", status="active", enrolment="automatic"),
        )
        add_base_rule(session, program)
    # Two people's orders, then a login that (wrongly) ties the device to the email.
    write_events(warehouse, [([DEVICE], "Order Completed", 30), ([EMAIL], "Order Completed", 50)])
    resolve(warehouse)
    _sync(db, warehouse, program)
    write_events(warehouse, [([DEVICE, EMAIL], "Signed In", 0)])
    resolve(warehouse)
    _sync(db, warehouse, program)
    assert profile_of(warehouse, *DEVICE) == profile_of(warehouse, *EMAIL)
    # While merged: one more order by email, and 10 points spent (from the oldest lot, the
    # device's order: 20 of its 30 points are left).
    write_events(warehouse, [([EMAIL], "Order Completed", 20)])
    resolve(warehouse)
    _sync(db, warehouse, program)
    with db.begin() as session:
        merged = service.member_by_profile(
            session, program_id=program.id, profile_id=profile_of(warehouse, *EMAIL)
        )
        service.adjust_points(
            session, member_id=merged.id, points=-10, reason="goodwill reversal", actor="t"
        )
        assert service.member_balance(session, member_id=merged.id)[1].active == 90
    # The wrong link is removed: identity splits the profile and publishes the split.
    with db.begin() as session:
        identity_service.unmerge(
            session,
            warehouse,
            settings=settings,
            profile_id=profile_of(warehouse, *EMAIL),
            request=UnmergeCreate.model_validate(
                {
                    "link": {
                        "from": {"kind": "anonymous_id", "value": "dev-1"},
                        "to": {"kind": "email", "value": "ann@example.com"},
                    }
                }
            ),
            actor="admin",
        )
    assert profile_of(warehouse, *DEVICE) != profile_of(warehouse, *EMAIL)
    _sync(db, warehouse, program)
    # The device keeps its order's lot (less the 10 spent while merged); the email's two
    # orders, whichever member earned them, follow their events; the spend too.
    expected = {"anonymous_id": (20, 20, 20, 30, 30), "email": (70, 70, 70, 70, 70)}
    assert _state(db, warehouse, program) == expected
    # Applying the published split again changes nothing.
    with db.begin() as session:
        stored = session.get(Program, program.id)
        assert stored is not None
        stored.last_merge_seq = 0
    _sync(db, warehouse, program)
    assert _state(db, warehouse, program) == expected
    with db.begin() as session:
        # Every lot is with the member of its event's profile now.
        lots = session.execute(
            select(LedgerEntry.event_id, Member.profile_id)
            .join(Lot, Lot.entry_id == LedgerEntry.id)
            .join(Member, Member.id == Lot.member_id)
        ).all()
        events = [(int(e), str(p)) for e, p in lots if e is not None]
        assert len(events) == len(lots) == 3
        owners = service.event_profiles_of(warehouse, event_ids=[e for e, _ in events])
        assert all(owners[e] == p for e, p in events)
        splits = session.scalars(select(LedgerEntry).where(LedgerEntry.kind == "split")).all()
        assert len(splits) >= 4
        assert all(e.source_entry_id for e in splits)
