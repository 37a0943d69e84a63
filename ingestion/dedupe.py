"""An in-memory filter over the stored message keys, so that a load checks its messages
against the warehouse's dedupe table only when they may be there.

The dedupe table (`ingest_message_keys`) holds the 128-bit key of every (source, message id)
ever stored. Checking a load against it is an anti-join whose cost grows with the table: at
18M keys, about 0.8 s for every 250k-line chunk of a file import, a fifth of the whole import
of the 1M-customer sample, and a scan of the whole table for every small HTTP drain.

The filter keeps the upper 64 bits of every stored key, sorted, in memory (8 bytes a key, in
256 partitions by the top byte, so adding keys re-sorts one small partition at a time, never
a copy of the whole set). A message whose upper 64 bits are not in the filter was never
stored; only the others (duplicates, and on average 2^-64 of a chance per stored key for a
new message) go to the exact anti-join, which stays the authority. So the answer is the
anti-join's, for fewer rows.

The loader owns one filter per warehouse, fills it from the table on its first load and adds
each load's keys after its commit. It checks that the table still holds the number of keys
it has counted (one `count(*)`, answered from DuckDB's metadata) and rebuilds itself
otherwise, e.g. after a load whose commit failed or a write by another path.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

Keys = np.ndarray[Any, np.dtype[np.uint64]]  # Any: numpy's shape parameter
Mask = np.ndarray[Any, np.dtype[np.bool_]]

PARTITION_BITS: Final = 8
_SHIFT: Final = np.uint64(64 - PARTITION_BITS)
_BOUNDS: Final = np.arange(1, 2**PARTITION_BITS, dtype=np.uint64) << _SHIFT


class KeyFilter:
    """The upper 64 bits of every stored message key, sorted, in partitions by the top byte."""

    def __init__(self) -> None:
        self._parts: list[Keys] = [np.empty(0, dtype=np.uint64)] * 2**PARTITION_BITS
        self.count = 0

    @classmethod
    def of(cls, keys: Keys) -> KeyFilter:
        """A filter holding `keys` (upper 64 bits of stored message keys)."""
        made = cls()
        ordered = np.sort(keys)
        # Views of one sorted array (no copy per partition); the first add of each
        # partition replaces its view, and the array goes once every view is replaced.
        made._parts = np.split(ordered, np.searchsorted(ordered, _BOUNDS))
        made.count = len(keys)
        return made

    def add(self, keys: Keys) -> None:
        """Remember stored keys (their upper 64 bits)."""
        ordered = np.sort(keys)
        for part, start, end in _runs(ordered):
            merged = np.concatenate([self._parts[part], ordered[start:end]])
            # Two sorted runs: the stable sort (timsort) merges them in one pass.
            merged.sort(kind="stable")
            self._parts[part] = merged
        self.count += len(keys)

    def may_contain(self, keys: Keys) -> Mask:
        """For each key, whether a stored key has the same upper 64 bits (False: never stored)."""
        found = np.zeros(len(keys), dtype=np.bool_)
        if not len(keys) or not self.count:
            return found
        order = np.argsort(keys)
        ordered = keys[order]
        hits = np.zeros(len(keys), dtype=np.bool_)
        for part, start, end in _runs(ordered):
            stored = self._parts[part]
            if len(stored):
                wanted = ordered[start:end]
                at = np.searchsorted(stored, wanted)
                at[at == len(stored)] = 0
                hits[start:end] = stored[at] == wanted
        found[order] = hits
        return found


def _runs(ordered: Keys) -> list[tuple[int, int, int]]:
    """(partition, start, end) of each non-empty run of sorted keys in one partition."""
    cuts = [0, *np.searchsorted(ordered, _BOUNDS).tolist(), len(ordered)]
    return [
        (part, cuts[part], cuts[part + 1])
        for part in range(len(cuts) - 1)
        if cuts[part + 1] > cuts[part]
    ]
