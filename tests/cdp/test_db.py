"""Operational row ids."""

from __future__ import annotations

import time
import uuid

from cdp.db import new_id, uuid_text


def test_new_ids_are_uuid7_that_carry_their_creation_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    parsed = [uuid.UUID(i) for i in ids]
    assert all(p.version == 7 and p.variant == uuid.RFC_4122 for p in parsed)
    assert [str(p) for p in parsed] == ids
    stamps = [p.int >> 80 for p in parsed]
    assert all(before <= s <= after for s in stamps)
    # Created one after the other, their instants never go back (a B-tree append).
    assert stamps == sorted(stamps)
    assert len(set(ids)) == len(ids)


def test_uuid_text_is_the_canonical_form() -> None:
    for n in (0, 1, 2**128 - 1, uuid.UUID(new_id()).int, 0x0123456789ABCDEF0123456789ABCDEF):
        assert uuid_text(n) == str(uuid.UUID(int=n))
