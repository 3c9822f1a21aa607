"""Admin sessions for the dashboard: a browser signs in once with the admin token and gets a short-lived cookie.

A browser cannot attach ``Authorization: Bearer`` to a link it follows, so the dashboard trades the admin token
(posted once to ``/ui/login``) for a cookie ``expiry.HMAC-SHA256(admin_token, "deltaplane-ui" | expiry)``. The
cookie never contains the token, is ``HttpOnly`` and ``SameSite=Strict`` (no cross-site request carries it),
``Secure`` when served over TLS, scoped to ``/ui``, and dies after :data:`SESSION_SECONDS`; rotating the admin
token ends every session. Programs may still send the bearer token directly.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["COOKIE", "SESSION_SECONDS", "check_cookie", "make_cookie"]

COOKIE = "deltaplane_ui"
SESSION_SECONDS = 8 * 3600


def _mac(admin_token: str, expiry: int) -> str:
    return hmac.new(admin_token.encode(), f"deltaplane-ui|{expiry}".encode(), hashlib.sha256).hexdigest()


def make_cookie(admin_token: str, *, now: float | None = None) -> str:
    """A session cookie value valid for :data:`SESSION_SECONDS` from ``now``."""
    expiry = int((time.time() if now is None else now) + SESSION_SECONDS)
    return f"{expiry}.{_mac(admin_token, expiry)}"


def check_cookie(admin_token: str, value: str | None, *, now: float | None = None) -> bool:
    """True for an unexpired cookie made by :func:`make_cookie` with this admin token."""
    if not value or len(value) > 128:
        return False
    expiry_text, _, mac = value.partition(".")
    if not expiry_text.isdigit() or len(expiry_text) > 12:
        return False
    expiry = int(expiry_text)
    if expiry < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(_mac(admin_token, expiry), mac)
