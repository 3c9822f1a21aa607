"""The forked workers' shared-memory arena: large results come back through it, intact and never overwritten."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from deltaplane.errors import DeltaplaneError
from deltaplane.sim import forked_workers
from deltaplane.sim.forked_workers import ForkedWorkers

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="workers are threads here"
)


def _arrays(seed: int, n: int = 100_000) -> dict[str, object]:
    """A result like a share's deltas or payloads: float32 arrays of several shapes, an int64 one, bytes (one
    empty) and a plain value."""
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((n // 100, 100), dtype=np.float32),
        "b": rng.standard_normal(3, dtype=np.float32),
        "i": (rng.integers(0, 1 << 40, 7), "tag"),
        "seed": seed,
        "payloads": [rng.bytes(n // 10), b""],
    }


def _equal(a: dict, b: dict) -> bool:
    return (
        np.array_equal(a["w"], b["w"])
        and np.array_equal(a["b"], b["b"])
        and np.array_equal(a["i"][0], b["i"][0])
        and a["i"][1] == b["i"][1]
        and a["seed"] == b["seed"]
        and a["payloads"] == b["payloads"]
        and all(type(p) is bytes for p in b["payloads"])
    )


@pytest.fixture
def placed(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each result the caller collects, whether it came back through the arena."""
    seen: list[bool] = []
    from_arena = forked_workers._from_arena

    def spy(value, arena):
        seen.append(isinstance(value, forked_workers._Placed))
        return from_arena(value, arena)

    monkeypatch.setattr(forked_workers, "_from_arena", spy)
    return seen


def test_a_large_result_comes_back_through_the_arena_and_the_next_through_the_pipe(placed) -> None:
    """One result per worker is in the arena at a time: a second task sent before the first result was read
    answers down the pipe, so the first is never overwritten; both come back exactly, as does a result too
    large for the arena, and once read the arena serves again."""
    pool = ForkedWorkers(1, arena_bytes=1 << 20)
    try:
        first = pool.submit_to(0, _arrays, 1)
        second = pool.submit_to(0, _arrays, 2)  # the arena holds (or will hold) the first's arrays
        assert first.used_arena and not second.used_arena
        assert _equal(second.result(), _arrays(2)) and _equal(first.result(), _arrays(1))
        assert placed == [True]  # _from_arena runs only for tasks allowed the arena
        big = pool.submit_to(0, _arrays, 3, 400_000)  # 1.6 MB: more than the arena holds
        assert big.used_arena and _equal(big.result(), _arrays(3, 400_000))
        assert placed == [True, False]  # allowed the arena, but sent down the pipe
        again = pool.submit_to(0, _arrays, 4)
        assert again.used_arena and _equal(again.result(), _arrays(4)) and placed[-1] is True
    finally:
        pool.shutdown()
    assert multiprocessing.active_children() == []


def test_a_failed_task_frees_the_arena_and_small_results_pass_unchanged(placed) -> None:
    """A task that raises gives its exception and frees the arena; a result without arrays is returned as is."""
    pool = ForkedWorkers(1, arena_bytes=1 << 20)
    try:
        with pytest.raises(ValueError, match="invalid literal"):
            pool.submit_to(0, int, "x").result()
        assert pool.submit_to(0, abs, -3).result() == 3
        after = pool.submit_to(0, _arrays, 5)
        assert after.used_arena and _equal(after.result(), _arrays(5))
        assert placed == [False, True]
    finally:
        pool.shutdown()


def test_without_an_arena_results_take_the_pipe(placed) -> None:
    pool = ForkedWorkers(1)
    try:
        future = pool.submit_to(0, _arrays, 6)
        assert not future.used_arena and _equal(future.result(), _arrays(6))
        assert placed == []
    finally:
        pool.shutdown()
    with pytest.raises(DeltaplaneError, match="arena_bytes"):
        ForkedWorkers(1, arena_bytes=-1)


def test_fork_contexts_go_with_their_trainer_and_name_what_is_missing() -> None:
    """A run's context is found by its trainer's id until forgotten or until the trainer goes; a worker that
    asks for one that was never registered gets an error naming which."""
    import gc

    from deltaplane.sim.forked_workers import ForkContexts

    class Trainer:
        pass

    contexts = ForkContexts("scoring")
    kept, dropped = Trainer(), Trainer()
    key = contexts.register(kept, ("model", "test"))
    gone = contexts.register(dropped, "x")
    assert contexts.of(key) == ("model", "test")
    del dropped
    gc.collect()
    assert gone not in contexts and key in contexts
    contexts.forget(key)
    assert contexts == {}
    with pytest.raises(DeltaplaneError, match="before its run's scoring context was registered"):
        contexts.of(key)
