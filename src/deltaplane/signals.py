"""SIGTERM ends a command the way Ctrl-C does, so its cleanup runs.

Every command that writes output stages it (a hidden folder or ``.NAME.*.tmp`` file beside the target, renamed
into place at the end) and removes the stage in an ``except BaseException`` / ``finally`` block. Ctrl-C raises
``KeyboardInterrupt`` and so runs that block; SIGTERM (``kill``, ``timeout``, a cancelled CI job) by default
ends Python at once and leaves the stage behind. :func:`exit_on_terminate` turns it into ``SystemExit`` instead.
The CLI installs it once around every command but the servers (``serve``, ``ui``: uvicorn handles SIGTERM
itself, shutting down gracefully); :func:`~deltaplane.merging.streaming.merge_files` installs it for library
callers too.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["exit_on_terminate"]


@contextlib.contextmanager
def exit_on_terminate() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into ``SystemExit(128 + signum)`` inside the block; the handlers in place before
    are restored on the way out.

    SIGINT already raises ``KeyboardInterrupt``. A handler installed inside the block (a server's graceful
    shutdown) takes precedence while it is in place. Only the main thread can install handlers; elsewhere this
    does nothing (the caller's own handling applies).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    sigs = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, stop) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
