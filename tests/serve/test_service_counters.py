"""``ServiceState.count``: the service's counters lose no count when the event loop and a worker thread count at
once (``Counter[k] += 1`` reads, runs ``Counter.__missing__`` for a first count, then writes)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from deltaplane.serve.app import ServiceState


class _SlowFirstCount(Counter):
    """A Counter whose first ``__missing__`` waits (at most ``wait_s``) for another thread's count to land: the
    interleaving in which an unguarded read-then-write loses that count, made certain instead of rare."""

    def __init__(self, wait_s: float) -> None:
        super().__init__()
        self.other_counted = threading.Event()
        self.wait_s = wait_s
        self.first = True

    def __missing__(self, key: str) -> int:
        if self.first:
            self.first = False
            self.other_counted.wait(self.wait_s)
        return 0


def _count_twice(counters: _SlowFirstCount, count: Callable[[str], None]) -> int:
    """``count("k")`` from a thread (which stalls in its first ``__missing__``) and then from this one."""
    worker = threading.Thread(target=count, args=("k",))
    worker.start()
    while counters.first:  # the worker is inside its read-then-write
        threading.Event().wait(0.001)
    count("k")
    counters.other_counted.set()
    worker.join()
    return counters["k"]


def test_an_unguarded_increment_loses_a_count_in_this_interleaving() -> None:
    counters = _SlowFirstCount(wait_s=5.0)

    def bare(name: str) -> None:
        counters[name] += 1

    assert _count_twice(counters, bare) == 1  # what the event loop's unlocked `+= 1` could do


def test_count_loses_none_and_counts_copies_under_the_same_lock() -> None:
    state = ServiceState(registry=None)  # type: ignore[arg-type]  # counting needs no registry
    state.counters = counters = _SlowFirstCount(wait_s=0.3)  # the waiter times out: the other holds no lock
    assert _count_twice(counters, state.count) == 2
    state.count("bytes", 10)
    assert state.counts() == {"k": 2, "bytes": 10}
    assert state.counts() is not state.counters  # a copy: iterating it while the loop counts cannot raise
