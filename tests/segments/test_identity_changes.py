"""Segment memberships follow each person through identity's merges and admin unmerges.

Run as production runs it: identity's job resolves the new events, the segments jobs refresh
the attributes (then the event map and catalogue) and the due segments; the unmerge goes
through the API.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient

from cdp.app import registered_jobs
from cdp.config import Settings
from cdp.db import Database
from cdp.scheduler import JobRunner
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from segments import service
from tests.segments.conftest import NOW, Ev, write_events

D = timedelta(days=1)
# One rule of each kind a merge or a split moves: a trait, an event, a computed attribute.
RULES: dict[str, dict[str, Any]] = {  # Any: rule JSON
    "french": {"field": "traits.country", "op": "eq", "value": "FR"},
    "buyers": {"event": "Order Completed"},
    "repeat": {"field": "attributes.orders_count", "op": "gte", "value": 1},
}


class Platform:
    """The stores and the jobs, with a segments clock that moves past every refresh period."""

    def __init__(self, settings: Settings, db: Database, warehouse: Warehouse) -> None:
        self.settings, self.db, self.warehouse = settings, db, warehouse
        self.runner = JobRunner(settings, db, warehouse)
        self.runner.register(*registered_jobs())
        self.clock = NOW
        self.ids: dict[str, str] = {}
        self.modes: set[str] = set()

    def create_segments(self) -> None:
        """Save the rules (the attribute job first: saving compiles against the catalogue)."""
        for job in ("identity.resolve", "segments.attributes"):
            assert self.runner.run(job, trigger="schedule").status == "succeeded"
        with self.db.begin() as session:
            for name, rule in RULES.items():
                self.ids[name] = service.create_segment(
                    session,
                    self.warehouse,
                    name=name,
                    description=None,
                    rule=rule,
                    refresh_minutes=None,
                    settings=self.settings.segments,
                    actor=None,
                ).id

    def catch_up(self) -> None:
        """What the scheduler does after new events: identity, attributes, due segments."""
        for job in ("identity.resolve", "segments.attributes"):
            assert self.runner.run(job, trigger="schedule").status == "succeeded"
        self.clock += timedelta(days=1)
        done = service.refresh_due_segments(
            self.db, self.warehouse, settings=self.settings.segments, now=self.clock
        )
        assert len(done) == len(RULES)
        self.modes = {r.mode for r in done}

    def members(self) -> dict[str, set[str]]:
        return {
            name: {
                str(r[0])
                for r in self.warehouse.rows(
                    Query(
                        "SELECT profile_id FROM segment_membership WHERE segment_id = $s",
                        {"s": sid},
                    )
                )
            }
            for name, sid in self.ids.items()
        }

    def changes_since(self, seq: int) -> set[tuple[str, str, str]]:
        names = {sid: name for name, sid in self.ids.items()}
        frame = service.segment_events_since(self.warehouse, after_seq=seq)
        return {
            (names[r["segment_id"]], r["kind"], r["profile_id"])
            for r in frame.iter_rows(named=True)
        }

    def last_seq(self) -> int:
        return int(self.warehouse.scalar(Query("SELECT coalesce(max(seq), 0) FROM segment_events")))

    def full_refresh_changes_nothing(self) -> None:
        with self.db.begin() as session:
            for sid in self.ids.values():
                result = service.refresh_segment(
                    session,
                    self.warehouse,
                    segment_id=sid,
                    settings=self.settings.segments,
                    now=self.clock,
                    full=True,
                )
                assert (result.entries, result.exits) == (0, 0)


def _lookup(warehouse: Warehouse, kind: str, value: str) -> str:
    pid = identity_service.lookup(warehouse, kind=kind, value=value)
    assert pid is not None
    return pid


def test_memberships_follow_each_person_through_a_merge_and_an_unmerge(
    settings: Settings,
    db: Database,
    warehouse: Warehouse,
    client: TestClient,
    admin_headers: dict[str, str],
) -> None:
    p = Platform(settings, db, warehouse)
    write_events(
        warehouse,
        [
            Ev("ann", type="identify", at=NOW - 30 * D),
            Ev("bob", type="identify", at=NOW - 20 * D, traits={"country": "DE"}),
            # An anonymous French shopper who buys, known by an email.
            Ev(
                "anon-1",
                type="identify",
                at=NOW - 10 * D,
                traits={"country": "FR"},
                kind="anonymous_id",
                email="b@x.io",
            ),
            Ev(
                "anon-1",
                "Order Completed",
                at=NOW - 9 * D,
                kind="anonymous_id",
                properties={"order_id": "o1", "revenue": 40.0},
            ),
        ],
    )
    p.create_segments()
    p.catch_up()
    ann, shopper = _lookup(warehouse, "user_id", "ann"), _lookup(warehouse, "email", "b@x.io")
    assert p.members() == {name: {shopper} for name in RULES}

    # Ann signs in with the shopper's email: the shopper's profile merges into Ann's (older).
    seq = p.last_seq()
    write_events(warehouse, [Ev("ann", "Signed In", at=NOW - 2 * D, email="b@x.io")])
    p.catch_up()
    assert p.modes == {"incremental"}
    assert _lookup(warehouse, "anonymous_id", "anon-1") == ann
    assert identity_service.merges_since(warehouse, after_seq=0)["kind"].to_list() == ["merge"]
    assert p.members() == {name: {ann} for name in RULES}
    assert p.changes_since(seq) == {
        change for name in RULES for change in ((name, "entry", ann), (name, "exit", shopper))
    }
    p.full_refresh_changes_nothing()

    # An admin removes the link: the shopper's identifiers leave Ann's profile (a new id; the
    # old one now names it), and with them the trait, the order and the attribute.
    seq = p.last_seq()
    answer = client.post(
        f"/api/profiles/{ann}/unmerge",
        headers=admin_headers,
        json={
            "link": {
                "from": {"kind": "user_id", "value": "ann"},
                "to": {"kind": "email", "value": "b@x.io"},
            }
        },
    )
    assert answer.status_code == 200, answer.text
    p.catch_up()
    split_off = _lookup(warehouse, "email", "b@x.io")
    assert split_off not in (ann, shopper)
    assert _lookup(warehouse, "user_id", "ann") == ann
    assert identity_service.resolve_profile_id(warehouse, profile_id=shopper) == split_off
    assert p.modes == {"incremental"}
    assert p.members() == {name: {split_off} for name in RULES}
    assert p.changes_since(seq) == {
        change for name in RULES for change in ((name, "entry", split_off), (name, "exit", ann))
    }
    p.full_refresh_changes_nothing()

    # The decision lifted, the two merge back into Ann's profile, and so do the memberships.
    seq = p.last_seq()
    override = answer.json()["override_id"]
    lifted = client.delete(f"/api/identity/overrides/{override}", headers=admin_headers)
    assert lifted.status_code == 200, lifted.text
    p.catch_up()
    assert _lookup(warehouse, "email", "b@x.io") == ann
    assert p.members() == {name: {ann} for name in RULES}
    assert p.changes_since(seq) == {
        change for name in RULES for change in ((name, "entry", ann), (name, "exit", split_off))
    }
    p.full_refresh_changes_nothing()
    p.runner.shutdown()


def test_refresh_between_a_merge_and_the_attribute_refresh_follows_the_person(
    settings: Settings, db: Database, warehouse: Warehouse
) -> None:
    """A segment refresh that runs after identity merged but before the attribute job (every
    5 minutes, segments every minute) must not keep the merged-away id, and the survivor
    enters once its attributes are computed."""
    p = Platform(settings, db, warehouse)
    write_events(
        warehouse,
        [
            Ev("ann", type="identify", at=NOW - 30 * D, traits={"country": "DE"}),
            Ev(
                "anon-1",
                "Order Completed",
                at=NOW - 9 * D,
                kind="anonymous_id",
                email="b@x.io",
                properties={"order_id": "o1", "revenue": 40.0},
            ),
        ],
    )
    p.create_segments()
    p.catch_up()
    shopper = _lookup(warehouse, "email", "b@x.io")
    assert p.members()["repeat"] == {shopper}
    write_events(warehouse, [Ev("ann", "Signed In", at=NOW - 2 * D, email="b@x.io")])
    assert p.runner.run("identity.resolve", trigger="schedule").status == "succeeded"
    ann = _lookup(warehouse, "user_id", "ann")
    p.clock += timedelta(days=1)
    service.refresh_due_segments(db, warehouse, settings=settings.segments, now=p.clock)
    assert shopper not in p.members()["repeat"]
    assert p.members()["buyers"] == {ann}
    p.catch_up()
    assert p.members() == {"french": set(), "buyers": {ann}, "repeat": {ann}}
    p.full_refresh_changes_nothing()
    p.runner.shutdown()
