"""Memory bounded by bytes, not entry counts: a least-recently-used cache that evicts by total size.

An entry-count bound is no bound when entries differ in size (60 full-model downlinks with different ``have``
grew the service by 118 MB under a 4,096-entry cap). :class:`ByteLRU` charges each entry its size and evicts
the least recently used until the total fits; an entry larger than the whole budget is not cached at all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from deltaplane.errors import ConfigError

__all__ = ["ByteLRU"]

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """A thread-safe LRU mapping whose values' total ``size(value)`` stays at most ``max_bytes``."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        if max_bytes < 0:
            raise ConfigError(f"cache budget must be non-negative. Found {max_bytes}")
        self.max_bytes = max_bytes
        self._size = size
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: V) -> None:
        n = self._size(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if n > self.max_bytes:
                return
            self._items[key] = (value, n)
            self.nbytes += n
            while self.nbytes > self.max_bytes:
                _, (_, m) = self._items.popitem(last=False)
                self.nbytes -= m

    def __len__(self) -> int:
        return len(self._items)
