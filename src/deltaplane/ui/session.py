"""Admin sessions for the dashboard: a browser signs in once with the admin token and gets a short-lived cookie.

A browser cannot attach ``Authorization: Bearer`` to a link it follows, so the dashboard trades the admin token
(posted once to ``/ui/login``) for a cookie ``expiry.nonce.HMAC-SHA256(K, "deltaplane-ui" | expiry | nonce)``.
The cookie never contains the token, is ``HttpOnly`` and ``SameSite=Strict`` (no cross-site request carries
it), ``Secure`` when served over TLS, scoped to ``/ui``, and dies after :data:`SESSION_SECONDS`. Signing out
revokes that one cookie on the server (:class:`RevokedSessions`, until the cookie would have expired anyway), so
a copy of it taken before the sign-out no longer works. With a registry (``deltaplane serve``, ``deltaplane ui
--home``) the revocation is kept in its database, survives a restart and holds in every dashboard process on
that registry (``serve`` and ``ui`` with one admin token accept the same cookie): held in memory only, a restart
with the same admin token made a signed-out cookie valid again for the rest of its 8 hours. The random nonce
makes each sign-in's cookie distinct, so revoking one never ends another browser's session. Programs may still
send the bearer token directly.

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
from typing import TYPE_CHECKING

from deltaplane.errors import DeltaplaneError

if TYPE_CHECKING:
    from deltaplane.registry import Registry

__all__ = ["COOKIE", "SESSION_SECONDS", "RevokedSessions", "SessionKey", "check_cookie", "make_cookie"]

COOKIE = "deltaplane_ui"
SESSION_SECONDS = 8 * 3600

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


def _mac(key: bytes, expiry: int, nonce: str) -> str:
    return hmac.new(key, f"deltaplane-ui|{expiry}|{nonce}".encode(), hashlib.sha256).hexdigest()


def make_cookie(key: bytes, *, now: float | None = None) -> str:
    """A fresh session cookie value valid for :data:`SESSION_SECONDS` from ``now``, signed with ``key`` (a
    :class:`SessionKey`'s)."""
    expiry = int((time.time() if now is None else now) + SESSION_SECONDS)
    nonce = secrets.token_urlsafe(16)
    return f"{expiry}.{nonce}.{_mac(key, expiry, nonce)}"


def cookie_expiry(key: Callable[[], bytes], value: str | None, *, now: float | None = None) -> int | None:
    """The expiry of an unexpired cookie made by :func:`make_cookie` with ``key()``, else None.

    ``key`` is called only for a well-formed, unexpired cookie: a request without one derives nothing.
    """
    if not value or len(value) > 160 or not value.isascii():  # compare_digest raises on non-ASCII text
        return None
    expiry_text, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    if not expiry_text.isdigit() or len(expiry_text) > 12 or not nonce:
        return None
    expiry = int(expiry_text)
    if expiry < (time.time() if now is None else now):
        return None
    return expiry if hmac.compare_digest(_mac(key(), expiry, nonce), mac) else None


def check_cookie(key: Callable[[], bytes], value: str | None, *, now: float | None = None) -> bool:
    """True for an unexpired cookie made by :func:`make_cookie` with ``key()``."""
    return cookie_expiry(key, value, now=now) is not None


_SCHEMA = """CREATE TABLE IF NOT EXISTS ui_revoked_sessions (
    digest TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, at REAL NOT NULL)"""


def _digest(value: str) -> str:
    # the store keeps a hash, not the cookie: a copy of the database gives no cookie to present
    return hashlib.sha256(value.encode()).hexdigest()


class RevokedSessions:
    """Cookies signed out before they expired, remembered until they would have expired.

    Only a valid cookie can be revoked (it takes the admin token to make one), so the set holds at most the
    sessions actually signed out in the last :data:`SESSION_SECONDS`; expired entries are dropped as new ones
    come in. With ``registry`` (a callable returning the dashboard's registry, or None while there is none) the
    revocations are also written to a table of its database (SHA-256 of the cookie and its expiry, as the
    service keeps its token revocations) and looked up there on every check, so neither a restart nor another
    dashboard process on the same registry accepts a signed-out cookie. Without a registry they are held in memory, which :data:`SESSION_SECONDS` bounds.
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
        """Revoke ``value`` until ``expiry``; stored before this returns when there is a registry.

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
