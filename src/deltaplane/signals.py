"""SIGTERM ends a command the way Ctrl-C does, so its cleanup runs.

Every command that writes output stages it (a hidden folder or ``.NAME.*.tmp`` file beside the target, renamed
into place at the end) and removes the stage in an ``except BaseException`` / ``finally`` block. Ctrl-C raises
``KeyboardInterrupt`` and so runs that block; SIGTERM (``kill``, ``timeout``, a cancelled CI job) by default
ends Python at once and leaves the stage behind. :func:`exit_on_terminate` turns it into ``SystemExit`` instead.
The CLI installs it once around every command but the servers (``serve``, ``ui``: uvicorn handles SIGTERM
itself, shutting down gracefully); :func:`~deltaplane.merging.streaming.merge_files` installs it for library
callers too. :func:`signals_held` is the other half: it defers those signals (and SIGINT) while a finished
output is swapped into place, which must not stop half way. SIGKILL cannot be caught: the stage it leaves is
removed by the next writer of the same output (:mod:`deltaplane.staging` names each stage after its process).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

__all__ = ["exit_on_terminate", "signals_held"]

_TERMINATE = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


@contextlib.contextmanager
def _handling(sigs: Sequence[int], handler: Callable[[int, object], None]) -> Iterator[bool]:
    """``handler`` for ``sigs`` inside the block, the handlers in place before restored after; yields whether it
    was installed (only the main thread can install handlers: elsewhere nothing changes).

    A signal the process ignores (``SIG_IGN``: ``nohup`` ignores SIGHUP, a supervisor may ignore SIGTERM) stays
    ignored: whoever started the process chose that, and a long run under ``nohup`` must outlive its terminal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.signal(s, handler) for s in sigs if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield True
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def exit_on_terminate() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into ``SystemExit(128 + signum)`` inside the block; the handlers in place before
    are restored on the way out.

    SIGINT already raises ``KeyboardInterrupt``. A handler installed inside the block (a server's graceful
    shutdown) takes precedence while it is in place. Only the main thread can install handlers; elsewhere this
    does nothing (the caller's own handling applies).
    """

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    with _handling(_TERMINATE, stop):
        yield


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done, then deliver them to the handlers in place before: for
    swapping a finished output into place, which must not stop half way. Python runs signal handlers in the
    main thread whichever thread the signal hit, so handlers are swapped (a thread's signal mask would not hold a
    signal another thread receives). Outside the main thread: no effect."""
    pending: list[int] = []
    with _handling([signal.SIGINT, *_TERMINATE], lambda signum, frame: pending.append(signum)):
        yield
    for s in dict.fromkeys(pending):
        signal.raise_signal(s)
