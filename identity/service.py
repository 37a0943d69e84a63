"""Use cases of the identity package: the only module other packages may import."""

from __future__ import annotations

import logging

import polars as pl
from sqlalchemy.orm import Session

from cdp.config import Settings
from cdp.db import utcnow
from cdp.warehouse import Warehouse
from identity import queries, resolver
from identity.errors import ProfileNotFound
from identity.models import IdentityRuleSet
from identity.resolver import ResolveResult
from identity.rules import IdentityRules

logger = logging.getLogger(__name__)

__all__ = [
    "IdentityRules",
    "ResolveResult",
    "event_profiles",
    "get_rules",
    "lookup",
    "merges_since",
    "put_rules",
    "resolve",
    "resolve_profile_id",
]


RULES_ROW = 1


def get_rules(session: Session) -> IdentityRules:
    """The resolution rules in force (the defaults until someone saves rules)."""
    row = session.get(IdentityRuleSet, RULES_ROW)
    return IdentityRules() if row is None else IdentityRules.model_validate(row.document)


def put_rules(session: Session, *, rules: IdentityRules, updated_by: str | None) -> IdentityRules:
    """Replace the rules; the next resolution rebuilds the graph under them."""
    row = session.get(IdentityRuleSet, RULES_ROW)
    document = rules.model_dump(mode="json")
    if row is None:
        session.add(
            IdentityRuleSet(
                id=RULES_ROW, document=document, updated_at=utcnow(), updated_by=updated_by
            )
        )
    else:
        row.document = document
        row.updated_at = utcnow()
        row.updated_by = updated_by
    logger.info("identity rules saved", extra={"fingerprint": rules.fingerprint()})
    return rules


def resolve(
    warehouse: Warehouse, *, settings: Settings, rules: IdentityRules, full: bool = False
) -> ResolveResult:
    """Resolve new events into profiles (incremental), or rebuild everything (`full`)."""
    del settings  # part of the contract; resolution needs nothing from it yet
    return resolver.resolve(warehouse, rules=rules, full=full)


def lookup(warehouse: Warehouse, *, kind: str, value: str) -> str | None:
    """The profile id holding a normalised identifier, or None."""
    rows = warehouse.rows(queries.lookup(kind, value))
    return str(rows[0][0]) if rows and rows[0][0] is not None else None


def resolve_profile_id(warehouse: Warehouse, *, profile_id: str) -> str:
    """The live profile id for an id, following merges; ProfileNotFound if never issued."""
    rows = warehouse.rows(queries.profile_id_record(profile_id))
    if not rows:
        raise ProfileNotFound(f"profile {profile_id} does not exist")
    merged_into = rows[0][1]
    return str(merged_into) if merged_into is not None else profile_id


def event_profiles(
    warehouse: Warehouse, *, after_event_id: int, up_to_event_id: int | None = None
) -> pl.DataFrame:
    """`event_id, profile_id` of the resolved events in `(after_event_id, up_to_event_id]`."""
    return warehouse.run(queries.event_profiles(after_event_id, up_to_event_id))


def merges_since(warehouse: Warehouse, *, after_seq: int) -> pl.DataFrame:
    """Published merges and splits after `after_seq`, in order.

    Columns: seq, kind ('merge' | 'split'), from_profile_id, to_profile_id, at, reason.
    """
    return warehouse.run(queries.merges_since(after_seq))


def event_profile_sql() -> str:
    """A parameter-free SQL relation `(event_id, profile_id)`: the profile of each resolved event.

    For set-based joins by later layers (segments); same rule as `event_profiles`: an event
    belongs to the profile of its most trusted identifier that has one.
    """
    return (
        "SELECT ei.event_id, arg_min(n.profile_id, (n.rank, n.node_id)) AS profile_id"
        " FROM event_identifiers ei"
        " JOIN identity_nodes n ON n.kind = ei.kind AND n.value = ei.value"
        " WHERE n.profile_id IS NOT NULL"
        " GROUP BY ei.event_id"
    )
