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
from collections import OrderedDict
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
    """Token bucket per key: ``rate`` requests per second on average, bursts up to ``burst``.

    At most ``max_keys`` buckets are kept (least recently used dropped first), so a flood of distinct keys —
    device ids or client addresses — cannot grow memory without bound; a dropped key starts again full.
    """

    def __init__(self, *, rate: float, burst: int, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ConfigError(f"rate must be positive and burst at least 1. Found rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _refill(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.rate)

    def acquire(self, key: str) -> float:
        """0.0 if the request may proceed (spending one token), else the seconds to wait before retrying."""
        now = time.monotonic()
        with self._lock:
            tokens = self._refill(key, now)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0 if tokens >= 1.0 else tokens, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait

    def wait(self, key: str) -> float:
        """Like :meth:`acquire` but spends nothing: 0.0 while ``key`` has a token left."""
        with self._lock:
            if key not in self._buckets:
                return 0.0
            tokens = self._refill(key, time.monotonic())
            return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
