"""httpx clients for the service: :class:`DeviceClient` (what runs on a device) and :class:`AdminClient`.

A device never applies an unverified byte: :meth:`DeviceClient.fetch` checks the Ed25519 signature and, for a
delta, that the rebuilt weights hash to the signed target; on any delta failure it falls back to the full
model. HTTP errors surface as :class:`ServiceError` carrying the status and the server's message.
"""

from __future__ import annotations

import re
import secrets
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from deltaplane.errors import (
    ConfigError,
    DecodeError,
    DeltaplaneError,
    DowngradeRefused,
    IntegrityError,
    NotFound,
    SignatureError,
)
from deltaplane.registry.signing import Verifier
from deltaplane.registry.store import is_gated_tag, rollback_statement
from deltaplane.serve.fleet_history import MAX_ABORT_REASON
from deltaplane.serve.service_identity import (
    PEER_ADDRESS,
    PEER_CERTIFICATE,
    is_loopback_host,
    peer_address,
    peer_certificate,
)

if TYPE_CHECKING:
    import torch

    from deltaplane.codecs import WireSession
    from deltaplane.registry.downlink import Downlink

__all__ = [
    "REVOCATIONS_ADMIN_PATH",
    "REVOCATIONS_DEVICE_PATH",
    "AdminClient",
    "DeviceClient",
    "ServiceError",
    "TokenRefused",
]

#: where the operator uploads a new revocation list, and where devices fetch the current one
#: (:mod:`deltaplane.serve.revocation_routes` serves both; defined here so a device needs no FastAPI to know them)
REVOCATIONS_ADMIN_PATH = "/admin/secagg/revocations"
REVOCATIONS_DEVICE_PATH = "/v1/secagg/revocations"


class ServiceError(DeltaplaneError, RuntimeError):
    """The service answered with an error status; ``status`` and ``detail`` say which and why, and ``error``
    names the service's typed error (e.g. ``"PrivacyBudgetExceeded"``) when it sent one. ``retry_after``: the
    seconds a 408/429/503 refusal made before handling asked to wait (:func:`retry_after`), else None."""

    def __init__(
        self, status: int, detail: str, error: str | None = None, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.error = error
        self.retry_after = retry_after


class TokenRefused(ServiceError):
    """The service refused a device's token (401): revoked (``keys revoke --upload``, ``POST
    /admin/devices/{id}/revoke``), expired, or issued by another service. No retry can pass: a device stops on it
    (:func:`deltaplane.serve.fleet.run_device`), its message saying what to do; ``reason`` is the service's own
    detail."""

    def __init__(self, reason: str, error: str | None = None, *, token: str = "this device's token") -> None:
        super().__init__(
            401,
            f"the service refused {token} ({reason}): it was revoked (`deltaplane keys revoke --upload`, POST "
            "/admin/devices/ID/revoke), has expired, or was issued by another service. The device stops: ask the "
            "fleet's operator for a new token (`deltaplane fleet enroll --add 1` enrols a replacement under a new "
            "id; a revoked id is never issued a token again) and start it with that --token-file",
            error,
        )
        self.reason = reason

    @classmethod
    def of(cls, exc: ServiceError, *, token: str = "this device's token") -> TokenRefused:
        """The 401 ``exc`` (or a :class:`TokenRefused` already) as a refusal of ``token``."""
        return cls(exc.reason if isinstance(exc, TokenRefused) else exc.detail, exc.error, token=token)


def _check(resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        error = None
        try:
            body = resp.json()
            detail = body.get("detail", resp.text)
            error = body.get("error") if isinstance(body.get("error"), str) else None
        except (ValueError, AttributeError):
            detail = resp.text
        raise ServiceError(resp.status_code, str(detail), error, retry_after=retry_after(resp))
    return resp


#: the default bound on one answer's (decompressed) size a device reads; a full model download is the largest
MAX_RESPONSE_BYTES = 1 << 30
#: statuses a device retries, when they carry ``Retry-After``: the service sends one only with a refusal made
#: before the request was handled (device busy, rate limit, body budget, connections per address; 408: a body
#: dropped for arriving slower than ``--min-body-rate``), so a retried upload cannot count twice (and a second
#: upload of a device to one round is refused, 409, anyway)
RETRY_STATUSES = (408, 429, 503)
_SECONDS = re.compile(r"[0-9]{1,9}")


def retry_after(resp: httpx.Response) -> float | None:
    """The seconds a 408/429/503 answer's ``Retry-After`` asks to wait (delta-seconds only), or None: not to be
    retried (another status, no header, an HTTP date, garbage)."""
    value = resp.headers.get("retry-after", "").strip()
    if resp.status_code not in RETRY_STATUSES or not _SECONDS.fullmatch(value):
        return None
    return float(value)


_FRAMING = ("content-encoding", "content-length", "transfer-encoding")


def _http_client(
    base_url: str, timeout: float, tls: ssl.SSLContext | None, service_spki: str | None = None, **kw: Any
) -> httpx.Client:
    """An ``httpx.Client`` for ``base_url``; a TLS context with a non-``https://`` URL is refused rather than
    ignored (httpx would silently speak plain HTTP and send the bearer token in clear). With ``service_spki``
    (``sha256:<hex>``) the connection refuses, during the handshake, a server presenting another key
    (:func:`~deltaplane.serve.tls.pin_service_key`, on ``tls`` or on a context trusting the system's CAs)."""
    if tls is not None and httpx.URL(base_url).scheme != "https":
        raise ConfigError(
            f"a TLS context was given for {base_url!r}, which is not an https:// URL: the connection would be "
            "plain HTTP and the token sent in clear; use https://"
        )
    if service_spki is not None:
        from deltaplane.serve.tls import pin_service_key

        _pinnable(base_url)
        tls = pin_service_key(tls or ssl.create_default_context(), service_spki, base_url)
    return httpx.Client(
        base_url=base_url, timeout=timeout, verify=tls or True, **direct_if_loopback(base_url), **kw
    )


def direct_if_loopback(base_url: str) -> dict[str, Any]:
    """The httpx client options for ``base_url``: for plain HTTP to this machine (``http://`` to a loopback IP
    or ``localhost``) no proxy at all, whatever the environment says (``trust_env=False``); otherwise none.

    httpx reads ``HTTP_PROXY``/``ALL_PROXY`` from the environment by default and sends a plain-HTTP request,
    its bearer token included, to the proxy named there, in clear, for the proxy to forward: a loopback address
    (the one plain-HTTP address the ``fleet`` commands accept, and the one an authenticated SecAgg round takes
    without ``allow_plain_http``) would then leave the host after all, and a proxy that cannot reach this
    machine's loopback would answer for the service. Go's ``net/http`` never proxies loopback either. An
    ``https://`` service keeps the environment's proxy: TLS runs end to end through it (``CONNECT``), checked
    by the CA, the service key pin and the SecAgg binding; so does a plain-HTTP service on another host (a
    ``https://`` forward proxy may be the protection there)."""
    url = httpx.URL(base_url)
    return {"trust_env": False} if url.scheme == "http" and is_loopback_host(url.host) else {}


def _pinnable(base_url: str) -> None:
    """Refuse a key pin for a service that is not reached over TLS (:class:`ConfigError`): plain HTTP presents
    no key, so the pin could hold nothing to it."""
    if httpx.URL(base_url).scheme != "https":
        raise ConfigError(
            f"a service key pin (--service-spki) was given for {base_url!r}, which is not an https:// URL: "
            "plain HTTP presents no key to pin; use the service's https:// address"
        )


def _read_capped(resp: httpx.Response, limit: int, what: str) -> bytes:
    """The (decoded) body of a streamed answer, refused past ``limit`` bytes while it arrives."""
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise DecodeError(f"the answer to {what} declares {declared} bytes, above max_response_bytes={limit}")
    chunks, size = [], 0
    for chunk in resp.iter_bytes():  # decoded: a gzip bomb is counted by what it inflates to
        size += len(chunk)
        if size > limit:
            raise DecodeError(
                f"the answer to {what} exceeds max_response_bytes={limit}; refused (raise it if your models "
                "are larger)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _open_rounds_of(model: str, body: Any) -> list[dict[str, Any]]:
    """The open rounds in a discovery answer, checked before a device acts on them: for ``model``, each a plain
    round or a SecAgg round at a stage a device acts in, with positive round and version numbers (a buggy or
    hostile service's answer raises ``KeyError``/``TypeError``/``ValueError``)."""
    from deltaplane.aggregation.secagg import Stage

    stages = (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.CONSISTENCY, Stage.UNMASK)
    if body["model"] != model:
        raise ValueError(f"the answer is for model {body['model']!r}")
    rounds = []
    for r in body["rounds"]:
        kind, number, base = r["kind"], r["round"], r["base_version"]
        if kind not in ("plain", "secagg") or type(number) is not int or type(base) is not int:
            raise ValueError(f"not an open round: {r!r:.200}")
        if number < 1 or base < 1:
            raise ValueError(f"round {number} on version {base}: both must be at least 1")
        if kind == "plain" and not isinstance(r.get("nonce"), str):
            raise ValueError(f"plain round {number} has no nonce")
        if kind == "secagg" and r.get("stage") not in stages:
            raise ValueError(f"SecAgg round {number} is at an unknown stage {r.get('stage')!r:.80}")
        rounds.append(dict(r))
    return rounds


def _given(**params: Any) -> dict[str, Any]:
    """Query parameters that were given (None: leave the service's default)."""
    return {k: v for k, v in params.items() if v is not None}


def _reason(reason: str) -> dict[str, str]:
    """An abort's ``reason`` query parameter (none when empty), cut to what the service takes."""
    return {"reason": reason[:MAX_ABORT_REASON]} if reason else {}


def _serves_channel(tag: str, channel: str) -> bool:
    """Whether the service may serve ``channel`` from ``tag``: the channel's own tag, a cohort's
    ``<channel>.<cohort>``, or, for ``training`` (which falls back to production), a production tag."""
    own = tag == channel or tag.startswith(channel + ".")
    return own or (channel == "training" and is_gated_tag(tag))


class DeviceClient:
    """A device's connection: fetch verified models/deltas, upload compressed updates, report summaries.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        token: the device token an admin issued.
        verifier: the public keys this device trusts.
        client: an existing ``httpx.Client`` (connection pooling, tests with ``transport=``).
        tls: for ``https://`` URLs, an SSL context (:func:`deltaplane.serve.tls.client_context`: trust only the
            service's CA, optionally present a device certificate); refused with another scheme.
        max_response_bytes: the most bytes one answer may take once decompressed (a full model is the
            largest); a server or proxy sending more is refused (:class:`DecodeError`) before it fills memory.
        service_spki: the service's key pin, ``sha256:<hex>`` (``deltaplane keys tls`` prints it): a server
            presenting another key, even with a valid certificate from the trusted CA, is refused
            (:class:`~deltaplane.errors.ServiceKeyMismatch`) during the TLS handshake, before any request is
            sent; ``https://`` only (:class:`ConfigError` otherwise). With ``client``, whose connections this
            class does not make, every answer's key is checked instead, after its request went out: give that
            client a context pinned by :func:`~deltaplane.serve.tls.pin_service_key` to refuse at the handshake.
        retries: how many times one request is sent again after a 429 or 503 carrying ``Retry-After`` (the
            service refused it before handling it: this device's requests in flight, its rate, the bodies in
            flight), waiting what the header asks; 0: never. A 408 with ``Retry-After`` (its body arrived slower
            than the service's minimum rate and was dropped unhandled; the header is the penalty during which
            this device may send no body) is sent again at most once. A request still refused after them raises
            :class:`ServiceError` with that status and its ``retry_after``.
        max_retry_wait: the longest ``Retry-After`` (seconds) waited out; an answer asking for longer is raised
            at once (a device loop, e.g. ``fleet device``, backs off on its own schedule).
        sleep: how to wait (tests pass a recorder).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        verifier: Verifier,
        client: httpx.Client | None = None,
        timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        service_spki: str | None = None,
        retries: int = 3,
        max_retry_wait: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from deltaplane.serve.tls import parse_spki_pin

        if retries < 0 or not max_retry_wait >= 0:
            raise ConfigError(
                f"retries and max_retry_wait must be non-negative. Found retries={retries}, "
                f"max_retry_wait={max_retry_wait}"
            )
        self.base_url = base_url
        self.verifier = verifier
        self.max_response_bytes = max_response_bytes
        self.retries, self.max_retry_wait, self._sleep = retries, max_retry_wait, sleep
        #: requests sent again after a 429/503 with Retry-After
        self.retried = 0
        if service_spki is not None:
            _pinnable(base_url)
        #: the pinned key's SHA-256 (hex), or None: every answer's certificate must carry it
        self.service_spki = parse_spki_pin(service_spki) if service_spki is not None else None
        self._http = client or _http_client(base_url, timeout, tls, service_spki)
        self._headers = {"Authorization": f"Bearer {token}"}
        self.version: int | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.sha256 = ""  # signed hash of the version held
        #: the round that made the version held (None: no round made it, or the service does not say), and
        #: whether the service said so (signed; a service from before ``X-Deltaplane-Round`` does not)
        self.made_by: int | None = None
        self.made_by_known = False
        #: bodies of the earlier versions fetched by number (:meth:`fetch_published`), apart from :meth:`fetch`'s
        self.published_bytes_received = 0
        #: bodies of the model downloads (:meth:`fetch`), as they crossed the wire
        self.bytes_received = 0
        self.full_bytes_equivalent = 0
        #: bodies of the wire sessions fetched (:meth:`session`), apart: a one-off per layout and codec
        self.session_bytes_received = 0

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request, sent again (at most ``retries`` times) while the service refuses it with a 429 or 503
        whose ``Retry-After`` is at most ``max_retry_wait``; the last answer is returned."""
        left, slow = self.retries, False
        while True:
            resp = self._send_once(method, path, **kw)
            wait = retry_after(resp)
            if wait is None or wait > self.max_retry_wait or not left or (slow and resp.status_code == 408):
                return resp
            # a body dropped for its pace (408) is sent again once: twice slow is the link, not a moment
            slow = slow or resp.status_code == 408
            left -= 1
            self.retried += 1
            self._sleep(wait)

    def _send_once(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request whose answer is read at most ``max_response_bytes`` far (then refused)."""
        request = self._http.build_request(method, path, **kw)
        resp = self._http.send(request, stream=True)
        try:
            # the service's TLS certificate, read while the connection is open: what SecAgg signatures name
            # (deltaplane.serve.service_identity)
            cert = peer_certificate(resp)
            try:
                peer = peer_address(resp)
            except OSError:
                # a refusal sent while the body was still going out (a 408 for its pace, a 413): the server
                # closed the connection under it, and getpeername fails; an answer that went through never does
                if resp.status_code < 400:
                    raise
                peer = None
            if self.service_spki is not None:  # the handshake checked it, unless the connection is not ours
                from deltaplane.serve.tls import check_service_key

                check_service_key(cert, self.service_spki, self.base_url, sent=True)
            body = _read_capped(resp, self.max_response_bytes, f"{method} {path}")
        finally:
            resp.close()
        headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in _FRAMING]
        extensions: dict[str, Any] = {PEER_CERTIFICATE: cert} if cert else {}
        if peer:
            extensions[PEER_ADDRESS] = peer
        return httpx.Response(
            resp.status_code, headers=headers, content=body, request=request, extensions=extensions
        )

    def _download(
        self, model: str, *, have: int | None, channel: str, nonce: str, version: int | None = None
    ) -> tuple[Downlink, httpx.Headers]:
        # torch and the codecs load here, on a device's path: an admin client (fleet enroll) never needs them
        from deltaplane.registry.downlink import Downlink

        params: dict[str, Any] = {"channel": channel}
        if have is not None:
            params["have"] = have
        if nonce:
            params["nonce"] = nonce
        if version is not None:
            params["version"] = version
        resp = _check(self._send("GET", f"/v1/models/{model}/download", params=params, headers=self._headers))
        h = resp.headers
        announced = h.get("x-deltaplane-model", "")
        if announced != model:
            # pin the model the device asked for: a validly signed artifact of another model is still foreign
            raise SignatureError(f"asked for model {model!r} but the answer is for {announced!r}; refused")
        base = h.get("x-deltaplane-base", "")
        try:
            dl = Downlink(
                kind=h["x-deltaplane-kind"],
                model=model,
                version=int(h["x-deltaplane-version"]),
                base=int(base) if base else None,
                body=resp.content,
                signature=h.get("x-deltaplane-signature", ""),
                target_sha256=h["x-deltaplane-target-sha256"],
                full_bytes=int(h["x-deltaplane-full-bytes"]),
            )
        except (KeyError, ValueError) as exc:
            raise DecodeError(f"download answer lacks or garbles a deltaplane header: {exc}") from None
        return dl, h

    def download(self, model: str, *, have: int | None = None, channel: str = "production") -> Downlink:
        """One raw, unverified download (use :meth:`fetch` to verify and apply)."""
        return self._download(model, have=have, channel=channel, nonce="")[0]

    def _check_answer(self, model: str, channel: str, nonce: str, dl: Downlink, h: httpx.Headers) -> None:
        """Refuse an answer that is not fresh, not for this model, or older than what the device holds."""
        from deltaplane.registry.downlink import rollback_offer_statement, serve_statement

        stmt = serve_statement(model, channel, dl.version, dl.target_sha256, nonce, dl.kind)
        sig = h.get("x-deltaplane-serve-signature", "")
        if not sig:
            raise SignatureError(f"download of {model} carries no serve signature; refused (freshness)")
        self.verifier.verify(stmt, sig)
        if dl.kind == "none" and (dl.version != self.version or dl.target_sha256 != self.sha256):
            raise SignatureError(
                f"server says {model}@{dl.version} is current, but this device holds version {self.version}"
            )
        if self.version is not None and dl.version < self.version:
            record = h.get("x-deltaplane-rollback", "")
            tag, _, rest = record.partition(":")
            supersedes, _, rsig = rest.partition(":")
            if not rsig or not supersedes.isdigit() or int(supersedes) < self.version:
                raise DowngradeRefused(
                    f"offered {model}@{dl.version} while holding @{self.version}, without a signed rollback "
                    "record covering it; refused (a downgrade needs `deltaplane registry rollback`)"
                )
            if not _serves_channel(tag, channel):
                raise DowngradeRefused(
                    f"offered {model}@{dl.version} while holding @{self.version} with a rollback record of tag "
                    f"{tag!r}, which does not serve the {channel!r} channel; refused (a rollback of another tag "
                    f"does not move this device back: roll back the {channel!r} tag)"
                )
            self.verifier.verify(
                rollback_statement(model, tag, dl.version, int(supersedes), dl.target_sha256), rsig
            )
            offer = h.get("x-deltaplane-rollback-offer", "")
            if not offer:
                raise DowngradeRefused(
                    f"offered {model}@{dl.version} while holding @{self.version} with a rollback record the service "
                    "did not vouch for on this request (no X-Deltaplane-Rollback-Offer signature): a record "
                    "replayed after its tag moved on, or a service from before offers were signed; refused"
                )
            self.verifier.verify(
                rollback_offer_statement(model, channel, dl.version, dl.target_sha256, nonce, record), offer
            )

    def _made_by(
        self, model: str, channel: str, nonce: str, dl: Downlink, h: httpx.Headers, *, pinned: bool
    ) -> tuple[bool, int | None]:
        """Which round made the answered version, as the service signed it over this request's nonce:
        ``(True, round)`` (round None: no round made it), or ``(False, None)`` if the answer does not say (a
        service from before ``X-Deltaplane-Round``). A statement that fails verification raises
        :class:`SignatureError`: a device must not adapt with another round's random stream."""
        from deltaplane.registry.downlink import made_by_statement

        sig = h.get("x-deltaplane-round-signature", "")
        if not sig:
            return False, None
        text = h.get("x-deltaplane-round", "")
        if text and not text.isdigit():
            raise DecodeError(f"download answer's X-Deltaplane-Round is {text[:40]!r}, not a round number")
        rnd = int(text) if text else None
        self.verifier.verify(
            made_by_statement(model, channel, dl.version, dl.target_sha256, nonce, rnd, pinned=pinned), sig
        )
        return True, rnd

    def fetch_published(
        self, model: str, version: int, *, channel: str = "training"
    ) -> tuple[dict[str, torch.Tensor], int | None]:
        """An earlier ``version`` of the lineage ``channel`` serves this device, verified, and the round that
        made it (None: no round did): what a personalized device that missed rounds adapts to, in order.

        Leaves what the device holds (:attr:`version`, :attr:`state`) as it was: the answer is history, not
        what to run, and says so in its signed statement, which can never pass for :meth:`fetch`'s.

        Raises:
            NotFound: ``version`` is not on that lineage (the service's 404).
            SignatureError: the answer is not ``version`` or carries no signed round (a service from before
                pinned downloads answers with the current version instead; catching up needs a newer one).
        """
        from deltaplane.registry.downlink import apply_downlink

        nonce = secrets.token_urlsafe(24)
        try:
            dl, h = self._download(model, have=None, channel=channel, nonce=nonce, version=version)
        except ServiceError as exc:
            if exc.status == 404:
                raise NotFound(exc.detail) from None
            raise
        known, rnd = self._made_by(model, channel, nonce, dl, h, pinned=True)
        if dl.version != version or not known:
            raise SignatureError(
                f"asked the service for {model}@{version} and got @{dl.version}"
                + ("" if known else " without a signed round (X-Deltaplane-Round)")
                + "; refused: catching up on missed rounds needs a service that serves pinned versions "
                "(GET /v1/models/{model}/download?version=N); upgrade it"
            )
        self.published_bytes_received += len(dl.body)
        return apply_downlink(dl, self.verifier, None), rnd

    def fetch(self, model: str, *, channel: str = "production") -> tuple[int, dict[str, torch.Tensor]]:
        """Bring this device to the current version (delta if it has a base, full otherwise), verified.

        The model is pinned to ``model``; every answer must carry the service's signature over this request's
        random nonce (so it cannot be replayed or faked, 204 included), and a version older than the one held
        is accepted only with a signed rollback record (:class:`DowngradeRefused` otherwise).
        """
        from deltaplane.registry.downlink import apply_downlink

        have = self.version if self.state is not None else None
        nonce = secrets.token_urlsafe(24)
        dl, h = self._download(model, have=have, channel=channel, nonce=nonce)
        self._check_answer(model, channel, nonce, dl, h)
        self.bytes_received += len(dl.body)
        self.full_bytes_equivalent += dl.full_bytes if dl.kind != "none" else 0
        try:
            state = apply_downlink(dl, self.verifier, self.state)
        except (IntegrityError, DecodeError):
            if dl.kind != "delta":
                raise
            nonce = secrets.token_urlsafe(24)  # the full model is the fallback
            dl, h = self._download(model, have=None, channel=channel, nonce=nonce)
            self._check_answer(model, channel, nonce, dl, h)
            self.bytes_received += len(dl.body)
            state = apply_downlink(dl, self.verifier, None)
        self.made_by_known, self.made_by = self._made_by(model, channel, nonce, dl, h, pinned=False)
        self.version, self.state, self.sha256 = dl.version, state, dl.target_sha256
        return dl.version, state

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """An authenticated request to any device endpoint (with ``headers`` besides the token); an error status
        raises :class:`ServiceError`. Over TLS the answer's ``extensions`` hold the certificate the service
        presented (:data:`~deltaplane.serve.service_identity.PEER_CERTIFICATE`), over a socket the address it
        reached (:data:`~deltaplane.serve.service_identity.PEER_ADDRESS`)."""
        headers = {**(headers or {}), **self._headers}
        if content is not None:
            headers["Content-Type"] = "application/octet-stream"
        return _check(self._send(method, path, content=content, headers=headers))

    def session(self, model: str) -> WireSession:
        """The wire session of ``model``'s open round (``GET /v1/models/{model}/session``), validated strictly:
        compress with it (``Compressor.compress(..., session=...)``) to send compact uploads."""
        from deltaplane.codecs import WireSession

        resp = _check(self._send("GET", f"/v1/models/{model}/session", headers=self._headers))
        self.session_bytes_received += len(resp.content)
        return WireSession.from_bytes(resp.content)

    def open_rounds(self, model: str) -> list[dict[str, Any]]:
        """Every open round of ``model`` this device may take part in (``GET /v1/models/{model}/rounds/open``):
        ``{"kind": "plain", "round", "base_version", "nonce"}`` or ``{"kind": "secagg", "round",
        "base_version", "stage"}`` (SecAgg rounds it is invited to); empty when nothing is open."""
        resp = _check(self._send("GET", f"/v1/models/{model}/rounds/open", headers=self._headers))
        try:
            return _open_rounds_of(model, resp.json())
        except (KeyError, TypeError, ValueError) as exc:  # the server's JSON is not a list of open rounds
            raise DecodeError(
                f"the open rounds of {model!r} the service sent are malformed ({type(exc).__name__}: {exc}); "
                "refused"
            ) from None

    def round(self, model: str) -> dict[str, Any]:
        return _check(self._send("GET", f"/v1/models/{model}/round", headers=self._headers)).json()

    def upload(
        self,
        model: str,
        round_id: int,
        payload: bytes,
        *,
        num_examples: float = 1.0,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        """Upload a compressed update to round ``round_id``, bound to the round's ``nonce``.

        Without ``nonce`` the client asks the service for the open round's (one extra request) and checks
        it is ``round_id``.
        """
        if nonce is None:
            info = self.round(model)
            if info["round"] != round_id:
                raise ServiceError(409, f"round {round_id} is not open; the open round is {info['round']}")
            nonce = info["nonce"]
        resp = self._send(
            "POST",
            f"/v1/models/{model}/rounds/{round_id}/update",
            params={"num_examples": num_examples},
            content=payload,
            headers={
                **self._headers,
                "Content-Type": "application/octet-stream",
                "X-Deltaplane-Round-Nonce": nonce,
            },
        )
        return _check(resp).json()

    def report(
        self,
        model: str,
        *,
        version: int,
        metrics: Mapping[str, float] | None = None,
        summary: Mapping[str, Any] | None = None,
        round_id: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"version": version, "metrics": dict(metrics or {})}
        if summary is not None:
            body["summary"] = dict(summary)
        if round_id is not None:
            body["round"] = round_id
        return _check(
            self._send("POST", f"/v1/models/{model}/report", json=body, headers=self._headers)
        ).json()


class AdminClient:
    """The operator's connection to the ``/admin`` endpoints.

    Args:
        base_url: e.g. ``https://127.0.0.1:8443``.
        token: the admin token the service runs with.
        client: an existing ``httpx.Client`` (tests with ``transport=``); not with ``service_spki``.
        tls: for ``https://`` URLs, an SSL context (:func:`deltaplane.serve.tls.client_context`); refused with
            another scheme.
        service_spki: the service's key pin, ``sha256:<hex>`` (``deltaplane keys tls`` prints it): a server
            presenting another key, even with a valid certificate from the trusted CA, is refused
            (:class:`~deltaplane.errors.ServiceKeyMismatch`) during the TLS handshake, before any request (the
            admin token included) is sent; ``https://`` only (:class:`ConfigError` otherwise). Refused with
            ``client`` (its connections are not this class's to pin: the admin token would go out before an
            answer could be checked); pin that client's context with :func:`~deltaplane.serve.tls.pin_service_key`.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        client: httpx.Client | None = None,
        timeout: float = 60.0,
        tls: ssl.SSLContext | None = None,
        service_spki: str | None = None,
    ) -> None:
        if client is not None and service_spki is not None:
            raise ConfigError(
                "AdminClient(service_spki=) pins the connections it makes, and client= brings its own: pin that "
                "client's SSL context with deltaplane.serve.tls.pin_service_key instead"
            )
        self.base_url = base_url
        self._http = client or _http_client(base_url, timeout, tls, service_spki)
        self._headers = {"Authorization": f"Bearer {token}"}

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, json: Any = None, **params: Any) -> Any:
        return _check(self._http.post(path, json=json, params=params or None, headers=self._headers)).json()

    def _get(self, path: str, **params: Any) -> Any:
        return _check(self._http.get(path, params=params or None, headers=self._headers)).json()

    def upload_revocations(self, data: bytes) -> dict[str, Any]:
        """Replace the service's revocation list with ``data`` (the file ``deltaplane keys revoke`` writes):
        ``POST /admin/secagg/revocations`` (:mod:`deltaplane.serve.revocation_routes`). Its sequence, issue
        time, next update, revoked device and key counts (``revoked``, ``revoked_keys``; a service before key
        revocation answers no ``revoked_keys``) and whether it replaced the held list; a refusal raises
        :class:`ServiceError` (400 malformed, 409 older than the held list or no list kept, 413 too large, 422
        forged, of another authority, or past its next update)."""
        headers = {**self._headers, "Content-Type": "application/octet-stream"}
        return _check(self._http.post(REVOCATIONS_ADMIN_PATH, content=data, headers=headers)).json()

    def issue_token(
        self,
        device_id: str,
        cohort: str = "default",
        *,
        ttl_s: int | None = None,
        models: Sequence[str] | None = None,
    ) -> str:
        """A device token (text); :meth:`issue_token_info` also returns its id and expiry."""
        return self.issue_token_info(device_id, cohort, ttl_s=ttl_s, models=models)["token"]

    def issue_token_info(
        self,
        device_id: str,
        cohort: str = "default",
        *,
        ttl_s: int | None = None,
        models: Sequence[str] | None = None,
    ) -> Any:
        """A device token with its id, expiry and scope; ``models`` limits it to those models (None: every one)."""
        body: dict[str, Any] = {"device_id": device_id, "cohort": cohort}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        if models is not None:
            body["models"] = list(models)
        return self._post("/admin/devices", body)

    def revoke_token(self, token_id: str) -> Any:
        return self._post("/admin/tokens/revoke", {"token_id": token_id})

    def revoke_device(self, device_id: str) -> Any:
        return self._post(f"/admin/devices/{device_id}/revoke")

    def open_round(self, model: str, base_version: int | None = None) -> dict[str, Any]:
        return self._post(f"/admin/models/{model}/rounds", {"base_version": base_version})

    def close_round(self, model: str, round_id: int) -> dict[str, Any]:
        return self._post(f"/admin/models/{model}/rounds/{round_id}/close")

    def round_status(self, model: str, round_id: int) -> dict[str, Any]:
        """A plain round as stored: ``state`` (open, closed, aborted), the ``version`` it published, ``uploads``."""
        return self._get(f"/admin/models/{model}/rounds/{round_id}")

    def unpublished_rounds(
        self, model: str | None = None, *, outcome: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The last rounds that ended without publishing (aborted, lost: ``outcome`` keeps one of them), newest
        first, with why; at most ``limit`` (up to 200)."""
        params = _given(model=model, outcome=outcome, limit=limit)
        return list(self._get("/admin/rounds/closed", **params)["unpublished_rounds"])

    def closed_rounds(self, model: str | None = None, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The last closed rounds (plain and SecAgg), newest first, with their devices' held-out accuracy, at
        most ``limit`` (up to 200); they survive a restart of the service."""
        params = _given(model=model or None, outcome="published", limit=limit)
        return list(self._get("/admin/rounds/closed", **params)["closed_rounds"])

    def abort_round(self, model: str, round_id: int, reason: str = "") -> dict[str, Any]:
        """Close the plain round without publishing; ``reason`` is recorded with it (the Fleet page shows it)."""
        return self._post(f"/admin/models/{model}/rounds/{round_id}/abort", **_reason(reason))

    def withdraw(self, cohort: str, reason: str = "") -> dict[str, Any]:
        """Record a consent withdrawal; returns the affected versions."""
        return self._post(f"/admin/cohorts/{cohort}/withdraw", reason=reason)

    def rebuild(self, model: str, tag: str = "training") -> dict[str, Any]:
        """Open a round on the last version free of withdrawn cohorts (those cohorts are excluded)."""
        return self._post(f"/admin/models/{model}/rebuild", tag=tag)

    def open_secagg(self, model: str, devices: list[str], **params: Any) -> dict[str, Any]:
        """Open a SecAgg round for ``devices`` (``bits``, ``clip_range``, ``weight_scale``, ``threshold``,
        ``neighbours``, ``base_version``: see :mod:`deltaplane.serve.secagg_routes`)."""
        return self._post(f"/admin/models/{model}/secagg", {"devices": list(devices), **params})

    def advance_secagg(self, model: str, round_id: int) -> dict[str, Any]:
        """Close the SecAgg round's current stage (its deadline passed); devices that did not speak dropped."""
        return self._post(f"/admin/models/{model}/secagg/{round_id}/advance")

    def secagg_status(self, model: str, round_id: int) -> dict[str, Any]:
        """The SecAgg round's stage and how many devices spoke in each (``advertised``, ``shared``...)."""
        return self._get(f"/admin/models/{model}/secagg/{round_id}")

    def close_secagg(self, model: str, round_id: int) -> dict[str, Any]:
        """Unmask the SecAgg round's sum and publish the new version."""
        return self._post(f"/admin/models/{model}/secagg/{round_id}/close")

    def abort_secagg(
        self, model: str, round_id: int, reason: str = "", *, abandoned: bool = False
    ) -> dict[str, Any]:
        """Give the SecAgg round up unpublished (its protocol state is dropped); returns its final status.
        ``reason`` is recorded with it (the Fleet page shows it); ``abandoned``: no coordinator runs it (it was
        stopped or killed), so the devices do not count it towards their ``--rounds``."""
        flag = {"abandoned": "true"} if abandoned else {}
        return self._post(f"/admin/models/{model}/secagg/{round_id}/abort", **_reason(reason), **flag)

    def promote(self, model: str, version: int, to: str = "production") -> dict[str, Any]:
        resp = self._http.post(
            f"/admin/models/{model}/promote", json={"version": version, "to": to}, headers=self._headers
        )
        if resp.status_code == 409 and "regressions" in resp.text:
            return resp.json()  # a refusal is an answer, not a transport failure
        return _check(resp).json()

    def rollback(self, model: str, tag: str = "production") -> dict[str, Any]:
        return self._post(f"/admin/models/{model}/rollback", tag=tag)

    def versions(self, model: str) -> dict[str, Any]:
        return self._get(f"/admin/models/{model}/versions")

    def set_drift_reference(
        self, model: str, spec: Mapping[str, Any], reference: Mapping[str, Any], **kw: Any
    ) -> Any:
        body = {"spec": dict(spec), "reference": dict(reference), **kw}
        return _check(
            self._http.put(f"/admin/models/{model}/drift-reference", json=body, headers=self._headers)
        ).json()

    def set_prediction_reference(self, model: str, version: int, prediction_counts: Sequence[int]) -> Any:
        """Register ``version``'s predicted-class counts on the drift reference's data: reports on ``version``
        are compared with them (the service keeps the last few versions')."""
        return _check(
            self._http.put(
                f"/admin/models/{model}/drift-reference/predictions/{version}",
                json={"prediction_counts": [int(c) for c in prediction_counts]},
                headers=self._headers,
            )
        ).json()

    def set_evaluation(
        self,
        model: str,
        kind: str,
        number: int,
        version: int,
        *,
        test_accuracy: float,
        test_samples: int,
        diverged: bool = False,
    ) -> Any:
        """Store the trusted coordinator's measure of ``version``, which ``kind`` round ``number`` published:
        its accuracy on the task's test set (``test_samples`` of them) and whether it diverged; the Fleet page
        and :meth:`closed_rounds` show it. Safe to repeat (a later one replaces it)."""
        return _check(
            self._http.put(
                f"/admin/models/{model}/rounds/{kind}/{number}/evaluation",
                json={
                    "version": int(version),
                    "test_accuracy": float(test_accuracy),
                    "test_samples": int(test_samples),
                    "diverged": bool(diverged),
                },
                headers=self._headers,
            )
        ).json()

    def alerts(self, model: str | None = None) -> list[dict[str, Any]]:
        return self._get("/admin/alerts", **({"model": model} if model else {}))

    def stats(self) -> dict[str, Any]:
        return self._get("/admin/stats")
