"""The dashboard's routes under ``/ui``: runs, registry and fleet pages behind the admin token.

Mounted by ``deltaplane serve`` (with the live fleet) and served alone by ``deltaplane ui`` (runs and registry).
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from time import time as wall_time
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from deltaplane.errors import ConfigError, DeltaplaneError, NotFound
from deltaplane.ui import pages
from deltaplane.ui.session import (
    COOKIE,
    RevokedSessions,
    Session,
    SessionKey,
    SessionLimits,
    make_cookie,
    read_cookie,
)
from deltaplane.ui.sources import FleetSource, RegistryUnavailable, RegistryView, RunRef, RunsSource

__all__ = ["LoginThrottle", "create_ui_router", "is_ui_path", "throttle_key", "validation_page"]

#: A login form body is one short field; anything longer is refused before it is parsed.
MAX_LOGIN_BODY = 4096
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z"
#: A ``?page=`` number of a paged table (from 1).
Page = Annotated[int, Query(ge=1, le=1_000_000)]


class _LoginRequired(Exception):
    pass


class _Throttled(Exception):
    """An address refused by the :class:`LoginThrottle` tried a bearer token: 429, the token unchecked."""

    def __init__(self, wait: float, why: str) -> None:
        super().__init__(wait)
        self.wait, self.why = wait, why


def throttle_key(address: str) -> str:
    """The key an address's failed sign-ins are counted under: an IPv4 address itself, an IPv6 address its /64.

    One IPv6 subscriber is routed a whole /64 (often a /56 or /48) and can send from any of its 2**64 addresses,
    so counting per IPv6 address let one attacker try five tokens from each of them.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is not part of it
    except ValueError:  # not an IP address (a test client, a Unix socket): the text as it is
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


class LoginThrottle:
    """Failed sign-ins, counted per address and over all addresses together.

    Per address (an IPv6 address counts as its /64, :func:`throttle_key`): after ``limit`` failures within
    ``lockout_s`` seconds, that address is refused for ``lockout_s`` seconds counted from the failure that
    reached the limit (not from the first one: five failures spread over 59 s still lock it out for a minute).

    Over all addresses: after ``global_limit`` failures within ``global_window_s`` seconds (an attacker with many
    addresses), every address *without a recent successful sign-in* is refused until the oldest of those
    failures is ``global_window_s`` old. An address that signed in (or sent the right bearer token) within the
    last ``known_s`` seconds is exempt, so an attack cannot lock the operator out; it is still held to its own
    per-address limit.

    Failed sign-ins on ``/ui/login`` and wrong ``Authorization: Bearer`` tokens on any ``/ui`` page count alike.
    Bounded: at most ``max_keys`` addresses are remembered, failing and known ones each (the oldest are
    forgotten first), and at most ``global_limit`` failure times.
    """

    def __init__(
        self,
        *,
        limit: int = 5,
        lockout_s: float = 60.0,
        global_limit: int = 30,
        global_window_s: float = 60.0,
        known_s: float = 12 * 3600.0,
        max_keys: int = 10_000,
    ) -> None:
        for name, value in (("limit", limit), ("global_limit", global_limit), ("max_keys", max_keys)):
            if value < 1:
                raise ConfigError(f"LoginThrottle {name} must be at least 1 (got {value})")
        self.limit, self.lockout_s, self.max_keys = limit, lockout_s, max_keys
        self.global_limit, self.global_window_s, self.known_s = global_limit, global_window_s, known_s
        # key -> (failures in the current window, window start, locked until)
        self._fails: OrderedDict[str, tuple[int, float, float]] = OrderedDict()
        self._recent: deque[float] = deque(maxlen=global_limit)  # times of the last failures, any address
        self._known: OrderedDict[str, float] = OrderedDict()  # key -> time of its last successful sign-in
        self._lock = threading.Lock()

    def check(self, address: str) -> tuple[float, str]:
        """Seconds ``address`` must still wait (0.0 when it may try) and why, as a sentence for the page."""
        key = throttle_key(address)
        with self._lock:
            now = time.monotonic()
            _, _, until = self._fails.get(key, (0, 0.0, 0.0))
            if until > now:
                return until - now, "too many failed sign-ins from this address"
            known = self._known.get(key)
            if known is not None and now - known <= self.known_s:
                return 0.0, ""
            if len(self._recent) >= self.global_limit:
                wait = self._recent[0] + self.global_window_s - now
                if wait > 0:
                    return wait, (
                        "too many failed sign-ins from all addresses together; only addresses that signed in "
                        "recently may try now"
                    )
        return 0.0, ""

    def blocked(self, address: str) -> float:
        """Seconds ``address`` must still wait (0.0 when it may try)."""
        return self.check(address)[0]

    def failed(self, address: str) -> None:
        """Count one failure of ``address``; the ``limit``-th within ``lockout_s`` locks it out from now."""
        key = throttle_key(address)
        with self._lock:
            now = time.monotonic()
            self._recent.append(now)
            count, since, until = self._fails.pop(key, (0, now, 0.0))
            if until > now:  # already locked out: the lockout is not extended by refused tries
                self._fails[key] = (count, since, until)
                return
            if now - since > self.lockout_s or until:  # the window (or an earlier lockout) has passed
                count, since = 0, now
            count += 1
            self._fails[key] = (count, since, now + self.lockout_s if count >= self.limit else 0.0)
            while len(self._fails) > self.max_keys:
                self._fails.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """``address`` signed in: its failures are forgotten and it is known (exempt from the global budget)."""
        key = throttle_key(address)
        with self._lock:
            self._fails.pop(key, None)
            self._known.pop(key, None)
            self._known[key] = time.monotonic()
            while len(self._known) > self.max_keys:
                self._known.popitem(last=False)


#: Sent with every ``/ui`` response, as defence in depth should a value ever reach a page unescaped: the pages
#: need only their one inline stylesheet (allowed by its hash) and inline SVG (no script at all, so none may
#: run), post forms only to themselves and must not be framed (clickjacking of the sign-out and compare forms).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src {pages.STYLE_HASH}; img-src 'self' data:; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


#: Where a ``/ui`` route leaves the ``Set-Cookie`` header of a re-issued session cookie for :class:`SecurityHeaders`
#: to send (the pages return their own responses, which a dependency cannot add a header to).
_REFRESH_STATE = "deltaplane_ui_session_cookie"


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every response under ``/ui`` (pages, redirects, and
    the errors raised before a route runs, such as a 422 for a bad query string), and the re-issued session
    cookie a page's sign-in check left in the request's state (the idle clock moving on)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not is_ui_path(path):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                refresh = scope.get("state", {}).get(_REFRESH_STATE)
                message["headers"] = [
                    *message.get("headers", []),
                    *(h for h in _RAW_HEADERS if h[0] not in have),
                    *(
                        [(b"set-cookie", refresh.encode("latin-1"))]
                        if refresh and b"set-cookie" not in have
                        else []
                    ),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def _set_session_cookie(resp: Response, request: Request, value: str, max_age: int) -> None:
    resp.set_cookie(
        COOKIE,
        value,
        max_age=max(1, max_age),
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def create_ui_router(
    *,
    admin_token: str,
    runs_dir: str | None,
    registry_home: str | None,
    fleet: FleetSource | None = None,
    throttle: LoginThrottle | None = None,
    session_limits: SessionLimits | None = None,
) -> APIRouter:
    """The ``/ui`` routes. ``fleet`` returns the live snapshot (None without a service); ``session_limits`` how
    long a session lasts idle and at most (30 min and 12 h by default)."""
    if len(admin_token) < 16:
        raise ConfigError("the dashboard needs an admin token of at least 16 characters")
    runs = RunsSource(runs_dir)
    registry = RegistryView(registry_home)
    throttle = throttle or LoginThrottle()
    limits = session_limits or SessionLimits()
    revoked = RevokedSessions(
        lambda: registry.registry
    )  # in its database: restarts and other processes see it
    # scrypt of the token under the registry's salt, derived at the first cookie: not the token itself (a
    # captured cookie would let its holder test guesses of the token offline at HMAC speed)
    session_key = SessionKey(admin_token, lambda: registry.registry)
    router = APIRouter(prefix="/ui", include_in_schema=False)

    def signed_in(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            # a bearer token is the admin token itself: guesses count against the sign-in throttle, and a
            # locked-out address gets no verdict on it at all (as on /ui/login and the service's /admin)
            who = _client(request)
            wait, why = throttle.check(who)
            if wait:
                raise _Throttled(wait, why)
            if hmac.compare_digest(auth[7:].strip().encode(), admin_token.encode()):
                throttle.succeeded(who)  # the operator's program: exempt from the global budget
                return
            throttle.failed(who)
        # a session cookie carries an HMAC under a key derived from the admin token: it cannot be guessed, so
        # it is not throttled
        session = read_cookie(session_key, request.cookies.get(COOKIE), limits)
        if session is None or session.id in revoked:
            raise _LoginRequired
        now = int(wall_time())
        if now - session.seen >= limits.refresh_s:  # in use: move its idle clock on (sent by SecurityHeaders)
            carrier = Response()
            value = make_cookie(session_key(), now=now, session=session)
            _set_session_cookie(carrier, request, value, session.ends(limits) - now)
            setattr(request.state, _REFRESH_STATE, carrier.headers["set-cookie"])

    Admin = Depends(signed_in)

    def guarded(render: Callable[[], str]) -> Response:
        """``render()`` as a page; a deltaplane error (or a broken registry database) as an error page saying
        what is wrong. Everything a page reads must be read *inside* ``render``."""
        try:
            return _html(render())
        except NotFound as exc:
            return _html(pages.error_page(404, str(exc)), 404)
        except RegistryUnavailable as exc:
            return _html(pages.error_page(503, str(exc)), 503)
        except DeltaplaneError as exc:
            return _html(pages.error_page(400, str(exc)), 400)

    def model_count_or_error() -> tuple[int, str]:
        """How many models for the overview, or 0 and why (a broken registry must not hide the runs). The first
        page of the registry table is read, not only counted, so a damaged registry shows here too."""
        try:
            return registry.models()[1], ""
        except RegistryUnavailable as exc:
            return 0, str(exc)

    def snapshot() -> Any:
        return fleet() if fleet is not None else None

    @router.get("/login")
    def login_form() -> Response:
        return _html(pages.login_page())

    @router.post("/login")
    async def login(request: Request) -> Response:
        who = _client(request)
        wait, why = throttle.check(who)
        if wait:
            # whole seconds rounded up: rounded down, a client that waited what it was told was refused again
            secs = max(1, math.ceil(wait))
            resp: Response = _html(pages.login_page(f"{why}; try again in {secs} s"), 429)
            resp.headers["Retry-After"] = str(secs)
            return resp
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return _html(pages.login_page("sign-in form too large"), 413)
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        if not hmac.compare_digest(token.encode(), admin_token.encode()):
            throttle.failed(who)
            return _html(pages.login_page("wrong admin token"), 401)
        throttle.succeeded(who)
        key = await run_in_threadpool(session_key)  # the first one runs scrypt: not on the event loop
        resp = RedirectResponse("/ui/", status_code=303)
        _set_session_cookie(resp, request, make_cookie(key), limits.max_s)
        return resp

    @router.post("/logout")
    def logout(request: Request) -> Response:
        # end the session on the server too: a copy of the cookie taken before the sign-out stops working
        session: Session | None = read_cookie(session_key, request.cookies.get(COOKIE), limits)
        resp: Response = RedirectResponse("/ui/login", status_code=303)
        if session is not None:
            try:
                revoked.revoke(session.id, session.ends(limits))
            except (DeltaplaneError, sqlite3.Error) as exc:  # ended in this process only: say so
                resp = _html(
                    pages.error_page(
                        503,
                        f"signed out, but the sign-out could not be saved in the registry ({exc}): a restart of "
                        "the dashboard would accept this session's cookie again until it ends",
                    ),
                    503,
                )
        resp.delete_cookie(COOKIE, path="/ui")
        return resp

    @router.get("/", dependencies=[Admin])
    def home() -> Response:
        def render() -> str:
            listing = runs.listing()
            models, problem = model_count_or_error()
            return pages.home_page(
                listing.rows,
                models,
                snapshot(),
                listing.skipped,
                problem,
                search_notes=listing.notes,
                runs_folder=runs.root is not None,
            )

        return guarded(render)

    @router.get("/runs", dependencies=[Admin])
    def runs_list(page: Page = 1) -> Response:
        def render() -> str:
            listing = runs.listing()
            return pages.runs_page(
                listing.rows,
                listing.skipped,
                page,
                search_notes=listing.notes,
                runs_folder=runs.root is not None,
            )

        return guarded(render)

    @router.get("/run", dependencies=[Admin])
    def run_detail(
        report: Annotated[str, Query(max_length=1024)],
        name: Annotated[str, Query(max_length=256)],
        rounds: Page = 1,
    ) -> Response:
        def render() -> str:
            doc, run = runs.run(RunRef(report, name))
            return pages.run_page(report, doc, run, rounds)

        return guarded(render)

    @router.get("/compare", dependencies=[Admin])
    def compare(run: Annotated[list[str], Query(max_length=1300)] = []) -> Response:  # noqa: B006
        def render() -> str:
            if len(run) != 2:
                raise ConfigError(f"tick exactly two runs to compare (got {len(run)})")
            pair = []
            for key in run:
                report, sep, name = key.partition("::")
                if not sep:
                    raise ConfigError(f"run {key!r} is not of the form REPORT::NAME")
                pair.append((key, runs.run(RunRef(report, name))[1]))
            return pages.compare_page(pair[0], pair[1])

        return guarded(render)

    @router.get("/registry", dependencies=[Admin])
    def registry_list(page: Page = 1) -> Response:
        return guarded(
            lambda: pages.registry_page(
                *registry.models(page=page), registry_home, page, exists=registry.exists
            )
        )

    @router.get("/registry/{model}", dependencies=[Admin])
    def model_detail(model: str, page: Page = 1, history: Page = 1, decisions: Page = 1) -> Response:
        return guarded(
            lambda: pages.model_page(
                registry.model(model, page=page), page=page, history=history, decisions=decisions
            )
        )

    @router.get("/fleet", dependencies=[Admin])
    def fleet_view() -> Response:
        return guarded(lambda: pages.fleet_page(snapshot()))

    return router


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def is_ui_path(path: str) -> bool:
    """Whether ``path`` is one of the dashboard's (HTML) pages, under ``/ui``."""
    return path == "/ui" or path.startswith("/ui/")


def validation_page(exc: RequestValidationError) -> Response:
    """A dashboard page's 422 for a request FastAPI refused before the route ran (``?page=0``, a missing
    ``report=``): an HTML error page naming each wrong parameter and what is wrong with it, not FastAPI's JSON.

    The caller counts the refusal (``deltaplane serve`` in ``rejected.validation``, as for its JSON routes).
    """
    problems = []
    for e in exc.errors()[:5]:
        loc = [str(p) for p in e.get("loc", ())]
        where, name = (loc[0], ".".join(loc[1:])) if len(loc) > 1 else ("request", ".".join(loc))
        what = f"{where} parameter {name!r}" if where in ("query", "path") else f"{where} {name!r}"
        got = f" (got {e['input']!r})" if isinstance(e.get("input"), str | int | float) else ""
        problems.append(f"{what}: {e.get('msg', 'invalid')}{got}")
    return _html(pages.error_page(422, "invalid request: " + "; ".join(problems)), 422)


def install_login_redirect(app: Any) -> None:
    """Send a browser without a session to the sign-in page instead of a bare 401."""

    @app.exception_handler(_LoginRequired)
    async def _to_login(request: Request, exc: _LoginRequired) -> Response:
        if request.method == "GET":
            return RedirectResponse("/ui/login", status_code=303)
        return _html(pages.login_page("sign in first"), 401)

    @app.exception_handler(_Throttled)
    async def _throttled(request: Request, exc: _Throttled) -> Response:
        secs = max(1, math.ceil(exc.wait))  # rounded up, as the sign-in's
        resp = _html(pages.error_page(429, f"{exc.why}; try again in {secs} s"), 429)
        resp.headers["Retry-After"] = str(secs)
        return resp
