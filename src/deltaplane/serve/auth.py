"""Device tokens (with expiry and revocation) and per-key rate limiting for the service.

Device tokens are stateless: ``base64url({"v": 2, "a": audience, "d": device_id, "c": cohort, "j": token_id,
"i": issued, "e": expires}) "." base64url(HMAC-SHA256(secret, …))``, so the service can authenticate any number
of devices without a token table, and a device cannot change its id, cohort, audience or expiry without
invalidating the MAC. A token past its expiry, a revoked token id, or any token of a device revoked after it
was issued is refused; the revocation list is small (only revoked ids) and kept in the registry database so it
survives restarts. Admin endpoints use a separate static token; a device token never passes as an admin token.

The audience is the issuing service's id (:meth:`deltaplane.serve.service_store.ServiceStore.audience`, random
per registry and kept in its database): two services given the same secret would otherwise accept each
other's tokens, a token revoked at one included, revocations being kept per registry. Tokens of format 1 (no
audience) are refused with a message asking the device to re-enroll.

A token may also name the models it is for (``"m"``: a list of model names, set when the admin issues it with
``models``); the service then refuses it, 403, on every ``/v1/models/<other>/…`` route. A token without ``"m"``
(every token issued before model scopes existed, and any issued without ``models``) reaches every model of the
service, as before: the field is optional so that enrolled fleets keep working.

The HMAC secret is, in order: the configured one, else ``<home>/keys/device-secret`` (created 0600 on first
start), so tokens survive a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaplane.errors import ConfigError
from deltaplane.registry.signing import write_secret_file

__all__ = [
    "DeviceIdentity",
    "IssuedToken",
    "RateLimiter",
    "TokenAuthority",
    "device_secret",
    "unverified_claims",
]

SECRET_NAME = "device-secret"
#: the format of issued tokens: 2 binds the token to a service (``"a"``); 1 (no ``"v"``) did not
TOKEN_FORMAT = 2
_ENROLL = "ask this service's admin for a new one (POST /admin/devices)"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def device_secret(home: str | os.PathLike[str]) -> bytes:
    """The service's persistent device-token key: ``<home>/keys/device-secret``, created (0600) when absent."""
    path = Path(home) / "keys" / SECRET_NAME
    if not path.exists():
        try:
            write_secret_file(path.with_suffix(".new"), secrets.token_bytes(32))
            os.link(path.with_suffix(".new"), path)  # atomic create-if-absent: two starting servers agree
        except FileExistsError:
            pass
        finally:
            path.with_suffix(".new").unlink(missing_ok=True)
    from deltaplane.textfile import KEY_LIMIT, read_bounded_bytes

    data = read_bounded_bytes(path, limit=KEY_LIMIT, what="device secret")  # a FIFO would block the start
    if len(data) < 16:
        raise ConfigError(f"{path} holds {len(data)} bytes; a device secret needs at least 16")
    return data


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    cohort: str
    token_id: str = ""
    issued_at: float = 0.0
    expires_at: float = 0.0
    #: the models this token may act on; None: every model of the service (unscoped, as tokens were before)
    models: tuple[str, ...] | None = None

    def may_use(self, model: str) -> bool:
        """Whether this token may act on ``model`` (its scope names it, or it has no scope)."""
        return self.models is None or model in self.models


@dataclass(frozen=True)
class IssuedToken:
    """A new device token and what it carries (``token_id`` is what :meth:`TokenAuthority.revoke` takes)."""

    token: str
    token_id: str
    device_id: str
    cohort: str
    expires_at: float
    models: tuple[str, ...] | None = None


def unverified_claims(token: str) -> DeviceIdentity | None:
    """What a device token says (device, cohort, model scope, times), read without its MAC; None when it is not a
    token of the current format.

    For its holder's bookkeeping only, never to authorize anything: ``fleet enroll --add`` reads the scope and
    cohort of the fleet's tokens in its folder so the devices it adds get the same ones. The service checks a
    token with :meth:`TokenAuthority.verify`."""
    body, _, mac = token.strip().partition(".")
    if not body or not mac or len(token) > 4096:
        return None
    try:
        doc = json.loads(_unb64(body))
        if not isinstance(doc, dict) or doc.get("v") != TOKEN_FORMAT:
            return None
        return _identity(doc)
    except (ValueError, KeyError, TypeError, UnicodeError):
        return None


def _identity(doc: dict[str, Any]) -> DeviceIdentity | None:
    """The identity a token's decoded body names; None when its model scope is no list of names. A missing or
    mistyped field raises KeyError, ValueError or TypeError (the callers refuse such a token)."""
    scope = doc.get("m")
    if scope is not None and (not isinstance(scope, list) or not all(isinstance(m, str) for m in scope)):
        return None
    return DeviceIdentity(
        str(doc["d"]),
        str(doc["c"]),
        str(doc["j"]),
        float(doc["i"]),
        float(doc["e"]),
        None if scope is None else tuple(scope),
    )


class TokenAuthority:
    """Issues and checks HMAC-signed, expiring, revocable device tokens.

    Args:
        secret: HMAC key (at least 16 bytes).
        audience: the service's id; issued tokens carry it and only tokens carrying it are accepted.
        ttl_s: default lifetime of issued tokens.
        revoked_ids: token ids revoked so far; revoked_devices: device id -> time before which every token
            of that device is revoked (both loaded from the registry database at start).
    """

    def __init__(
        self,
        secret: bytes,
        *,
        audience: str,
        ttl_s: float = 30 * 86400,
        revoked_ids: set[str] | None = None,
        revoked_devices: dict[str, float] | None = None,
    ) -> None:
        if len(secret) < 16:
            raise ConfigError(f"device token secret must be at least 16 bytes. Found {len(secret)}")
        if ttl_s <= 0:
            raise ConfigError(f"token ttl must be positive. Found {ttl_s}")
        if not audience:
            raise ConfigError("a token authority needs a non-empty audience (the service's id)")
        self._secret = secret
        self.audience = audience
        self.ttl_s = ttl_s
        self.revoked_ids = set(revoked_ids or ())
        self.revoked_devices = dict(revoked_devices or {})

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())

    def issue_token(
        self,
        device_id: str,
        cohort: str = "default",
        *,
        ttl_s: float | None = None,
        models: tuple[str, ...] | None = None,
    ) -> IssuedToken:
        """A new token for ``device_id`` in ``cohort``, valid for ``ttl_s`` seconds (default: the authority's).

        ``models`` scopes it to those models (the service refuses it on any other); None leaves it unscoped.
        """
        if models is not None and not models:
            raise ConfigError("a token scoped to no model could do nothing: name at least one, or give none")
        now = time.time()
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ConfigError(f"token ttl must be positive. Found {ttl}")
        tid = _b64(secrets.token_bytes(12))
        expires = round(now + ttl, 3)
        # "i" unrounded: rounded to the millisecond it could land after a device revocation made just after
        # issuing, and the token would escape it (revoke_device compares issued_at <= revocation time)
        doc = {
            "v": TOKEN_FORMAT,
            "a": self.audience,
            "d": device_id,
            "c": cohort,
            "j": tid,
            "i": now,
            "e": expires,
        }
        if models is not None:  # absent, not null, when unscoped: such a token is the same as before scopes
            doc["m"] = sorted(set(models))
        body = _b64(json.dumps(doc, separators=(",", ":")).encode())
        scope = None if models is None else tuple(sorted(set(models)))
        return IssuedToken(body + "." + self._mac(body), tid, device_id, cohort, expires, scope)

    def issue(self, device_id: str, cohort: str = "default", *, ttl_s: float | None = None) -> str:
        """Just the token text of :meth:`issue_token`."""
        return self.issue_token(device_id, cohort, ttl_s=ttl_s).token

    def check(self, token: str) -> DeviceIdentity | None:
        """The identity in a valid token, or None for anything forged, malformed, expired or revoked."""
        found = self.verify(token)
        return found if isinstance(found, DeviceIdentity) else None

    def verify(self, token: str) -> DeviceIdentity | str:
        """The identity in a valid token, or why it is refused: a message for the device, "" when it says nothing.

        Only a token with a valid MAC gets a reason (it was issued with this secret, so telling its holder that
        it is of another service or an old format helps them and tells a guesser nothing); anything forged or
        malformed gets "".
        """
        body, _, mac = (token or "").partition(".")
        if not body or not mac or len(token) > 4096:
            return ""
        try:
            if not hmac.compare_digest(self._mac(body), mac):
                return ""
            doc = json.loads(_unb64(body))
            if not isinstance(doc, dict):
                return ""
            if doc.get("v") != TOKEN_FORMAT:
                return (
                    f"this device token is of format {doc.get('v', 1)}, which names no service and is no longer "
                    f"accepted (format {TOKEN_FORMAT} is); re-enroll the device: {_ENROLL}"
                )
            found = _identity(doc)
            if found is None:
                return ""
            ident = found
            audience = str(doc["a"])
        except (ValueError, KeyError, TypeError, UnicodeError):
            return ""
        if audience != self.audience:  # not a secret: a plain comparison
            return (
                f"this device token was issued by another deltaplane service (audience {audience[:40]!r}, this "
                f"service is {self.audience!r}), which shares this one's device secret; {_ENROLL}"
            )
        if ident.expires_at <= time.time() or ident.token_id in self.revoked_ids:
            return ""
        if ident.issued_at <= self.revoked_devices.get(ident.device_id, -1.0):
            return ""
        return ident

    def revoke(self, token_id: str) -> None:
        self.revoked_ids.add(token_id)

    def revoke_device(self, device_id: str, before: float | None = None) -> float:
        """Revoke every token of ``device_id`` issued up to ``before`` (now); returns that time."""
        t = time.time() if before is None else before
        self.revoked_devices[device_id] = max(t, self.revoked_devices.get(device_id, -1.0))
        return t


class RateLimiter:
    """Token bucket per key: ``rate`` requests per second on average, bursts up to ``burst``.

    At most ``max_keys`` buckets are kept (least recently used dropped first), so a flood of distinct keys —
    device ids or client addresses — cannot grow memory without bound; a dropped key starts again full.
    """

    def __init__(self, *, rate: float, burst: int, max_keys: int = 100_000) -> None:
        if not rate > 0 or burst < 1:  # `not >` so that NaN is refused too
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
