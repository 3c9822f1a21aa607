"""The forked workers' shared-memory arena: large results come back through it, intact and never overwritten."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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


def _big(n: int) -> np.ndarray:
    return np.ones(n)  # n float64s: far more than a socket's buffer


def _gone(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except FileNotFoundError:
        return True


def _in_child(code: str, pids: Path, *, timeout: float = 60) -> int:
    """``code`` in a fresh interpreter whose workers write their process ids to ``pids``; its exit code. A
    hang fails the test (``TimeoutExpired``) instead of stalling the run, and no worker outlives the test."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.DEVNULL,  # a worker holding the output open must not keep run() waiting
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        ).returncode
    finally:
        time.sleep(0.1)
        deadline = time.monotonic() + 20
        workers = [int(p) for p in pids.read_text().split()] if pids.exists() else []
        while not all(_gone(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in workers if not _gone(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"workers {left} outlived their caller"


_WRITE_PIDS = """
    from pathlib import Path
    from deltaplane.sim.forked_workers import ForkedWorkers
    def forked(n):
        pool = ForkedWorkers(n)
        Path({pids!r}).write_text(" ".join(str(p.pid) for p in pool._procs))
        return pool
"""


_needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")


@_needs_proc
def test_a_large_reply_and_a_large_task_cross_without_deadlock(tmp_path: Path) -> None:
    """A worker writing a reply larger than the socket's buffer, which the caller has not read yet, while the
    caller writes it a task larger than the buffer: before, each waited for the other to read, forever (the
    simulator does this with a model over ~200 KB: a second chunk's deltas, then the model to score)."""
    pids = tmp_path / "pids"
    code = (
        _WRITE_PIDS.format(pids=str(pids))
        + """
    import numpy as np
    pool = forked(1)  # no arena: the reply takes the pipe
    reply = pool.submit_to(0, np.ones, 1_000_000)
    task = pool.submit_to(0, len, bytes(4_000_000))
    assert reply.result().shape == (1_000_000,) and task.result() == 4_000_000
    pool.shutdown()
    """
    )
    assert _in_child(code, pids) == 0


@_needs_proc
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_workers_exit_when_their_caller_is_killed(tmp_path: Path, sig: signal.Signals) -> None:
    """Each worker closes its copies of the caller's pipe ends, so a caller that dies without shutting its
    workers down (killed) leaves them an end of file, not a pipe they hold open themselves."""
    pids = tmp_path / "pids"
    code = (
        _WRITE_PIDS.format(pids=str(pids))
        + f"""
    import os
    pool = forked(2)
    os.kill(os.getpid(), {int(sig)})
    """
    )
    assert _in_child(code, pids) == -sig  # and _in_child checks that both workers are gone
    assert len(pids.read_text().split()) == 2


class _NeedsTwo(Exception):
    def __init__(self, a: object, b: object) -> None:
        super().__init__(a)  # pickled as _NeedsTwo(a): cannot be rebuilt on the caller's side


def _raise_needs_two() -> None:
    raise _NeedsTwo(1, 2)


def test_a_reply_that_cannot_be_unpickled_fails_its_own_future_only() -> None:
    pool = ForkedWorkers(1)
    try:
        bad, good = pool.submit_to(0, _raise_needs_two), pool.submit_to(0, abs, -4)
        with pytest.raises(DeltaplaneError, match="could not be read"):
            bad.result()
        with pytest.raises(DeltaplaneError, match="could not be read"):
            bad.result()  # asked again: the same answer, not another worker's reply
        assert good.result() == 4
    finally:
        pool.shutdown()


def test_an_interrupted_read_stops_the_workers_and_fails_every_result_due() -> None:
    """Ctrl-C while the caller waits for a reply: where the next reply starts is unknown, so the workers stop
    and every result still due fails; before, the next task's future read the old reply (a reused trainer
    returned the previous round's deltas)."""
    pool = ForkedWorkers(1)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        slow, after = pool.submit_to(0, time.sleep, 5), pool.submit_to(0, abs, -1)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            slow.result()
        assert pool.stopped
        for future in (slow, after):
            with pytest.raises(DeltaplaneError):
                future.result()
        with pytest.raises(DeltaplaneError, match="shut down"):
            pool.submit_to(0, abs, -2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        pool.shutdown()


def test_shutdown_does_not_wait_on_an_unread_reply() -> None:
    """A reply larger than the pipe that nobody reads (a run that raised mid-round): the worker gets a broken
    pipe when the caller closes its end, instead of keeping shutdown waiting its 10 s; the unread result then
    fails clearly instead of with an IndexError."""
    pool = ForkedWorkers(1)
    unread = pool.submit_to(0, _big, 1_000_000)
    time.sleep(0.5)  # the worker is writing it by now
    start = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - start < 5
    with pytest.raises(DeltaplaneError, match="shut down before this result was read"):
        unread.result()


def _sleep_then(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


def test_a_result_not_back_in_time_raises_timeout_error_and_stays_readable() -> None:
    """``result(timeout)`` waits at most ``timeout`` as :class:`concurrent.futures.Future` does; before, it
    waited for the reply however long it took. The futures stay pending, and each later gets its own reply."""
    pool = ForkedWorkers(1)
    try:
        slow, after = pool.submit_to(0, _sleep_then, 1.5, "slow"), pool.submit_to(0, abs, -3)
        start = time.monotonic()
        with pytest.raises(concurrent.futures.TimeoutError):
            after.result(timeout=0.2)  # behind the slow task on the worker's pipe
        with pytest.raises(TimeoutError):
            slow.exception(timeout=0.1)
        assert time.monotonic() - start < 1.0
        assert not slow.done() and not after.done()
        assert after.result(timeout=30) == 3 and slow.result(timeout=0) == "slow"
    finally:
        pool.shutdown()
