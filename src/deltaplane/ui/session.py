"""Admin sessions for the dashboard: a browser signs in once with the admin token and gets a short-lived cookie.

A browser cannot attach ``Authorization: Bearer`` to a link it follows, so the dashboard trades the admin token
(posted once to ``/ui/login``) for a cookie ``v2.issued.seen.id.HMAC-SHA256(K, "deltaplane-ui|v2" | issued |
seen | id)``: when the session began, when it was last used (both Unix seconds) and a random session id. The
cookie never contains the token, is ``HttpOnly`` and ``SameSite=Strict`` (no cross-site request carries it),
``Secure`` when served over TLS, and scoped to ``/ui``. A session ends after :data:`SESSION_IDLE_SECONDS` unused
(30 min) and :data:`SESSION_MAX_SECONDS` after sign-in however busy (12 h); both are options of the dashboard.
Each request re-issues the cookie with a new ``seen`` (at most once a minute), so the idle clock is in the
signed cookie and every dashboard process on the registry applies it the same, with no server-side state per
session. Signing out revokes the session id on the server (:class:`RevokedSessions`, until the session's
absolute end), so neither the cookie nor any earlier or later re-issue of it works again. With a registry
(``deltaplane serve``, ``deltaplane ui --home``) the revocation is kept in its database, survives a restart and
holds in every dashboard process on that registry (``serve`` and ``ui`` with one admin token accept the same
cookie). The random id makes each sign-in's session distinct, so revoking one never ends another browser's
session. Cookies of the earlier format (``expiry.nonce.mac``, no idle time) are refused: their users sign in
again. Programs may still send the bearer token directly.

The MAC key ``K`` is :class:`SessionKey`: ``scrypt(admin token, salt)`` with a random per-registry salt kept in
the registry's database. The key used to be the admin token itself, so one captured cookie (a shared browser
profile, a proxy log, a backup) let anyone test guesses of the token offline at HMAC speed, billions a second
on a GPU, and a recovered token also opens the service's ``/admin`` API. Now each guess costs one scrypt
(memory-hard: 32 MiB and ~70 ms on a CPU) and needs the salt, which is in the registry, not in the cookie.
Why scrypt of the token rather than a random key stored in the registry: the key still depends on the token,
so rotating the admin token ends every session (as before), and reading the registry's database (its salt,
its revocations) is not enough to forge a cookie, which a stored random key would be (the database is not
encrypted: the registry's KEK wraps blobs only). The key is derived once per process (at its first sign-in or
cookie check), never per request. Without a registry (``deltaplane ui`` without ``--home``, or before the
registry exists or while it cannot be read) the salt is random per process: sessions then end when the process
does. Cookies made before this change do not verify: their users sign in again.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deltaplane.errors import ConfigError, DeltaplaneError

if TYPE_CHECKING:
    from deltaplane.registry import Registry

__all__ = [
    "COOKIE",
    "SESSION_IDLE_SECONDS",
    "SESSION_MAX_SECONDS",
    "RevokedSessions",
    "Session",
    "SessionKey",
    "SessionLimits",
    "make_cookie",
    "read_cookie",
]

COOKIE = "deltaplane_ui"
#: A session unused this long ends (``deltaplane ui --session-idle-minutes``).
SESSION_IDLE_SECONDS = 30 * 60
#: A session ends this long after its sign-in, however busy (``deltaplane ui --session-max-hours``).
SESSION_MAX_SECONDS = 12 * 3600
_VERSION = "v2"

#: scrypt's cost for the cookie key (RFC 7914; n=2**15, r=8: 32 MiB and ~70 ms once per process): every offline
#: guess of the admin token from a captured cookie costs as much.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024  # hashlib's default (32 MiB) is just under what n=2**15, r=8 needs
_SALT_BYTES = 32
_SETTINGS = "CREATE TABLE IF NOT EXISTS ui_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)"


def derive_session_key(admin_token: str, salt: bytes) -> bytes:
    """The 32-byte cookie MAC key for ``admin_token`` under ``salt``: scrypt, so guessing the token is slow."""
    return hashlib.scrypt(
        admin_token.encode(),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
        dklen=32,
    )


class SessionKey:
    """The cookie MAC key of one dashboard process: :func:`derive_session_key` of the admin token and a salt.

    With a registry (``registry`` returns it, or None while there is none) the salt is random, made on first use
    and kept in its database (table ``ui_settings``), so every process on that registry (``serve``, ``ui``, a
    restart) derives the same key and accepts the same cookies; its key is derived once and kept. While no
    registry answers (none configured, not created yet, unreadable) a random per-process salt stands in: cookies
    signed then end when the process does, or when the registry answers (the user signs in again). Calling it
    is cheap after the first time: nothing is derived per request.
    """

    def __init__(self, admin_token: str, registry: Callable[[], Registry | None] | None = None) -> None:
        self._token = admin_token
        self._registry = registry
        self._lock = threading.Lock()
        self._shared: bytes | None = None  # from the registry's salt: final
        self._local: bytes | None = None  # from a per-process salt, while no registry answers

    def __call__(self) -> bytes:
        if self._shared is not None:
            return self._shared
        with self._lock:  # one derivation, however many requests arrive together
            if self._shared is None:
                salt = self._registry_salt()
                if salt is not None:
                    self._shared = derive_session_key(self._token, salt)
                    return self._shared
                if self._local is None:
                    self._local = derive_session_key(self._token, secrets.token_bytes(_SALT_BYTES))
                return self._local
            return self._shared

    def _registry_salt(self) -> bytes | None:
        """The registry's salt, made now if it has none; None without a registry or when it cannot be read."""
        reg = self._registry() if self._registry is not None else None
        if reg is None:
            return None
        with contextlib.suppress(DeltaplaneError, sqlite3.Error, ValueError):
            try:  # read first: a read-only registry that already has its salt must still give it
                rows = reg.query("SELECT value FROM ui_settings WHERE name = 'session_salt'")
            except sqlite3.OperationalError:  # no table yet
                rows = []
            if not rows:
                with reg.transaction() as con:
                    con.execute(_SETTINGS)
                    # INSERT OR IGNORE then read: two processes starting together agree on the first one written
                    con.execute(
                        "INSERT OR IGNORE INTO ui_settings (name, value) VALUES ('session_salt', ?)",
                        (secrets.token_hex(_SALT_BYTES),),
                    )
                    rows = con.execute("SELECT value FROM ui_settings WHERE name = 'session_salt'").fetchall()
            salt = bytes.fromhex(str(rows[0][0]))
            if len(salt) >= 16:  # anything shorter was not written here: ignore it rather than trust it
                return salt
        return None


@dataclass(frozen=True)
class SessionLimits:
    """How long a dashboard session lasts: ``idle_s`` unused, ``max_s`` from its sign-in at most."""

    idle_s: int = SESSION_IDLE_SECONDS
    max_s: int = SESSION_MAX_SECONDS

    def __post_init__(self) -> None:
        if self.idle_s < 60:
            raise ConfigError(f"the session idle timeout must be at least 1 minute (got {self.idle_s} s)")
        if self.max_s < 60:
            raise ConfigError(f"the session lifetime must be at least 1 minute (got {self.max_s} s)")

    @property
    def refresh_s(self) -> int:
        """How old ``seen`` may be before a request re-issues the cookie: often enough to keep a session in use
        alive, rarely enough not to send a cookie with every response."""
        return min(60, self.idle_s // 10)


@dataclass(frozen=True)
class Session:
    """A verified session cookie: its random ``id``, and when it was ``issued`` and last ``seen`` (Unix s)."""

    id: str
    issued: int
    seen: int

    def ends(self, limits: SessionLimits) -> int:
        """When the session ends for good (Unix s): its sign-in plus the absolute lifetime."""
        return self.issued + limits.max_s


def _mac(key: bytes, issued: int, seen: int, session_id: str) -> str:
    return hmac.new(
        key, f"deltaplane-ui|{_VERSION}|{issued}|{seen}|{session_id}".encode(), hashlib.sha256
    ).hexdigest()


def make_cookie(key: bytes, *, now: float | None = None, session: Session | None = None) -> str:
    """A session cookie value signed with ``key`` (a :class:`SessionKey`'s): a new session from ``now``, or
    ``session`` re-issued as seen at ``now`` (same id and sign-in time)."""
    at = int(time.time() if now is None else now)
    session_id, issued = (session.id, session.issued) if session else (secrets.token_urlsafe(16), at)
    return f"{_VERSION}.{issued}.{at}.{session_id}.{_mac(key, issued, at, session_id)}"


def read_cookie(
    key: Callable[[], bytes], value: str | None, limits: SessionLimits, *, now: float | None = None
) -> Session | None:
    """The session of a cookie made by :func:`make_cookie` with ``key()`` that is neither idle for longer than
    ``limits.idle_s`` nor older than ``limits.max_s``, else None (a cookie of the earlier format included).

    ``key`` is called only for a well-formed, live cookie: a request without one derives nothing.
    """
    if not value or len(value) > 200 or not value.isascii():  # compare_digest raises on non-ASCII text
        return None
    parts = value.split(".")
    if len(parts) != 5 or parts[0] != _VERSION:
        return None
    _, issued_text, seen_text, session_id, mac = parts
    if not all(t.isdigit() and len(t) <= 12 for t in (issued_text, seen_text)) or not session_id:
        return None
    issued, seen = int(issued_text), int(seen_text)
    at = time.time() if now is None else now
    if seen < issued or at - seen > limits.idle_s or at - issued > limits.max_s:
        return None
    if not hmac.compare_digest(_mac(key(), issued, seen, session_id), mac):
        return None
    return Session(session_id, issued, seen)


_SCHEMA = """CREATE TABLE IF NOT EXISTS ui_revoked_sessions (
    digest TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, at REAL NOT NULL)"""


def _digest(value: str) -> str:
    # the store keeps a hash of the session id, not the id: a copy of the database helps forge nothing
    return hashlib.sha256(value.encode()).hexdigest()


class RevokedSessions:
    """Sessions signed out before they ended, remembered (by session id) until they would have ended.

    Only a valid cookie's session can be revoked (it takes the admin token to make one), so the set holds at
    most the sessions actually signed out within one session lifetime; ended entries are dropped as new ones
    come in. With ``registry`` (a callable returning the dashboard's registry, or None while there is none) the
    revocations are also written to a table of its database (SHA-256 of the session id and its end, as the
    service keeps its token revocations) and looked up there on every check, so neither a restart nor another
    dashboard process on the same registry accepts a signed-out cookie. Without a registry they are held in
    memory, which the session lifetime bounds.
    """

    def __init__(self, registry: Callable[[], Registry | None] | None = None) -> None:
        self._until: dict[str, int] = {}  # digest -> expiry
        self._lock = threading.Lock()
        self._registry = registry

    def _store(self) -> Registry | None:
        reg = self._registry() if self._registry is not None else None
        if reg is not None:
            with reg.transaction() as con:
                con.execute(_SCHEMA)
        return reg

    def _stored(self, digest: str) -> bool:
        """Whether the registry holds a revocation of ``digest`` (by this process or any other on it).

        Asked on every check, not read once: ``deltaplane serve`` and ``deltaplane ui`` on one registry with
        one admin token accept the same cookie, and a sign-out in one must end it in the other at once. A
        primary-key lookup, read-only (a registry without the table yet raises ``sqlite3.OperationalError``:
        nothing was revoked there).
        """
        reg = self._registry() if self._registry is not None else None
        return reg is not None and bool(
            reg.query("SELECT 1 FROM ui_revoked_sessions WHERE digest = ?", (digest,))
        )

    def revoke(self, value: str, expiry: int) -> None:
        """Revoke session id ``value`` until ``expiry``; stored before this returns when there is a registry.

        Raises:
            sqlite3.Error or a registry error: the revocation could not be stored (it holds in this process).
        """
        digest = _digest(value)
        with self._lock:
            now = time.time()
            for old in [v for v, until in self._until.items() if until < now]:
                del self._until[old]
            self._until[digest] = expiry
            reg = self._store()
            if reg is not None:
                with reg.transaction() as con:
                    con.execute("DELETE FROM ui_revoked_sessions WHERE expires_at < ?", (now,))
                    con.execute(
                        "INSERT OR REPLACE INTO ui_revoked_sessions (digest, expires_at, at) VALUES (?,?,?)",
                        (digest, expiry, now),
                    )

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        digest = _digest(value)
        with self._lock:
            if digest in self._until:
                return True
        # a registry that cannot be read (its pages say so): this process's revocations, and a retry next time
        with contextlib.suppress(DeltaplaneError, sqlite3.Error):
            return self._stored(digest)
        return False
