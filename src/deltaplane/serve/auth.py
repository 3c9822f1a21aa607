"""Device tokens and per-device rate limiting for the service.

Device tokens are stateless: ``base64url({"d": device_id, "c": cohort}) "." base64url(HMAC-SHA256(secret, …))``,
so the service can authenticate any number of devices without a token table, and a device cannot change
its id or cohort without invalidating the MAC. Admin endpoints use a separate static token; a device token
never passes as an admin token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass

from deltaplane.errors import ConfigError

__all__ = ["DeviceIdentity", "RateLimiter", "TokenAuthority"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    cohort: str


class TokenAuthority:
    """Issues and checks HMAC-signed device tokens."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError(f"device token secret must be at least 16 bytes. Found {len(secret)}")
        self._secret = secret

    def issue(self, device_id: str, cohort: str = "default") -> str:
        body = _b64(json.dumps({"d": device_id, "c": cohort}, separators=(",", ":")).encode())
        return body + "." + _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())

    def check(self, token: str) -> DeviceIdentity | None:
        """The identity in a valid token, or None for anything forged, truncated or malformed."""
        body, _, mac = (token or "").partition(".")
        if not body or not mac or len(token) > 4096:
            return None
        try:
            expected = _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())
            if not hmac.compare_digest(expected, mac):
                return None
            doc = json.loads(_unb64(body))
            return DeviceIdentity(str(doc["d"]), str(doc["c"]))
        except (ValueError, KeyError, TypeError, UnicodeError):
            return None


class RateLimiter:
    """Token bucket per key: ``rate`` requests per second on average, bursts up to ``burst``."""

    def __init__(self, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ConfigError(f"rate must be positive and burst at least 1. Found rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0.0 if the request may proceed, else the seconds to wait before retrying."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
