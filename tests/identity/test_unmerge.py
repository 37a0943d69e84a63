"""Unmerge: an admin removes a link or detaches an identifier; the profile splits and stays so."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from identity import service
from identity.errors import OverrideNotFound
from identity.schemas import IdentifierRef, LinkRef, UnmergeCreate, UnmergeRead
from tests.conftest import make_key
from tests.identity.conftest import Ev, EventWriter, partition, resolve


def _pid(warehouse: Warehouse, kind: str, value: str) -> str | None:
    return service.lookup(warehouse, kind=kind, value=value)


def test_removing_a_link_splits_the_profile_publishes_it_and_is_not_recreated(
    warehouse: Warehouse, events: EventWriter, db: Database
) -> None:
    events.write(
        [
            Ev([("user_id", "u1"), ("email", "a@x.com")]),
            Ev([("email", "a@x.com"), ("phone", "+33612345678")]),
        ]
    )
    resolve(warehouse)
    pid = _pid(warehouse, "user_id", "u1")
    assert pid is not None
    link = LinkRef.model_validate(
        {
            "from": {"kind": "email", "value": "a@x.com"},
            "to": {"kind": "phone", "value": "+33612345678"},
        }
    )
    with db.begin() as session:
        outcome = service.unmerge(
            session,
            warehouse,
            settings=Settings(),
            profile_id=pid,
            request=UnmergeCreate(link=link, reason="wrong phone"),
            actor="admin",
        )
    phone_pid = _pid(warehouse, "phone", "+33612345678")
    assert phone_pid not in (None, pid)
    assert _pid(warehouse, "email", "a@x.com") == pid
    assert sorted(outcome.profiles) == sorted([pid, phone_pid])
    assert outcome.resolution.splits == 1
    published = service.merges_since(warehouse, after_seq=0)
    assert published.select("kind", "from_profile_id", "to_profile_id").rows() == [
        ("split", pid, phone_pid)
    ]
    events.write([Ev([("email", "a@x.com"), ("phone", "+33612345678")])])
    resolve(warehouse)
    assert _pid(warehouse, "phone", "+33612345678") == phone_pid
    before = partition(warehouse)
    resolve(warehouse, full=True)
    assert partition(warehouse) == before
    with db.begin() as session:
        service.allow_again(
            session, warehouse, settings=Settings(), override_id=outcome.override_id, actor="a"
        )
    assert _pid(warehouse, "phone", "+33612345678") == pid
    assert service.merges_since(warehouse, after_seq=1)["kind"].to_list() == ["merge"]


def test_detaching_an_identifier_keeps_it_apart_from_later_events(
    warehouse: Warehouse, events: EventWriter, db: Database
) -> None:
    events.write(
        [
            Ev([("device_id", "shared-tablet"), ("email", "a@x.com")]),
            Ev([("device_id", "shared-tablet"), ("email", "b@x.com")]),
        ]
    )
    resolve(warehouse)
    pid = _pid(warehouse, "device_id", "shared-tablet")
    assert pid is not None
    with db.begin() as session:
        outcome = service.unmerge(
            session,
            warehouse,
            settings=Settings(),
            profile_id=pid,
            request=UnmergeCreate(
                identifier=IdentifierRef(kind="device_id", value="shared-tablet")
            ),
            actor="admin",
        )
    assert len(outcome.profiles) == 3
    assert len({_pid(warehouse, "email", "a@x.com"), _pid(warehouse, "email", "b@x.com")}) == 2
    events.write([Ev([("device_id", "shared-tablet"), ("email", "a@x.com")])])
    resolve(warehouse)
    assert _pid(warehouse, "device_id", "shared-tablet") != _pid(warehouse, "email", "a@x.com")
    explanation = service.explain_identity(
        warehouse, profile_id=_pid(warehouse, "device_id", "shared-tablet") or ""
    )
    assert [d.decision for d in explanation.decisions] == ["removed"]
    assert not any(link.used for link in explanation.links)


def test_unmerge_route_is_admin_only_and_validates_the_request(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    events.write([Ev([("user_id", "u1"), ("email", "a@x.com")]), Ev([("user_id", "u2")])])
    resolve(warehouse)
    pid = _pid(warehouse, "user_id", "u1")
    admin = {"Authorization": f"Bearer {make_key(db, Role.admin)}"}
    neither = client.post(f"/api/profiles/{pid}/unmerge", json={}, headers=admin)
    assert neither.status_code == 422
    assert neither.json()["error"]["code"] == "identity.nothing_to_unmerge"
    foreign = client.post(
        f"/api/profiles/{pid}/unmerge",
        json={"identifier": {"kind": "user_id", "value": "u2"}},
        headers=admin,
    )
    assert foreign.status_code == 422
    ok = client.post(
        f"/api/profiles/{pid}/unmerge",
        json={"identifier": {"kind": "email", "value": " A@x.com"}, "reason": "typo"},
        headers=admin,
    )
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["profiles"]) == 2
    listed = client.get("/api/identity/overrides", headers=admin).json()
    assert listed["total"] == 1
    assert listed["items"][0]["value"] == "a@x.com"
    assert listed["items"][0]["reason"] == "typo"
    override_id = listed["items"][0]["override_id"]
    lifted = client.delete(f"/api/identity/overrides/{override_id}", headers=admin)
    assert lifted.status_code == 200, lifted.text
    assert _pid(warehouse, "email", "a@x.com") == pid
    again = client.delete(f"/api/identity/overrides/{override_id}", headers=admin)
    assert again.status_code == 404


def _remove_link(
    warehouse: Warehouse, db: Database, email: str, phone: str
) -> tuple[str | None, UnmergeRead]:
    pid = _pid(warehouse, "email", email)
    assert pid is not None
    link = LinkRef.model_validate(
        {"from": {"kind": "email", "value": email}, "to": {"kind": "phone", "value": phone}}
    )
    with db.begin() as session:
        outcome = service.unmerge(
            session,
            warehouse,
            settings=Settings(),
            profile_id=pid,
            request=UnmergeCreate(link=link),
            actor="admin",
        )
    return pid, outcome


def test_unmerge_after_an_erasure_of_an_unmerged_person_still_splits(
    warehouse: Warehouse, events: EventWriter, db: Database
) -> None:
    events.write(
        [
            Ev([("email", "bob@x.com"), ("phone", "+33622222222")]),
            Ev([("email", "ana@x.com"), ("phone", "+33611111111")]),
        ]
    )
    resolve(warehouse)
    _remove_link(warehouse, db, "ana@x.com", "+33611111111")
    ana = _pid(warehouse, "email", "ana@x.com")
    assert ana is not None
    with db.begin() as session:
        # Deletes Ana's unmerge decision, the newest one.
        service.erase_profile(session, warehouse, profile_id=ana, actor="admin")
    bob, outcome = _remove_link(warehouse, db, "bob@x.com", "+33622222222")
    assert outcome.resolution.splits == 1
    assert _pid(warehouse, "email", "bob@x.com") == bob
    assert _pid(warehouse, "phone", "+33622222222") not in (None, bob)
    resolve(warehouse, full=True)
    assert _pid(warehouse, "email", "bob@x.com") != _pid(warehouse, "phone", "+33622222222")


def test_override_ids_are_never_reused_after_an_erasure_deleted_the_newest(
    warehouse: Warehouse, events: EventWriter, db: Database
) -> None:
    events.write(
        [
            Ev([("email", "bob@x.com"), ("phone", "+33622222222")]),
            Ev([("email", "ana@x.com"), ("phone", "+33611111111")]),
        ]
    )
    resolve(warehouse)
    _, first = _remove_link(warehouse, db, "ana@x.com", "+33611111111")
    ana = _pid(warehouse, "email", "ana@x.com")
    assert ana is not None
    with db.begin() as session:
        # Deletes Ana's unmerge decision, the one with the highest id.
        service.erase_profile(session, warehouse, profile_id=ana, actor="admin")
    bob, second = _remove_link(warehouse, db, "bob@x.com", "+33622222222")
    assert second.override_id > first.override_id
    # Lifting the erased decision's id must not lift Bob's newer one.
    with db.begin() as session, pytest.raises(OverrideNotFound):
        service.allow_again(
            session, warehouse, settings=Settings(), override_id=first.override_id, actor="a"
        )
    assert _pid(warehouse, "phone", "+33622222222") not in (None, bob)
    with db.begin() as session:
        service.erase_profile(session, warehouse, profile_id=bob or "", actor="admin")
    # Every decision is gone now: the next id still follows the highest ever issued.
    events.write([Ev([("email", "cy@x.com"), ("phone", "+33633333333")])])
    resolve(warehouse)
    _, third = _remove_link(warehouse, db, "cy@x.com", "+33633333333")
    assert third.override_id > second.override_id


def test_after_an_undone_merge_the_merged_away_id_redirects_to_its_identifiers(
    warehouse: Warehouse, events: EventWriter, db: Database
) -> None:
    events.write([Ev([("email", "ana@x.com")], traits={"name": "Ana"})])
    resolve(warehouse)
    ana = _pid(warehouse, "email", "ana@x.com")
    events.write([Ev([("phone", "+33611111111"), ("anonymous_id", "b1")], traits={"name": "Bob"})])
    resolve(warehouse)
    bob = _pid(warehouse, "phone", "+33611111111")
    assert ana is not None
    assert bob is not None
    events.write([Ev([("email", "ana@x.com"), ("phone", "+33611111111")])])
    resolve(warehouse)
    assert service.resolve_profile_id(warehouse, profile_id=bob) == ana
    # Bob's part is the larger one: Ana's id still stays with Ana's first identifier.
    _, outcome = _remove_link(warehouse, db, "ana@x.com", "+33611111111")
    assert _pid(warehouse, "email", "ana@x.com") == ana
    split_off = _pid(warehouse, "phone", "+33611111111")
    assert split_off not in (None, ana)
    assert _pid(warehouse, "anonymous_id", "b1") == split_off
    assert sorted(outcome.profiles) == sorted([ana, split_off])
    profile = service.get_profile(warehouse, profile_id=bob)
    assert (profile.id, profile.redirected, profile.traits) == (split_off, True, {"name": "Bob"})
    published = service.merges_since(warehouse, after_seq=0)
    assert published.select("kind", "from_profile_id", "to_profile_id").rows()[-2:] == [
        ("merge", bob, ana),
        ("split", ana, split_off),
    ]
    resolve(warehouse, full=True)
    assert _pid(warehouse, "email", "ana@x.com") == ana
    assert service.resolve_profile_id(warehouse, profile_id=bob) == split_off
