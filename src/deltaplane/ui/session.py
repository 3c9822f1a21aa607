"""Admin sessions for the dashboard: a browser signs in once with the admin token and gets a short-lived cookie.

A browser cannot attach ``Authorization: Bearer`` to a link it follows, so the dashboard trades the admin token
(posted once to ``/ui/login``) for a cookie ``expiry.nonce.HMAC-SHA256(admin_token, "deltaplane-ui" | expiry |
nonce)``. The cookie never contains the token, is ``HttpOnly`` and ``SameSite=Strict`` (no cross-site request
carries it), ``Secure`` when served over TLS, scoped to ``/ui``, and dies after :data:`SESSION_SECONDS`;
rotating the admin token ends every session. Signing out revokes that one cookie on the server
(:class:`RevokedSessions`, kept in the process until the cookie would have expired anyway), so a copy of it
taken before the sign-out no longer works. The random nonce makes each sign-in's cookie distinct, so revoking
one never ends another browser's session. Programs may still send the bearer token directly.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

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


class RevokedSessions:
    """Cookies signed out before they expired, remembered until they would have expired.

    Only a valid cookie can be revoked (it takes the admin token to make one), so the set holds at most the
    sessions actually signed out in the last :data:`SESSION_SECONDS`; expired entries are dropped as new ones
    come in. Held in memory: a restart forgets it, which :data:`SESSION_SECONDS` bounds.
    """

    def __init__(self) -> None:
        self._until: dict[str, int] = {}
        self._lock = threading.Lock()

    def revoke(self, value: str, expiry: int) -> None:
        with self._lock:
            now = time.time()
            for old in [v for v, until in self._until.items() if until < now]:
                del self._until[old]
            self._until[value] = expiry

    def __contains__(self, value: object) -> bool:
        with self._lock:
            return value in self._until
