"""The profiles version: every identity write to `profiles` bumps it, a no-op run does not.

Later layers (segments) compare it instead of scanning `profiles`; a writer that forgot to
bump it would leave their cached results stale, which is what these tests look for.
"""

from __future__ import annotations

from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from identity import service
from identity.schemas import IdentifierRef, UnmergeCreate
from tests.identity.conftest import Ev, EventWriter, resolve


def _version(warehouse: Warehouse) -> int:
    return int(warehouse.scalar(Query(service.profiles_version_sql())))


def _content(warehouse: Warehouse) -> list[tuple[object, ...]]:
    return warehouse.rows(
        Query(
            "SELECT profile_id, updated_at, event_count, identifiers::VARCHAR, traits::VARCHAR"
            " FROM profiles ORDER BY profile_id"
        )
    )


def test_every_change_of_the_profiles_moves_the_version_and_a_no_op_does_not(
    warehouse: Warehouse, events: EventWriter, db: Database
) -> None:
    seen = (_version(warehouse), _content(warehouse))
    assert seen == (0, [])

    def step(*, changes: bool) -> None:
        nonlocal seen
        now = (_version(warehouse), _content(warehouse))
        assert now[0] >= seen[0], "the version never goes back"
        if changes:
            assert now[1] != seen[1], "the step was meant to change the profiles"
        if now[1] != seen[1]:
            assert now[0] > seen[0], "profiles changed but the version did not"
        seen = now

    events.write(
        [
            Ev([("device_id", "tablet"), ("email", "a@x.com")], traits={"name": "Ana"}),
            Ev([("device_id", "tablet"), ("email", "b@x.com")]),
            Ev([("email", "c@x.com")]),
        ]
    )
    resolve(warehouse)
    step(changes=True)
    resolve(warehouse)
    assert _version(warehouse) == seen[0], "a run with nothing new keeps the version"
    step(changes=False)
    events.write([Ev([("email", "c@x.com")], traits={"name": "Cy"})])
    resolve(warehouse)
    step(changes=True)
    resolve(warehouse, full=True)
    step(changes=False)
    pid = service.lookup(warehouse, kind="device_id", value="tablet")
    assert pid is not None
    with db.begin() as session:
        service.unmerge(
            session,
            warehouse,
            settings=Settings(),
            profile_id=pid,
            request=UnmergeCreate(identifier=IdentifierRef(kind="device_id", value="tablet")),
            actor="admin",
        )
    step(changes=True)
    cy = service.lookup(warehouse, kind="email", value="c@x.com")
    assert cy is not None
    with db.begin() as session:
        service.erase_profile(session, warehouse, profile_id=cy, actor="admin")
    step(changes=True)
