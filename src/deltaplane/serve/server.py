"""Run the service with uvicorn: in the foreground (``deltaplane serve``) or in a background thread.

:class:`BackgroundServer` is what ``deltaplane run --transport http``, the load benchmark and the tests use: a
real uvicorn server on a loopback socket (port 0 picks a free port), started and stopped in-process.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from types import TracebackType
from typing import Any

from fastapi import FastAPI

from deltaplane.errors import ServiceUnreachable
from deltaplane.serve.guard import MAX_HEAD_BYTES

__all__ = ["WRITE_TIMEOUT_S", "BackgroundServer", "listen_url", "serve"]

#: seconds a response may sit with its write buffer full (a client reading nothing) before it is aborted; a
#: device on a link of a few kB/s still drains a buffer (64 KiB) well within it. The service's own is its
#: ``ServiceConfig.write_timeout_s`` (``serve --write-timeout``); this one is for an app without one (``ui``)
WRITE_TIMEOUT_S = 60.0


def serve(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    ssl_options: dict[str, Any] | None = None,
    header_timeout: float = 10.0,
    write_timeout: float | None = None,
) -> None:
    """Serve ``app`` until interrupted (blocking); ``ssl_options`` from :func:`~deltaplane.serve.tls.server_ssl_options`.

    ``write_timeout`` (None: the app's ``ServiceConfig.write_timeout_s``, else :data:`WRITE_TIMEOUT_S`) is how
    long a response may wait on a client that reads nothing."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        **_hardening(app, header_timeout, write_timeout),
        **(ssl_options or {}),
    )


def _hardening(
    app: FastAPI, header_timeout: float = 10.0, write_timeout: float | None = None
) -> dict[str, Any]:
    """uvicorn settings against slow or oversized headers (h11, 16 KiB of headers, a header deadline) and,
    for the service's app, too many connections: ``ServiceConfig.max_connections`` becomes uvicorn's
    ``limit_concurrency`` (503 beyond it), so a flood of connections cannot exhaust file descriptors, and
    ``ServiceConfig.max_connections_per_address`` keeps one address from holding all of them."""
    config = getattr(app.state, "service_config", None)
    if write_timeout is None:
        write_timeout = getattr(config, "write_timeout_s", WRITE_TIMEOUT_S)
    return {
        "http": header_deadline_protocol(
            header_timeout, getattr(config, "max_connections_per_address", None), write_timeout
        ),
        "timeout_keep_alive": 5,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,  # a head arriving in one read: RequestGuard
        "limit_concurrency": getattr(config, "max_connections", None),
    }


def header_deadline_protocol(
    header_timeout: float, per_address: int | None = None, write_timeout: float = WRITE_TIMEOUT_S
) -> type:
    """uvicorn's h11 protocol with deadlines for request heads and stalled responses, and a cap per address.

    uvicorn times out idle keep-alive connections, but not a client that trickles header bytes: every byte
    resets its idle timer. Here a connection must deliver a complete request head within ``header_timeout``
    seconds of opening, or of the first byte after the previous response; otherwise it is closed.

    ``limit_concurrency`` bounds the connections of all clients together, so one address opening that many
    (and renewing them every header deadline) left every device a 503. With ``per_address``, an address
    already holding that many connections gets its new one answered 503 and closed at once, before it counts
    against ``limit_concurrency``. Loopback peers are exempt: a reverse proxy on the same host, or the
    simulator's devices, all come from there.

    A response whose write buffer stays full for ``write_timeout`` seconds (a client that stopped reading) is
    aborted. uvicorn has no write deadline: a client that asked for a model and never read it held its
    connection for ever, the keep-alive close included (a transport closes only once its buffer is sent), so
    it counted against ``limit_concurrency`` for good, and a handful of such clients held every connection.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    held: dict[str, int] = {}  # connections per peer address, for every protocol instance of one server

    class HeaderDeadlineH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            self._header_timer: Any = None
            self._write_timer: Any = None
            self._peer = _capped_peer(transport) if per_address else None
            if self._peer is not None:
                n = held.get(self._peer, 0)
                if n >= (per_address or 0):
                    self._peer, self._refused = None, True
                    transport.write(_too_many_from(n))
                    transport.close()
                    return
                held[self._peer] = n + 1
            self._refused = False
            super().connection_made(transport)
            self._arm()

        def pause_writing(self) -> None:
            # the client reads nothing for write_timeout seconds: drop it (a resume means progress)
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self.transport.abort)
            super().pause_writing()

        def resume_writing(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().resume_writing()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            if self._peer is not None:
                left = held[self._peer] - 1
                if left:
                    held[self._peer] = left
                else:
                    del held[self._peer]  # the map holds only addresses with a connection open
            for timer in (self._header_timer, self._write_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._write_timer = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            armed_for = self.scope  # a new request head replaces self.scope
            self._header_timer = self.loop.call_later(header_timeout, self._deadline, armed_for)

        def _deadline(self, armed_for: Any) -> None:
            self._header_timer = None
            if self.scope is armed_for and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11Protocol


def _capped_peer(transport: Any) -> str | None:
    """The peer's address whose connections are counted, or None for a loopback (or unknown) peer."""
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple | list) and peer else None
    if not isinstance(host, str):
        return None
    try:
        return None if ipaddress.ip_address(host.split("%")[0]).is_loopback else host
    except ValueError:
        return host


def _too_many_from(n: int) -> bytes:
    """The 503 a connection over its address's cap gets before it is closed."""
    body = json.dumps(
        {
            "detail": f"this address already holds {n} connections to the service (its "
            "--max-connections-per-address); close some, or reuse them (keep-alive)"
        }
    ).encode()
    head = (
        f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
    )
    return head.encode() + b"\r\nconnection: close\r\nretry-after: 1\r\n\r\n" + body


class BackgroundServer:
    """A uvicorn server in a daemon thread; use as a context manager, read :attr:`url` once started."""

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        ssl_options: dict[str, Any] | None = None,
        header_timeout: float = 10.0,
        write_timeout: float | None = None,
    ) -> None:
        import uvicorn

        self._tls = bool(ssl_options)
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            # an embedded server must not reconfigure the host process's logging: uvicorn's default dictConfig
            # closes every existing handler and binds new ones to whatever sys.stderr is at that moment
            log_config=None,
            access_log=False,
            backlog=4096,
            timeout_graceful_shutdown=2,
            **{**_hardening(app, header_timeout, write_timeout), "timeout_keep_alive": 30},
            **(ssl_options or {}),
        )
        self._server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._server.run, name="deltaplane-serve", daemon=True)
        self.url = ""

    def start(self, timeout: float = 20.0) -> BackgroundServer:
        """Start serving; wait up to ``timeout`` seconds for the socket to listen. A server that is not listening
        by then is stopped and :class:`~deltaplane.errors.ServiceUnreachable` says which of the two happened
        (its thread ended, e.g. the address was taken, or the deadline passed on a loaded machine)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise ServiceUnreachable(
                    f"the local deltaplane server on {self._config.host}:{self._config.port} stopped before it "
                    "listened (uvicorn logged why: an address in use, a TLS file it could not load)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceUnreachable(
                    f"the local deltaplane server on {self._config.host}:{self._config.port} was not listening "
                    f"within {timeout:g} s of its start (a heavily loaded machine: pass a larger timeout)"
                )
            time.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = listen_url("https" if self._tls else "http", host, port)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def listen_url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port`` for a listening address; an IPv6 literal goes in brackets (RFC 3986), or the URL
    (``http://::1:8000``) would not open."""
    return f"{scheme}://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{port}"
