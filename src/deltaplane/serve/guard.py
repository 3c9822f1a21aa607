"""The service's front door: authenticate from headers, cap bodies while streaming, throttle failed logins.

:class:`RequestGuard` is a plain ASGI middleware that runs *before* FastAPI reads or parses anything:

0. A request head (path, query string, headers) above ``MAX_HEAD_BYTES`` (16 KiB) gets 431.
1. ``/v1/…`` needs a valid device token and ``/admin/…`` the admin token, checked from the ``Authorization``
   header alone; a request without one is answered 401 with ``Connection: close`` and its body is never read
   (an unauthenticated 200 MB JSON costs the server a header parse, not 1.2 GB of parsed objects).
2. A client address that keeps failing authentication is throttled (token bucket on *failures*, one for
   device tokens and one for the admin token): from then on a request from it whose token fails gets 429,
   its body unread. A valid device token still passes (a device behind the same NAT as an attacker is not
   locked out; a device token cannot be guessed, it carries a 256-bit MAC, so its verdict is no oracle); the
   admin token, a static secret, gets no check at all while its bucket is spent.
3. Every body is capped: uploads and SecAgg messages at ``max_upload_bytes``, the rest at ``max_json_bytes``. A
   declared ``Content-Length`` above the cap is refused at once; a chunked or lying body is counted while it
   streams and refused the moment it passes the cap. The endpoint then reads the already-bounded body.
   A request with both Content-Length and Transfer-Encoding is refused (400): the body is framed by its
   chunks, so its declared length says nothing (and a proxy reading it the other way is request smuggling).
   A body outside ``/v1`` and ``/admin`` (nobody authenticated it; the dashboard's sign-in form is the only
   such route that reads one) is capped at ``_SMALL_BODY`` (64 KiB): at ``max_json_bytes`` a thousand
   anonymous connections each holding a body one byte short of it held 2 GB.
4. Every body must arrive within ``body_timeout`` seconds of the request head, or the request gets 408:
   uvicorn's header deadline (:mod:`deltaplane.serve.server`) does not cover a body trickled a byte at a time.
5. A device may have at most ``max_device_requests`` requests in flight at once; one more gets 429 at once,
   its body unread. The per-device rate limit is spent only once the endpoint runs, after the body arrived,
   so without this one device token held ``max_connections`` uploads of ``max_upload_bytes`` each (8 GB).
6. All devices' bodies together may hold at most ``max_body_bytes_in_flight`` bytes: a request reserves
   its declared Content-Length (a chunked one its route's whole cap) before a byte is read, and keeps it until
   its endpoint has answered; one that does not fit gets 503 with ``Retry-After``, its body unread. The cap
   per device bounds one token, not *n* of them: 64 enrolled or stolen tokens held 64 × 4 uploads of 8 MiB.
7. One device may reserve at most ``max_device_body_bytes`` of that budget (its share; 429 with ``Retry-After``
   beyond it, body unread): without it four tokens each holding four chunked uploads filled the whole budget
   and refused every honest upload for ``body_timeout``; with the default share (an eighth of the budget) it
   takes eight tokens, and the operator revokes them.
8. After ``body_rate_grace`` seconds a device's body must keep pace (408 once it falls behind, its reservation
   given back): at least ``min_body_rate`` bytes/s on average since its head, and enough to bring the bytes it
   reserved within ``body_timeout`` (:meth:`RequestGuard._on_pace_for`). A body trickled a byte a second held
   its share of the budget for the whole ``body_timeout``; now it is dropped after the grace, its device may
   reserve no other body for ``SLOW_PENALTY_GRACES`` graces (429; a trickler reconnecting at once held its
   share for ever), and tokens that hold the budget must send the bytes they reserve. The 408 carries
   ``Retry-After`` (the penalty's length): the body was never handled, so an honest device may send it again.
9. Every refusal above that names a device (5 to 8) spends a request of that device's rate limit
   (``rate_limit``, the one its endpoints spend), and a device whose rate is spent is refused (429) at the
   door, each refusal in its turn at the rate's pace (:meth:`RequestGuard._refuse_over_rate`): refusals cost no
   body, but one token hammering the guard got ~750 of them a second, none of them counted against it. So is a
   request of a device whose next refusal turn is still ahead, even if its bucket refilled meanwhile: that
   request is the turn's (skipping the queue, it was refused at once as well, up to twice the rate). A
   refusal waiting its turn holds a connection, so at most ``max_waiting_refusals`` wait at once (a quarter
   of the service's ``max_connections``); one more goes out at once. The admin routes and other devices
   spend nothing of it; an honest device refused once spends one request.

The identity the guard found is left in ``scope["state"]["deltaplane.device"]`` so the endpoint does not check
the token a second time.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from deltaplane.serve.auth import DeviceIdentity, RateLimiter
from deltaplane.serve.bodies import content_length

__all__ = [
    "ADMIN_TOKEN_REFUSED",
    "BUDGET_RETRY_AFTER_S",
    "DEVICE_SCOPE_KEY",
    "MAX_HEAD_BYTES",
    "RequestGuard",
    "retry_after_s",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEVICE_SCOPE_KEY = "deltaplane.device"
#: the 401 an ``/admin`` request without the service's admin token gets: which token to send, and how
ADMIN_TOKEN_REFUSED = (
    "missing or invalid admin token; send the one `deltaplane serve` runs with (its --admin-token or "
    "$DELTAPLANE_ADMIN_TOKEN, or the token it printed at start) as Authorization: Bearer <token>; "
    "`deltaplane fleet` reads it from $DELTAPLANE_ADMIN_TOKEN"
)
#: the most bytes a request head (request line and headers) may take; uvicorn's h11 refuses a head that
#: passes it while it arrives in pieces, but parses one delivered in a single read (up to ~256 KiB) whole
MAX_HEAD_BYTES = 16 << 10
_DRAIN_FACTOR = 4
#: a device whose body was dropped for its pace may start no other body for this many graces (60 s at the
#: defaults): without it a trickler reconnected at once and held its share for ever, one head per grace
SLOW_PENALTY_GRACES = 6
#: the Retry-After of a request refused because the bodies in flight fill ``max_body_bytes_in_flight``: an
#: honest upload of a few MiB arrives within seconds, and a trickled one is cut at ``body_timeout``
BUDGET_RETRY_AFTER_S = 2
_SMALL_BODY = 64 << 10  # unauthenticated bodies up to this size are drained before the 401
# bodies the size of a model: plain uploads and SecAgg messages (a masked input holds one ring value per
# parameter, so it passes max_json_bytes for a model of about a million parameters); the endpoint then caps a
# SecAgg message at its stage's exact maximum
_UPLOAD = re.compile(r"^/v1/models/[^/]+/(rounds/[^/]+/update|secagg/[^/]+/(keys|shares|masked|unmask))$")


def retry_after_s(wait: float) -> int:
    """The ``Retry-After`` (whole seconds, at least 1) of a refusal whose cause ends in ``wait`` seconds.

    Rounded up: rounded to the nearest, a penalty with 59.4 s left said 59, and a device that obeyed it came
    back while it still ran and was refused again (spending its rate limit on the way)."""
    return max(1, math.ceil(wait))


class RequestGuard:
    """ASGI middleware: header-only authentication, failed-auth throttling and streamed body caps.

    Args:
        app: the ASGI app behind the guard.
        check_device: maps a bearer token to a :class:`DeviceIdentity`, or to why it is refused: a message for
            the device (a token of another service, of an old format), or "" / None for a generic 401.
        admin_token: the static admin bearer token.
        max_upload_bytes: cap of the update-upload route and of the SecAgg stages' messages.
        max_json_bytes: cap of every other body.
        failures: token bucket per client address and area (device, admin), spent by failed authentications.
        on_reject: called with a counter name for every rejection (service statistics).
        body_timeout: seconds a request body may take to arrive in full (408 after that).
        max_device_requests: requests one device may have in flight at once (429 beyond it, body unread).
        max_body_bytes_in_flight: bytes all device request bodies may reserve together (503 with
            ``Retry-After`` beyond it, body unread; admin and anonymous bodies have caps of their own and are
            not counted, so devices cannot lock the operator out); None: unbounded.
        max_device_body_bytes: bytes one device's bodies may reserve together (429 with ``Retry-After``
            beyond it, body unread); None: no share, only ``max_body_bytes_in_flight``.
        min_body_rate: bytes/s a body must average from its head on, once ``body_rate_grace`` seconds have
            passed (408 once it falls behind); 0: no minimum, only ``body_timeout``.
        body_rate_grace: seconds a body may take before ``min_body_rate`` applies (a connection's slow start,
            a device's first radio wake-up).
        rate_limit: the per-device request rate (keyed by device id) its endpoints spend: each refusal of a
            device at the guard spends one too, and a device with none left is refused at the rate's pace;
            None: refusals are free.
        max_waiting_refusals: over-rate refusals that may wait their turn at once, all devices together (each
            holds its connection); one more is answered at once. None: no bound.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        check_device: Callable[[str], DeviceIdentity | str | None],
        admin_token: str,
        max_upload_bytes: int,
        max_json_bytes: int,
        failures: RateLimiter,
        on_reject: Callable[[str], None] = lambda _: None,
        body_timeout: float = 120.0,
        max_device_requests: int = 4,
        max_body_bytes_in_flight: int | None = None,
        max_device_body_bytes: int | None = None,
        min_body_rate: float = 0.0,
        body_rate_grace: float = 10.0,
        rate_limit: RateLimiter | None = None,
        max_waiting_refusals: int | None = None,
    ) -> None:
        self.app = app
        self.rate_limit = rate_limit
        # device id -> loop time its next over-rate refusal may go out; event loop only
        self._refusal_due: dict[str, float] = {}
        self.max_waiting_refusals = max_waiting_refusals
        self._waiting_refusals = 0  # over-rate refusals waiting their turn now; event loop only
        self.max_device_body_bytes = max_device_body_bytes
        self.min_body_rate = min_body_rate
        self.body_rate_grace = body_rate_grace
        # body bytes reserved per device id; touched only on the event loop, holds only devices with a reservation
        self._device_bytes: dict[str, int] = {}
        # device id -> loop time until which it may not reserve a body (it trickled one, dropped); event loop only
        self._slow_until: dict[str, float] = {}
        self.max_device_requests = max_device_requests
        self.max_body_bytes_in_flight = max_body_bytes_in_flight
        #: bytes reserved by the device bodies being read or handled; touched only on the event loop
        self.body_bytes_in_flight = 0
        # requests in flight per device id; touched only on the event loop, so it needs no lock
        self._in_flight: dict[str, int] = {}
        self.body_timeout = body_timeout
        self.check_device = check_device
        self.admin_token = admin_token.encode()
        self.max_upload_bytes = max_upload_bytes
        self.max_json_bytes = max_json_bytes
        self.failures = failures
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        head += sum(len(k) + len(v) + 4 for k, v in scope["headers"])  # "name: value\r\n"
        if head > MAX_HEAD_BYTES:
            self.on_reject("rejected.head_too_large")
            await _reply(
                send,
                431,
                f"request head of {head} bytes (path, query string and headers) exceeds the "
                f"{MAX_HEAD_BYTES}-byte limit; send shorter headers or query",
            )
            return
        path: str = scope["path"]
        area = "device" if path.startswith("/v1/") else "admin" if path.startswith("/admin") else None
        headers = dict(scope["headers"]) if area or scope["method"] not in ("GET", "HEAD") else {}
        if area is not None:
            client = (scope.get("client") or ("unknown", 0))[0]
            key = f"{area} {client}"  # a flood of bad device tokens does not throttle the admin, nor back
            wait = self.failures.wait(key)
            token = _bearer(headers.get(b"authorization", b""))
            # A valid device token passes a throttled address (a device behind the same NAT as an attacker
            # must not be locked out): checking one costs an HMAC of at most 4 KiB (~5 us), and its verdict
            # tells a guesser nothing, a valid token needing a 256-bit MAC. The admin token is a static
            # secret an operator chose, so a throttled address gets no verdict on it at all.
            refused = self._authenticate(area, token, scope) if area == "device" or wait <= 0 else ""
            ok = refused is None
            if not ok and wait > 0:
                self.on_reject("rejected.auth_throttled")
                await _reply(
                    send,
                    429,
                    f"too many failed authentications from {client}; retry in {wait:.1f}s",
                    {"retry-after": str(retry_after_s(wait))},
                )
                return
            if not ok:
                await self._drain_small(receive, headers)
                self.failures.acquire(key)
                self.on_reject(
                    "rejected.unauthenticated" if area == "device" else "rejected.unauthenticated_admin"
                )
                what = refused or (
                    "missing, invalid, expired or revoked device token; ask an admin for one (POST /admin/devices)"
                    if area == "device"
                    else ADMIN_TOKEN_REFUSED
                )
                await _reply(send, 401, what, {"www-authenticate": "Bearer"})
                return
        ident = scope.get("state", {}).get(DEVICE_SCOPE_KEY) if area == "device" else None
        if ident is None:
            await self._bounded(scope, receive, send, area, headers, None)
            return
        device_id = ident.device_id
        if self.rate_limit is not None and (
            self.rate_limit.wait(device_id) > 0
            # its refusals' next turn is ahead: the request the bucket refills by then is that turn's; taken by
            # a request skipping the queue (refused at once, its device busy), the turn found none and went out
            # anyway, and under continuous arrivals up to twice the rate of refusals went out
            or self._refusal_due.get(device_id, -math.inf) > asyncio.get_running_loop().time()
        ):
            await self._refuse_over_rate(receive, send, headers, device_id)
            return
        held = self._in_flight.get(device_id, 0)
        if held >= self.max_device_requests:
            await self._refuse_unread(
                receive,
                send,
                headers,
                "rejected.device_busy",
                429,
                f"device {device_id} already has {held} requests in flight (at most {self.max_device_requests}); "
                "wait for one to finish",
                retry_after_s=1,
                device_id=device_id,
            )
            return
        self._in_flight[device_id] = held + 1
        try:
            await self._bounded(scope, receive, send, area, headers, device_id)
        finally:
            left = self._in_flight[device_id] - 1
            if left:
                self._in_flight[device_id] = left
            else:
                del self._in_flight[device_id]  # the map holds only devices with a request in flight

    async def _bounded(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        area: str | None,
        headers: dict[bytes, bytes],
        device_id: str | None,
    ) -> None:
        """Pass the request on once its body has arrived in full, within its cap, ``body_timeout`` and
        ``min_body_rate``, having reserved its bytes from the budget and from ``device_id``'s share."""
        path: str = scope["path"]
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and b"content-length" not in headers:
            await self.app(scope, receive, send)
            return
        if area is None:  # nobody authenticated it: the dashboard's sign-in form is the largest such body
            limit = _SMALL_BODY
        else:
            limit = self.max_upload_bytes if _UPLOAD.match(path) else self.max_json_bytes
        declared = headers.get(b"content-length")
        if declared is not None and b"transfer-encoding" in headers:
            # h11 frames such a body by its chunks and ignores the length (RFC 9112 6.1), so "Content-Length: 1"
            # reserved one byte of the budget for a body up to the cap; a proxy framing it by the length instead
            # is how requests are smuggled. RFC 9112 6.3 lets a server refuse it: it does.
            self.on_reject("rejected.bad_content_length")
            await _reply(
                send,
                400,
                "a request with both Content-Length and Transfer-Encoding is refused (request smuggling); send one",
            )
            return
        size_declared = content_length(declared) if declared is not None else None
        if declared is not None and size_declared is None:  # h11 frames by it: refused there first, kept here
            self.on_reject("rejected.bad_content_length")
            await _reply(
                send,
                400,
                f"Content-Length {declared.decode(errors='replace')!r} is not a byte count (ASCII digits only)",
            )
            return
        if size_declared is not None and size_declared > limit:
            self.on_reject("rejected.too_large")
            if area is not None and size_declared <= _DRAIN_FACTOR * limit:
                # an authenticated, moderately oversized body is read and dropped (memory stays flat) so
                # the client, still sending, reads a clean 413 instead of a connection reset
                await self._drain(receive)
            await _reply(send, 413, f"body of {size_declared} bytes exceeds the {limit}-byte limit")
            return
        # Only devices' bodies count: anonymous ones have their own cap (max_connections x 64 KiB), and the
        # admin is one trusted holder; counted, either would let device tokens, or anonymous clients, refuse
        # the operator the very requests that end an attack (revoking the stolen tokens).
        reserve = (limit if size_declared is None else size_declared) if area == "device" else 0
        budget = self.max_body_bytes_in_flight
        share = self.max_device_body_bytes
        wait = self._slow_wait(device_id) if reserve and device_id is not None else 0.0
        if wait > 0:
            await self._refuse_unread(
                receive,
                send,
                headers,
                "rejected.device_slow",
                429,
                f"device {device_id} sent a body slower than the service's minimum (--min-body-rate) and may "
                f"send another in {wait:.0f} s; send it over a faster link, or a smaller update",
                retry_after_s=retry_after_s(wait),
                device_id=device_id,
            )
            return
        mine = self._device_bytes.get(device_id, 0) if device_id is not None else 0
        unsized = (
            ""
            if size_declared is not None
            else " (a body without Content-Length reserves its route's whole cap: send Content-Length)"
        )
        if reserve and device_id is not None and share is not None and mine + reserve > share:
            await self._refuse_unread(
                receive,
                send,
                headers,
                "rejected.device_bodies",
                429,
                f"device {device_id} already reserves {mine} bytes of request bodies, and this one's {reserve} "
                f"would pass one device's {share}-byte share (--max-device-body-bytes); wait for its other "
                f"uploads to finish, or retry in {BUDGET_RETRY_AFTER_S} s" + unsized,
                retry_after_s=BUDGET_RETRY_AFTER_S,
                device_id=device_id,
            )
            return
        if reserve and budget is not None and self.body_bytes_in_flight + reserve > budget:
            await self._refuse_unread(
                receive,
                send,
                headers,
                "rejected.busy_bodies",
                503,
                f"the service is reading {self.body_bytes_in_flight} bytes of request bodies, and this one's "
                f"{reserve} would pass its {budget}-byte budget (--max-body-bytes-in-flight); retry in "
                f"{BUDGET_RETRY_AFTER_S} s" + unsized,
                retry_after_s=BUDGET_RETRY_AFTER_S,
                device_id=device_id,
            )
            return
        self.body_bytes_in_flight += reserve
        if device_id is not None and reserve:
            self._device_bytes[device_id] = mine + reserve
        try:
            too_slow = await self._read_then_call(scope, receive, send, limit, reserve)
        finally:
            self.body_bytes_in_flight -= reserve  # once the endpoint answered: it held the body until then
            if device_id is not None and reserve:
                left = self._device_bytes[device_id] - reserve
                if left:
                    self._device_bytes[device_id] = left
                else:
                    del self._device_bytes[device_id]
        if too_slow and device_id is not None and reserve:
            self._penalize(device_id)

    def _slow_wait(self, device_id: str) -> float:
        """Seconds ``device_id`` must still wait after its last body dropped for slowness (0: none)."""
        until = self._slow_until.get(device_id)
        if until is None:
            return 0.0
        left = until - asyncio.get_running_loop().time()
        if left <= 0:
            del self._slow_until[device_id]
        return max(0.0, left)

    def _penalize(self, device_id: str) -> None:
        """Keep ``device_id`` from reserving body bytes for :data:`SLOW_PENALTY_GRACES` graces: a dropped
        trickler that reconnects at once held its share of the budget for ever at the cost of one request head
        per grace; now it holds it one grace in ``1 + SLOW_PENALTY_GRACES``.

        In memory only (a restart forgets it): it lasts a minute at the defaults, a restart drops the trickler's
        connections anyway, and stored it would cost a database write on the event loop per penalty."""
        now = asyncio.get_running_loop().time()
        if (
            len(self._slow_until) > 4096
        ):  # forget the penalties that ended: the map holds recent tricklers only
            self._slow_until = {d: t for d, t in self._slow_until.items() if t > now}
        self._slow_until[device_id] = now + SLOW_PENALTY_GRACES * self.body_rate_grace

    async def _read_then_call(
        self, scope: Scope, receive: Receive, send: Send, limit: int, reserve: int = 0
    ) -> bool:
        """Read the body (at most ``limit`` bytes, within ``body_timeout``, at the pace :meth:`_on_pace_for`
        sets for its ``reserve``), then pass the request on; True when it was dropped for being too slow."""
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + self.body_timeout
        while True:
            # the body is on pace until its bytes so far, at the minimum rate, would have taken longer than
            # the time since its head: one timer per message until then, no polling
            due = min(end, start + self._on_pace_for(size, reserve))
            try:
                async with asyncio.timeout_at(due):
                    message = await receive()
            except TimeoutError:
                if due >= end:
                    self.on_reject("rejected.body_timeout")
                    await _reply(send, 408, f"the request body did not arrive within {self.body_timeout:g} s")
                    return False
                elapsed = loop.time() - start
                self.on_reject("rejected.body_too_slow")
                await _reply(
                    send,
                    408,
                    f"the request body arrived at {size / elapsed:.0f} bytes/s ({size} bytes in {elapsed:.1f} s): "
                    f"once {self.body_rate_grace:g} s have passed a body must keep at least {self.min_body_rate:.0f} "
                    f"bytes/s (serve --min-body-rate) and the pace to bring the {reserve} bytes it reserved within "
                    f"{self.body_timeout:g} s (--body-timeout); send it over a faster link, or a smaller update"
                    + (
                        ""
                        if reserve < limit
                        else ", with its Content-Length (one without reserves the whole cap)"
                    ),
                    # the body was never handled: the device may send it again once its penalty ends
                    {"retry-after": str(retry_after_s(SLOW_PENALTY_GRACES * self.body_rate_grace))},
                )
                return True
            if message["type"] == "http.disconnect":
                return False
            body = message.get("body", b"")
            size += len(body)
            if size > limit:  # a chunked or lying body: stop reading at the cap
                self.on_reject("rejected.too_large")
                await _reply(send, 413, f"body exceeds the {limit}-byte limit")
                return False
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def bounded_receive() -> Message:
            if replay:
                return replay.pop()
            return await receive()  # after the body: wait for the disconnect like the server would

        await self.app(scope, bounded_receive, send)
        return False

    def _on_pace_for(self, size: int, reserve: int) -> float:
        """Seconds from its head a body with ``size`` bytes arrived so far stays on pace (infinite without a
        minimum rate). Two paces, the stricter wins:

        * ``min_body_rate``: the grace, or the time its bytes take at that rate if longer;
        * its ``reserve``: the line from (grace, 0 bytes) to (``body_timeout``, ``reserve`` bytes). A body at a
          steady rate that brings its reserve within ``body_timeout`` never falls behind it (even with a silent
          grace first); one trickled that holds an 8 MiB reservation must send ~70 KiB/s, not 4 KiB/s, so a few
          tokens holding the budget pay for it in bandwidth, bytes the budget is there to buffer."""
        if self.min_body_rate <= 0:
            return float("inf")
        by_rate = max(self.body_rate_grace, size / self.min_body_rate)
        span = self.body_timeout - self.body_rate_grace
        if reserve <= 0 or span <= 0:
            return by_rate
        return min(by_rate, self.body_rate_grace + span * size / reserve)

    def _authenticate(self, area: str, token: str, scope: Scope) -> str | None:
        """None when ``token`` is valid for ``area``, else the 401's detail ("" for the generic one).

        A device's identity is left in the scope for the endpoint.
        """
        if not token:
            return ""
        if area == "admin":
            return None if secrets.compare_digest(token.encode(), self.admin_token) else ""
        ident = self.check_device(token)
        if not isinstance(ident, DeviceIdentity):
            return ident or ""
        scope.setdefault("state", {})[DEVICE_SCOPE_KEY] = ident
        return None

    async def _refuse_unread(
        self,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        counter: str,
        status: int,
        detail: str,
        *,
        retry_after_s: int,
        device_id: str | None,
    ) -> None:
        """Refuse a request before handling it, its body unread (only a small one drained), counted under
        ``counter``, with ``Retry-After``: the refusals a device may retry (:func:`serve.client.retry_after`).
        The refusal spends one request of ``device_id``'s rate limit, as its endpoints do."""
        self.on_reject(counter)
        if self.rate_limit is not None and device_id is not None:
            self.rate_limit.acquire(device_id)
        await self._drain_small(receive, headers)
        await _reply(send, status, detail, {"retry-after": str(retry_after_s)})

    async def _refuse_over_rate(
        self, receive: Receive, send: Send, headers: dict[bytes, bytes], device_id: str
    ) -> None:
        """Refuse (429) a request of ``device_id``, whose rate limit is spent, in its turn: over-rate refusals of
        one device go out one per ``1 / rate`` seconds (at most ``body_timeout`` queued), so a token hammering the
        door gets ``rate`` answers a second, not one per connection it opens. The door sends a request here
        while its device's next turn is ahead, bucket refilled or not, so no request skips the queue.

        A refusal waiting its turn holds its connection, one of uvicorn's ``max_connections``: at most
        ``max_waiting_refusals`` wait at once, all devices together, and a refusal beyond them goes out at once
        instead. Unbounded, the waiting refusals of one token (loopback, or a proxy, is exempt from the cap per
        address) held every connection slot for up to ``body_timeout``, and every other device got 503."""
        assert self.rate_limit is not None
        self.on_reject("rejected.rate_limited")
        if self.max_waiting_refusals is None or self._waiting_refusals < self.max_waiting_refusals:
            self._waiting_refusals += 1
            try:
                await self._wait_turn(receive, headers, device_id)
            finally:
                self._waiting_refusals -= 1
        else:  # the refusals waiting hold their share of the connections: answered at once, holding none
            await self._drain_small(receive, headers)
        # the request its turn refilled is this refusal's: otherwise the door served ``rate`` refusals a second
        # past the limit (device busy, body budget) besides ``rate`` paced ones
        self.rate_limit.acquire(device_id)
        wait = max(self.rate_limit.wait(device_id), 1 / self.rate_limit.rate)
        await _reply(
            send,
            429,
            f"rate limit of {self.rate_limit.rate:g}/s exceeded for device {device_id} (refused requests count "
            f"too); retry in {wait:.2f}s",
            {"retry-after": str(retry_after_s(wait))},
        )

    async def _wait_turn(self, receive: Receive, headers: dict[bytes, bytes], device_id: str) -> None:
        """Wait for ``device_id``'s next over-rate refusal turn (its body, if small, drained meanwhile)."""
        assert self.rate_limit is not None
        now = asyncio.get_running_loop().time()
        due = self._refusal_due.get(device_id, now)
        if due <= now:
            due = now
            if len(self._refusal_due) > 4096:  # forget the turns that passed: the map holds hammering devices
                self._refusal_due = {d: t for d, t in self._refusal_due.items() if t > now}
        self._refusal_due[device_id] = min(due, now + self.body_timeout) + 1 / self.rate_limit.rate
        await self._drain_small(receive, headers)
        if due > now:
            await asyncio.sleep(min(due - now, self.body_timeout))

    async def _drain_small(self, receive: Receive, headers: dict[bytes, bytes]) -> None:
        """Before refusing a request unread: read and drop its body if it declared a small one. Closing a
        socket with unread bytes makes the kernel send a reset, and the client would lose the refusal."""
        declared = content_length(headers.get(b"content-length", b""))
        if declared is not None and declared <= _SMALL_BODY:
            await self._drain(receive)

    async def _drain(self, receive: Receive) -> None:
        """Read and drop the rest of a body, for at most ``body_timeout`` seconds (then the reply goes out)."""
        try:
            async with asyncio.timeout(self.body_timeout):
                await _drain(receive)
        except TimeoutError:
            self.on_reject("rejected.body_timeout")


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


def _bearer(value: bytes) -> str:
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or len(token) > 4096:
        return ""
    return token.strip()


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error that closes the connection, so an unread request body is never drained."""
    body = json.dumps({"detail": detail}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
