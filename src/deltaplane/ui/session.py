"""Admin sessions for the dashboard: a browser signs in once with the admin token and gets a short-lived cookie.

A browser cannot attach ``Authorization: Bearer`` to a link it follows, so the dashboard trades the admin token
(posted once to ``/ui/login``) for a cookie ``expiry.nonce.HMAC-SHA256(admin_token, "deltaplane-ui" | expiry |
nonce)``. The cookie never contains the token, is ``HttpOnly`` and ``SameSite=Strict`` (no cross-site request
carries it), ``Secure`` when served over TLS, scoped to ``/ui``, and dies after :data:`SESSION_SECONDS`;
rotating the admin token ends every session. Signing out revokes that one cookie on the server
(:class:`RevokedSessions`, until the cookie would have expired anyway), so a copy of it taken before the sign-out
no longer works. With a registry (``deltaplane serve``, ``deltaplane ui --home``) the revocation is kept in its
database, survives a restart and holds in every dashboard process on that registry (``serve`` and ``ui`` with
one admin token accept the same cookie): held in memory only, a restart with the same admin token made a
signed-out cookie valid again for the rest of its 8 hours. The random nonce makes each sign-in's cookie distinct, so
revoking one never ends another browser's session. Programs may still send the bearer token directly.
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

__all__ = ["COOKIE", "SESSION_SECONDS", "RevokedSessions", "check_cookie", "make_cookie"]

COOKIE = "deltaplane_ui"
SESSION_SECONDS = 8 * 3600


def _mac(admin_token: str, expiry: int, nonce: str) -> str:
    return hmac.new(
        admin_token.encode(), f"deltaplane-ui|{expiry}|{nonce}".encode(), hashlib.sha256
    ).hexdigest()


def make_cookie(admin_token: str, *, now: float | None = None) -> str:
    """A fresh session cookie value valid for :data:`SESSION_SECONDS` from ``now``."""
    expiry = int((time.time() if now is None else now) + SESSION_SECONDS)
    nonce = secrets.token_urlsafe(16)
    return f"{expiry}.{nonce}.{_mac(admin_token, expiry, nonce)}"


def cookie_expiry(admin_token: str, value: str | None, *, now: float | None = None) -> int | None:
    """The expiry of an unexpired cookie made by :func:`make_cookie` with this admin token, else None."""
    if not value or len(value) > 160:
        return None
    expiry_text, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    if not expiry_text.isdigit() or len(expiry_text) > 12 or not nonce:
        return None
    expiry = int(expiry_text)
    if expiry < (time.time() if now is None else now):
        return None
    return expiry if hmac.compare_digest(_mac(admin_token, expiry, nonce), mac) else None


def check_cookie(admin_token: str, value: str | None, *, now: float | None = None) -> bool:
    """True for an unexpired cookie made by :func:`make_cookie` with this admin token."""
    return cookie_expiry(admin_token, value, now=now) is not None


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
