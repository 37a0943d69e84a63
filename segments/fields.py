"""The field catalogue rules are checked against, and the hook other packages add fields with.

Fields are named `profile.<column>`, `traits.<key>`, `attributes.<name>` and
`<source>.<field>` for fields registered by another package (loyalty registers `loyalty.tier`
and friends without segments importing loyalty). Every SQL identifier the compiler emits comes
from this closed registry, never from request data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from segments.rules import ATTRIBUTE_NAME, FieldType

FieldKind = Literal["profile", "trait", "attribute", "registered"]

_IDENT = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
RESERVED_PREFIXES = frozenset({"profile", "traits", "attributes", "events", "segment"})

# `profile.<name>` -> (column of `profiles`, type): the closed set of profile columns.
PROFILE_FIELDS: dict[str, tuple[str, FieldType]] = {
    "profile.id": ("profile_id", "string"),
    "profile.created_at": ("created_at", "timestamp"),
    "profile.first_seen": ("first_seen", "timestamp"),
    "profile.last_seen": ("last_seen", "timestamp"),
    "profile.event_count": ("event_count", "integer"),
}


@dataclass(frozen=True, slots=True)
class FieldSource:
    """Fields another package adds to the catalogue, read from a warehouse relation.

    `relation_sql` is parameter-free SQL written in that package's code, returning one row per
    profile with a `profile_id` column and one column per field; `fields` maps each column to
    its type. The fields are named `<name>.<column>` in rules.
    """

    name: str
    relation_sql: str
    fields: Mapping[str, FieldType]
    description: str = ""


_SOURCES: dict[str, FieldSource] = {}
# Moves with every (un)registration, so a catalogue built earlier can tell it is stale.
_VERSION = [0]


def register_field_source(source: FieldSource) -> None:
    """Add (or replace) a package's fields in the catalogue."""
    if not _IDENT.match(source.name) or source.name in RESERVED_PREFIXES:
        raise ValueError(f"field source name {source.name!r} is not allowed")
    for column in source.fields:
        if not _IDENT.match(column):
            raise ValueError(f"field {source.name}.{column}: not a valid column name")
    _SOURCES[source.name] = source
    _VERSION[0] += 1


def unregister_field_source(name: str) -> None:
    """Remove a package's fields from the catalogue."""
    _SOURCES.pop(name, None)
    _VERSION[0] += 1


def field_sources_version() -> int:
    """A number that changes whenever a field source is registered or removed."""
    return _VERSION[0]


def field_sources() -> list[FieldSource]:
    """Every registered field source, by name."""
    return [_SOURCES[k] for k in sorted(_SOURCES)]


def json_field_type(
    *, numbers: int, booleans: int, strings: int, timestamps: int, objects: int, arrays: int
) -> FieldType | None:
    """The field type of a JSON path from the counts of its values by JSON type.

    All numbers: number; all booleans: boolean; all strings parsing as timestamps: timestamp;
    other mixes of scalars: string. A path holding objects or lists is not a field itself
    (its keys and elements are).
    """
    scalars = numbers + booleans + strings
    if objects or arrays or not scalars:
        return None
    if numbers == scalars:
        return "number"
    if booleans == scalars:
        return "boolean"
    if strings == scalars and timestamps == strings:
        return "timestamp"
    return "string"


@dataclass(frozen=True, slots=True)
class CatalogField:
    """One field a rule may compare."""

    name: str
    type: FieldType
    kind: FieldKind
    column: str  # profiles column, trait key, attribute column or registered column
    source: str | None = None  # the registered source, for kind "registered"
    description: str = ""


@dataclass(slots=True)
class Catalog:
    """Every field, event and event property rules may use, with their types."""

    fields: dict[str, CatalogField] = field(default_factory=dict)
    events: dict[str, dict[str, FieldType]] = field(default_factory=dict)
    sources: dict[str, FieldSource] = field(default_factory=dict)


def build_catalog(
    *,
    traits: Mapping[str, FieldType],
    attributes: Mapping[str, FieldType],
    events: Mapping[str, Mapping[str, FieldType]],
    attribute_descriptions: Mapping[str, str] | None = None,
) -> Catalog:
    """Assemble the catalogue from what the warehouse holds and the registered sources."""
    catalog = Catalog()
    for name, (column, ftype) in PROFILE_FIELDS.items():
        catalog.fields[name] = CatalogField(name, ftype, "profile", column)
    for key, ftype in traits.items():
        catalog.fields[f"traits.{key}"] = CatalogField(f"traits.{key}", ftype, "trait", key)
    descriptions = attribute_descriptions or {}
    for name, ftype in attributes.items():
        if ATTRIBUTE_NAME.match(name):
            catalog.fields[f"attributes.{name}"] = CatalogField(
                f"attributes.{name}", ftype, "attribute", name, None, descriptions.get(name, "")
            )
    for source in field_sources():
        catalog.sources[source.name] = source
        for column, ftype in source.fields.items():
            name = f"{source.name}.{column}"
            catalog.fields[name] = CatalogField(
                name, ftype, "registered", column, source.name, source.description
            )
    catalog.events = {event: dict(props) for event, props in events.items()}
    return catalog
