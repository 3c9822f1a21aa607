"""Forked worker processes fed over pipes by the calling thread, with large results handed back in shared memory.

The batched trainer (:mod:`deltaplane.sim.batched`) runs a second share of a round's training in a forked
process. :class:`~concurrent.futures.ProcessPoolExecutor` hands a task from the caller to a management thread and
then to a queue-feeder thread, and a result back through the management thread; each hop waits for the
interpreter lock, which the caller (scoring or training in the meantime) holds between kernels. On the default
workload a share reached its worker 1.1 ms after it was submitted (up to 6 ms) and came back 1.1 ms after it
was done. Here the caller pickles a task and writes it to the worker's pipe itself, and reads the result when it
asks for it: no thread in between.

A share's result (its clients' deltas, ~730 KB on the default workload) is larger than a socket's buffer
(~208 KB): sent down the pipe, the worker's write blocked until the caller, still busy with its own share's
updates, read it (~1.1 ms a round in which the worker could not score), and the bytes were copied four times
(pickled, written, read, unpickled). Each worker therefore gets an *arena*: an anonymous shared mapping made
before the fork, into which it copies a result's arrays (and ``bytes``: payloads a worker encoded), sending only their places down the pipe; the caller
copies them out when it collects the result, which frees the arena for the next. One result per worker is in
the arena at a time (later ones, and any that does not fit, take the pipe), so no result is overwritten
before it was read. A reply too large for the pipe's buffer goes out from a sender thread (:class:`_Replies`),
so a worker never stops reading tasks while the caller writes it one.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from types import UnionType
from typing import Any

import numpy as np
import torch

from deltaplane.errors import DeltaplaneError

__all__ = ["ForkContexts", "ForkedWorkers"]

#: a result's arrays start at multiples of this in the arena (cache lines; any dtype's alignment)
_ALIGN = 64

#: :class:`_InArena`'s dtype for a ``bytes`` leaf (not a numpy dtype string)
_BYTES = "bytes"

#: a worker's reply of more pickled bytes than this goes out from a sender thread (:class:`_Replies`): a socket
#: buffer holds ~208 KB, and a write that fills it waits for the caller to read
_DIRECT_REPLY_BYTES = 16 * 2**10


@dataclass(frozen=True)
class _InArena:
    """One array (or ``bytes``: dtype :data:`_BYTES`, shape its length) of a result placed in the arena: where
    it starts, its dtype and shape."""

    offset: int
    dtype: str
    shape: tuple[int, ...]


class ForkContexts(dict[int, Any]):
    """What a forked worker's tasks need of one run (a model copy and test data to score, a codec to encode),
    by the run's trainer's ``id``: registered before the trainer forks its workers, which inherit it with the
    rest of memory, so it never crosses a pipe. ``what`` names it in the error of a worker forked too early.
    """

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def register(self, trainer: object, value: Any) -> int:
        """Hold ``value`` for ``trainer``'s run until :meth:`forget`, or until the trainer goes (a run that
        raises never reaches its close); returns the key its workers' tasks pass."""
        key = id(trainer)
        self[key] = value
        weakref.finalize(trainer, self.pop, key, None)
        return key

    def of(self, key: int) -> Any:
        """The run's context, in a forked worker."""
        if (
            key not in self
        ):  # the trainer forked before the context was registered (not how the simulator runs)
            raise DeltaplaneError(
                f"this worker was forked before its run's {self.what} context was registered"
            )
        return self[key]

    def forget(self, key: int) -> None:
        """Drop the run's context here (a worker keeps its copy until the trainer stops it)."""
        self.pop(key, None)


class ForkedWorkers(Executor):
    """Forked worker processes, each fed over a pipe of its own by the calling thread (see the module's docstring).

    Tasks on one worker run in the order sent. Workers run torch with one intra-op thread and inherit the
    caller's memory at the fork. ``arena_bytes > 0`` gives each worker a shared arena of that size for the
    numpy arrays of its results (dicts, lists and tuples of them, and other small values).
    """

    def __init__(self, n: int, *, arena_bytes: int = 0) -> None:
        if arena_bytes < 0:
            raise DeltaplaneError(f"arena_bytes must be non-negative. Found {arena_bytes}")
        ctx = multiprocessing.get_context("fork")
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._waiting: list[deque[_PipeFuture]] = []
        # made before the fork, so each worker inherits its own (MAP_SHARED: the caller sees what it writes)
        self._arenas: list[mmap.mmap | None] = []
        self._arena_busy: list[bool] = []
        for _ in range(n):
            arena = mmap.mmap(-1, arena_bytes) if arena_bytes else None
            ours, theirs = ctx.Pipe()
            # the child closes its copies of the caller's ends (this pipe's and the earlier workers'): while it
            # held one, a caller that died (SIGKILL, SIGTERM) left it waiting for a task forever
            ends = [ours, *self._conns]
            proc = ctx.Process(target=_serve, args=(theirs, arena, ends), daemon=True, name="batched-trainer")
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
            self._waiting.append(deque())
            self._arenas.append(arena)
            self._arena_busy.append(False)
        self._next = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on the next worker in turn."""
        worker, self._next = self._next, (self._next + 1) % max(1, len(self._conns))
        return self.submit_to(worker, fn, *args, **kwargs)

    def submit_to(self, worker: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on worker ``worker``, after the tasks sent to it before."""
        if not self._conns:
            raise DeltaplaneError("the batched trainer's workers were shut down")
        use_arena = self._arenas[worker] is not None and not self._arena_busy[worker]
        future = _PipeFuture(self, worker, use_arena)
        try:
            self._conns[worker].send((fn, args, kwargs, use_arena))
        except OSError as exc:
            raise self._died(worker, exc) from exc
        self._arena_busy[worker] |= use_arena
        self._waiting[worker].append(future)
        return future

    def _arrived(self, worker: int, timeout: float | None) -> bool:
        """Whether worker ``worker``'s next reply (or its pipe's end) arrived within ``timeout`` seconds
        (``None``: wait for it). True when the workers were stopped, which :meth:`_collect` reports."""
        if not self._conns or timeout is None:
            return True
        try:
            return bool(self._conns[worker].poll(timeout))
        except (EOFError, OSError):  # a broken pipe: _collect reads the error
            return True

    def _collect(self, worker: int) -> None:
        """Read worker ``worker``'s next result into the oldest of its futures."""
        if not self._conns:
            raise DeltaplaneError("the batched trainer's workers were shut down before this result was read")
        future = self._waiting[worker].popleft()
        try:
            try:
                ok, value = self._conns[worker].recv()
            except (EOFError, OSError) as exc:
                self._procs[worker].join(timeout=1.0)  # a closed pipe: the process is ending, if not gone
                future.set_exception(self._died(worker, exc))
                return
            except (
                Exception
            ) as exc:  # read whole, but not unpickled (an exception class that cannot be rebuilt)
                future.set_exception(
                    DeltaplaneError(f"a batched-training worker's result could not be read: {exc!r}")
                )
                return
            except BaseException:
                # interrupted (Ctrl-C) part-way through a reply: where the next one starts is unknown, so no
                # later result could be trusted to be its task's. Stop the workers; every result still due fails.
                future.set_exception(
                    DeltaplaneError("interrupted while reading a batched-training worker's result")
                )
                self.shutdown(wait=False)
                raise
            if ok:
                arena = self._arenas[worker]
                future.set_result(_from_arena(value, arena) if future.used_arena and arena else value)
            else:
                future.set_exception(value)
        finally:
            if future.used_arena:  # its result was copied out (or never came): the arena is free again
                self._arena_busy[worker] = False

    def _died(self, worker: int, exc: BaseException) -> DeltaplaneError:
        """The error for a worker whose pipe broke: its exit code, and what to do."""
        code = self._procs[worker].exitcode
        return DeltaplaneError(
            f"a batched-training worker process died (exit code {code}): {exc!r}; close the trainer and "
            "start a new one"
        )

    @property
    def stopped(self) -> bool:
        """Whether the workers were stopped (:meth:`shutdown`, or an interrupted read): start a new pool."""
        return not self._conns

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers (each finishes the task it runs; ``wait=False``: stop them now). Results not read
        yet are dropped: their futures fail with a :class:`DeltaplaneError`."""
        conns, procs, self._conns, self._procs = self._conns, self._procs, [], []
        for waiting in self._waiting:
            while waiting:
                waiting.popleft().set_exception(
                    DeltaplaneError(
                        "the batched trainer's workers were shut down before this result was read"
                    )
                )
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(None)
            # closed at once: a worker whose unread reply fills the pipe gets a broken pipe instead of waiting
            # (the stop request stays readable in its buffer)
            conn.close()
        for proc in procs:
            if wait:
                proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        arenas, self._arenas = self._arenas, []
        for arena in arenas:
            if arena is not None:
                arena.close()


class _PipeFuture(Future):
    """A task's result on a :class:`ForkedWorkers` pipe, read when asked for."""

    def __init__(self, pool: ForkedWorkers, worker: int, used_arena: bool) -> None:
        super().__init__()
        self._pool, self._worker, self.used_arena = pool, worker, used_arena
        self.set_running_or_notify_cancel()

    def result(self, timeout: float | None = None) -> Any:
        """The task's result, read from the pipe if not yet; raises :class:`TimeoutError` (the future stays
        pending, its result readable later) when no reply arrived within ``timeout`` seconds."""
        self._read(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception (``None`` if it returned), read as :meth:`result` reads it."""
        self._read(timeout)
        return super().exception(0)

    def _read(self, timeout: float | None) -> None:
        """Read the worker's replies (earlier tasks' first: the pipe answers in order) until this one's came.

        A reply is read only once its first bytes are in the pipe, so a timeout never leaves one half read
        (a reply that started arriving is read whole: the worker is writing it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._pool._arrived(self._worker, wait):
                raise TimeoutError(f"no result from the batched-training worker within {timeout} s")
            self._pool._collect(self._worker)


def _serve(conn: Any, arena: mmap.mmap | None, callers_ends: Sequence[Any] = ()) -> None:
    """A forked worker's loop: run each task sent on ``conn`` and send back ``(True, result)`` (its arrays in
    ``arena`` where the task may use it and they fit) or ``(False, exception)``, until ``None`` (or the caller
    is gone). ``callers_ends``: the caller's ends of the pipes, which the fork copied here, closed first."""
    for end in callers_ends:
        end.close()
    torch.set_num_threads(1)
    replies = _Replies(conn)
    try:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            fn, args, kwargs, use_arena = task
            try:
                result = fn(*args, **kwargs)
                reply = (True, _to_arena(result, arena) if use_arena and arena is not None else result)
            except BaseException as exc:
                reply = (False, exc)
            replies.send(reply)
    finally:
        replies.drain()


class _Replies:
    """A worker's replies, in order, without its task loop ever waiting on a large one.

    A reply larger than the socket's buffer blocks its write until the caller reads; a caller that meanwhile
    writes the worker a large task blocks too, as the worker reads no task while it writes, and neither moves
    again. So a large reply (and every reply behind one not yet out) goes out from a sender thread, and the
    loop goes on reading tasks; a small one, with nothing ahead of it, goes out at once (the common case:
    results in the arena, scores). Failing to pickle a reply sends the error instead.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.pending = 0  # replies queued and not yet written
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def send(self, reply: tuple[bool, Any]) -> None:
        try:
            data = bytes(ForkingPickler.dumps(reply))
        except Exception as exc:  # an unpicklable result or exception
            error = DeltaplaneError(f"a batched-training worker could not send its result: {exc!r}")
            data = bytes(ForkingPickler.dumps((False, error)))
        with self.lock:
            direct = self.pending == 0 and len(data) <= _DIRECT_REPLY_BYTES
            if not direct:
                self.pending += 1
        if direct:
            self._write(data)
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="batched-trainer-replies", daemon=True)
            self.thread.start()
        self.queue.put(data)

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the caller is gone, or stopped this worker: nobody reads
            self.conn.send_bytes(data)

    def _run(self) -> None:
        while (data := self.queue.get()) is not None:
            self._write(data)
            with self.lock:
                self.pending -= 1

    def drain(self) -> None:
        """Write what is queued before the worker exits (a daemon thread would die part-way through a reply)."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()


def tree_map(tree: Any, kind: type | UnionType, fn: Callable[[Any], Any]) -> Any:
    """``tree`` (dicts, tuples, lists) with every leaf of type ``kind`` replaced by ``fn(leaf)``."""
    if isinstance(tree, kind):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(v, kind, fn) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return type(tree)(tree_map(v, kind, fn) for v in tree)
    return tree


@dataclass(frozen=True)
class _Placed:
    """A result whose arrays are in the arena: the result with each array replaced by its :class:`_InArena`."""

    tree: Any


def _to_arena(result: Any, arena: mmap.mmap) -> Any:
    """``result`` with its numpy arrays and ``bytes`` copied into ``arena`` (a :class:`_Placed`); ``result``
    itself if it has none, or they do not all fit (it then crosses the pipe)."""
    leaves: list[np.ndarray | bytes] = []
    tree_map(result, np.ndarray | bytes, leaves.append)  # the same walk, in the same order, as place() below
    if any(isinstance(a, np.ndarray) and a.dtype.hasobject for a in leaves):
        return result
    end, offsets = 0, []
    for a in leaves:
        offsets.append(end)
        end += -(-(len(a) if isinstance(a, bytes) else a.nbytes) // _ALIGN) * _ALIGN
    if not leaves or end > len(arena):
        return result
    places = iter(offsets)

    def place(a: np.ndarray | bytes) -> _InArena:
        offset = next(places)
        if isinstance(a, bytes):
            arena[offset : offset + len(a)] = a
            return _InArena(offset, _BYTES, (len(a),))
        np.frombuffer(arena, a.dtype, a.size, offset).reshape(a.shape)[...] = a
        return _InArena(offset, a.dtype.str, a.shape)

    return _Placed(tree_map(result, np.ndarray | bytes, place))


def _from_arena(value: Any, arena: mmap.mmap) -> Any:
    """A result read back: each array (and ``bytes``) a :class:`_Placed` result holds in ``arena`` copied out."""
    if not isinstance(value, _Placed):
        return value

    def copy_out(p: _InArena) -> np.ndarray | bytes:
        if p.dtype == _BYTES:
            return arena[p.offset : p.offset + p.shape[0]]  # one copy, straight into a bytes object
        dtype = np.dtype(p.dtype)
        return np.frombuffer(arena, dtype, int(np.prod(p.shape)), p.offset).reshape(p.shape).copy()

    return tree_map(value.tree, _InArena, copy_out)
