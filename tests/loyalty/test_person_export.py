"""The privacy export of a person holds what loyalty and segments hold about them too."""

from __future__ import annotations

from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from loyalty import service
from loyalty.schemas import RewardCreate, TierCreate
from tests.conftest import make_key
from tests.loyalty.conftest import earn, make_member, make_program
from tests.loyalty.identity_data import french_segment, profile_of, resolve, write_events


def test_export_holds_loyalty_memberships_ledgers_and_segment_memberships(
    client: TestClient, db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    write_events(
        warehouse,
        [([("email", "ann@x.com")], "Signed Up", 0), ([("email", "bob@x.com")], "Signed Up", 0)],
        traits=[{"country": "FR"}, {"country": "DE"}],
    )
    resolve(warehouse)
    ann = profile_of(warehouse, "email", "ann@x.com")
    program = make_program(db, name="Club")
    with db.begin() as session:
        service.create_tier(
            session, program_id=program.id, data=TierCreate(name="Silver", rank=1, threshold=50)
        )
    member = make_member(db, program, ann)
    make_member(db, program, profile_of(warehouse, "email", "bob@x.com"))
    earn(db, program, member, 80, key="ann-order")
    with db.begin() as session:
        service.upgrade_tiers(session, program_id=program.id, member_ids=[member.id])
        reward = service.create_reward(
            session, program_id=program.id, data=RewardCreate(name="Voucher", points_cost=30)
        )
        redemption = service.redeem(session, member_id=member.id, reward_id=reward.id)
        coupon = redemption.coupon_code
    french_segment(db, warehouse, settings)
    admin = {"Authorization": f"Bearer {make_key(db, Role.admin)}"}

    answer = client.get(f"/api/profiles/{ann}/export", headers=admin)

    assert answer.status_code == 200, answer.text
    held = answer.json()["held_by"]
    (club,) = held["loyalty"]
    assert club["program"]["name"] == "Club"
    assert club["membership"]["id"] == member.id
    assert [(e["kind"], e["points"]) for e in club["ledger"]] == [("earn", 80), ("redeem", -30)]
    assert club["balance"]["active"] == 50
    assert [r["coupon_code"] for r in club["redemptions"]] == [coupon]
    assert [c["reason"] for c in club["tier_history"]] == ["upgrade"]
    assert [m["segment"] for m in held["segments"]["memberships"]] == ["French"]
    assert [(h["segment"], h["kind"]) for h in held["segments"]["history"]] == [("French", "entry")]
    # Nothing of the other member is in it.
    bob = client.get(
        f"/api/profiles/{profile_of(warehouse, 'email', 'bob@x.com')}/export", headers=admin
    ).json()["held_by"]
    assert bob["segments"] == {"memberships": [], "history": []}
    assert [e["points"] for e in bob["loyalty"][0]["ledger"]] == []
