"""One helper object per long-lived object (a store, a warehouse), created on first use."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class PerObject(Generic[K, V]):
    """Maps each `K` to its one `V`, made by `factory(key)` on first use (thread-safe).

    Weakly keyed: a store or warehouse that is dropped (tests make many) takes its helper
    with it. A process may serve several stores at once in tests, so module globals keyed
    by nothing would mix them.
    """

    def __init__(self, factory: Callable[[K], V]) -> None:
        self._factory = factory
        self._found: weakref.WeakKeyDictionary[K, V] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __call__(self, key: K) -> V:
        with self._lock:
            found = self._found.get(key)
            if found is None:
                found = self._found[key] = self._factory(key)
            return found
