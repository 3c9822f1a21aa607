"""The device side of secure aggregation over the service: one method per protocol stage, over HTTP.

Partner: :mod:`deltaplane.serve.secagg_routes`. A :class:`SecAggDevice` wraps an authenticated
:class:`~deltaplane.serve.client.DeviceClient` and a :class:`~deltaplane.aggregation.secagg.DeviceEndpoint`: it
fetches the invitation and accepts or refuses it (before the device trains: :meth:`SecAggDevice.check_update`),
quantizes the device's update into the ring *on the device*, and carries each stage's
messages. Only masked or encrypted bytes leave the device. A stage whose input is not ready yet (the server has
not closed the previous stage) answers 409; ``wait`` retries until it is, up to a deadline.

In an authenticated round the device binds its signatures to the service it reached, as it saw it itself
(:mod:`deltaplane.serve.service_identity`: the TLS key the service presented, else its address), so a signed
advertisement replayed into another service's round of the same model and number does not verify there.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceEndpoint,
    RingEncoding,
    SecAggAuthError,
    SecAggConfig,
    check_device_policy,
)
from deltaplane.aggregation.secagg.errors import AdvertisementUnbound
from deltaplane.aggregation.secagg.identity import check_round_authentication
from deltaplane.aggregation.secagg.messages import check_stated_version
from deltaplane.delta import Delta
from deltaplane.errors import DecodeError, DeltaplaneError
from deltaplane.serve.client import DeviceClient, ServiceError
from deltaplane.serve.service_identity import (
    BINDING_HEADER,
    SERVICE_BINDING,
    check_plain_http,
    service_identity,
    service_session,
)

__all__ = ["BINDING", "SecAggDevice"]

#: sent with every request of a round: the service binding this device signs with (the service refuses an
#: authenticated round to a device that does not send it)
BINDING = {BINDING_HEADER: str(SERVICE_BINDING)}


class SecAggDevice:
    """One device in one SecAgg round of the service.

    Args:
        client: the device's authenticated connection.
        model: the model whose round this is.
        round_id: the SecAgg round number the operator opened.
        randbytes: secret randomness (OS randomness by default; seeded only in simulations).
        wait: seconds to keep retrying a stage the server has not opened yet (0: no retry).
        min_inputs: the fewest masked inputs whose sum this device helps unmask: under distributed DP the
            m_min its noise was calibrated to (:meth:`~deltaplane.engine.RunConfig.unmask_floor`), from the
            device's own config, never the invitation; an unmasking request with fewer survivors is refused
            on the device (:class:`~deltaplane.aggregation.secagg.SecAggError`) and nothing is sent.
        min_range: the least ring range this device accepts: under distributed DP C + 6σ_d from its own config
            (:meth:`~deltaplane.engine.RunConfig.min_secagg_range`); an invitation with a narrower
            ``clip_range`` is refused here (:class:`~deltaplane.aggregation.secagg.SecAggRangeError`), before
            anything is sent.
        credentials: the device's enrollment (identity key, certificate, trusted enrollment authorities): it
            signs its key advertisement and refuses a roster whose neighbours it cannot authenticate
            (:class:`~deltaplane.aggregation.secagg.SecAggAuthError`). With credentials the device refuses an
            unauthenticated invitation; without, an authenticated one (it could not sign): both before training.
            It also refuses, before training, a service that does not bind rounds to its identity (one from
            before :data:`~deltaplane.serve.service_identity.SERVICE_BINDING`).
        allow_plain_http: take an authenticated round from a service reached over plain HTTP at an address that
            is not loopback, or given by an address that is not (a loopback proxy forwards it off the host);
            refused by default, before training
            (:func:`~deltaplane.serve.service_identity.check_plain_http`: nothing authenticates such a service).
    """

    def __init__(
        self,
        client: DeviceClient,
        model: str,
        round_id: int,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        wait: float = 0.0,
        min_inputs: int = 0,
        min_range: float = 0.0,
        credentials: DeviceCredentials | None = None,
        allow_plain_http: bool = False,
    ) -> None:
        self.client = client
        self.allow_plain_http = allow_plain_http
        self.model = model
        self.round_id = round_id
        self.wait = wait
        self._path = f"/v1/models/{model}/secagg/{round_id}"
        answer = client.request("GET", self._path, headers=BINDING)
        self.invitation = answer.json()
        #: authenticated rounds: the service as this device saw it when it fetched the invitation, what its
        #: signatures name (:func:`~deltaplane.serve.service_identity.service_identity`); None: nothing is signed
        self.service: str | None = None
        self.endpoint = self._accept_invitation(
            self.invitation,
            answer,
            randbytes=randbytes,
            min_inputs=min_inputs,
            min_range=min_range,
            credentials=credentials,
        )
        #: an authenticated round: key advertisements signed, and a consistency check before unmasking
        self.authenticated = credentials is not None
        self.bytes_sent = 0

    def _accept_invitation(
        self,
        inv: Any,
        answer: httpx.Response,
        *,
        randbytes: Callable[[int], bytes],
        min_inputs: int,
        min_range: float,
        credentials: DeviceCredentials | None,
    ) -> DeviceEndpoint:
        """The device's endpoint for the invitation ``inv``, once the device accepts it: a graph and threshold
        that cannot let the server unmask it (:func:`check_device_policy`), a ring range and weighting its own
        distributed DP allows (``min_range``, :class:`DeviceEndpoint`), and the device's own SecAgg message
        version (``secagg_version``), and in an authenticated round its service binding; ``answer`` (the HTTP
        answer that carried ``inv``) says which service this device reached. Raises :class:`SecAggError` for a round the device refuses,
        :class:`DecodeError` for JSON that is not an invitation; nothing is sent."""
        # first: a service of another message version would refuse every message (or send ones this device
        # refuses), so the device learns it here, before it trains
        if isinstance(inv, dict):  # not a dict: malformed, below
            check_stated_version(
                inv.get("secagg_version"),
                self.round_id,
                this="device",
                peer="service",
                unstated="so it is older than 5",  # a service states it since version 5 (authenticated rounds)
            )
        try:
            self.base_version = int(inv["base_version"])
            self.config = SecAggConfig.from_dict(inv["config"])
            check_device_policy(self.config)  # the server chose the graph and threshold: refuse unsafe ones
            enc = inv["encoding"]
            self.encoding = RingEncoding(
                bits=int(enc["bits"]),
                clip_range=float(enc["clip_range"]),
                weight_scale=float(enc["weight_scale"]),
            )
            client_id = int(inv["client_id"])
            authenticated = inv.get("authenticated", False)
            if not isinstance(authenticated, bool):
                raise TypeError(f"'authenticated' is {authenticated!r}, not a boolean")
        except DeltaplaneError:
            raise
        except (KeyError, TypeError, ValueError) as exc:  # the server's JSON is not an invitation
            raise DecodeError(
                f"the SecAgg invitation at {self._path} is malformed ({type(exc).__name__}: {exc}); refused"
            ) from None
        check_round_authentication(
            authenticated,
            credentials,
            self.round_id,
            this="device",
            enrolled_as="it was enrolled with an identity",
            unenrolled_fix=" (fleet enroll --authority-key; fleet device --identity)",
            stale_fix="the device holds a current one (fleet device fetches the service's before each round: "
            "upload one there, POST /admin/secagg/revocations, or give the device the file `deltaplane keys "
            "revoke` issues)",
        )
        if credentials is not None:
            self._check_service_binding(inv.get("service_binding"))
            self.service = service_identity(answer, self._path)
            check_plain_http(self.service, answer, self.round_id, allowed=self.allow_plain_http)
        return DeviceEndpoint(
            client_id,
            self.config,
            self.encoding,
            randbytes=randbytes,
            min_inputs=min_inputs,
            min_range=min_range,
            credentials=credentials,
            # the service never reuses a round number, its identity tells it from another service's round (an
            # unauthenticated round signs nothing: its binding is never used)
            session=b"" if self.service is None else service_session(self.service, self.model, self.round_id),
        )

    def _check_service_binding(self, stated: object) -> None:
        """Refuse, before training, an authenticated round of a service that does not bind its rounds to its
        identity as this device does (:class:`SecAggAuthError`): this device's signatures would not verify at
        devices of that service's release, and theirs (bound to ``model/round`` alone) not here."""
        if stated == SERVICE_BINDING and type(stated) is int:
            return
        if isinstance(stated, int) and not isinstance(stated, bool) and stated > SERVICE_BINDING:
            said, fix = (
                f"uses service binding {stated}",
                f"upgrade this device to a release that uses {stated}",
            )
        else:
            said = (
                "states none (it is older: it binds rounds to model and round alone, where a signed "
                "advertisement would verify in another service's round)"
                if stated is None
                else f"uses service binding {stated!r}"
            )
            fix = f"upgrade the service to a release that uses {SERVICE_BINDING}"
        raise SecAggAuthError(
            f"refusing authenticated SecAgg round {self.round_id}: this device binds its signatures to the "
            f"service's identity (service binding {SERVICE_BINDING}) and the service {said}; {fix}"
        )

    @property
    def client_id(self) -> int:
        return self.endpoint.client_id

    def check_update(self, like: Delta, weight: int) -> None:
        """Refuse, before training, a round whose vector is not the size of this device's update (``like``:
        zeros shaped like what it masks, :func:`~deltaplane.engine.secure.masked_zeros`) or whose weighted ring
        cannot carry its ``weight`` (:class:`SecAggError`); :meth:`set_update` checks the actual update again."""
        self.endpoint.check_update(like, weight)

    def get(self, what: str) -> bytes:
        """Fetch a stage's server message (``roster``, ``inbox``, ``unmask``), retrying a 409 for ``wait`` s."""
        deadline = time.monotonic() + self.wait
        while True:
            try:
                return self.client.request("GET", f"{self._path}/{what}", headers=BINDING).content
            except ServiceError as exc:
                if exc.status != 409 or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def post(self, what: str, body: bytes) -> None:
        """Send a stage's message (``keys``, ``shares``, ``masked``, ``unmask``); refusals raise ServiceError."""
        self.client.request("POST", f"{self._path}/{what}", content=body, headers=BINDING)
        self.bytes_sent += len(body)

    def set_update(self, delta: Delta, weight: int, rng: np.random.Generator | None = None) -> None:
        """Quantize this device's update (relative to the round's base version) into the ring, on the device.

        Pass what the device's own codec decodes from its payload when it compresses, so error feedback and
        the codec shape the contribution exactly as in a plaintext round.
        """
        self.endpoint.set_update(delta, weight, rng if rng is not None else np.random.default_rng())

    def advertise(self) -> None:
        """Stage 0: send this device's public keys."""
        self.post("keys", self.endpoint.advertise())

    def share(self) -> None:
        """Stage 1: fetch the key roster, send encrypted shares. A neighbour's advertisement that does not
        verify for this round (:class:`AdvertisementUnbound`) is refused naming the service identity this
        device signed for, and what to check: nothing is sent."""
        roster = self.get("roster")
        try:
            shares = self.endpoint.share(roster)
        except AdvertisementUnbound as exc:
            raise AdvertisementUnbound(
                f"{exc}. This device signed for the service as it reached it, {self.service}: a device given "
                "another address for this service (another host name, port or path prefix) or reaching it "
                "through another TLS key signs for another, so check that every device of the round is given the "
                "same service address; if they all are, the advertisement was made for another round or service "
                "(a replay), or altered",
                client=exc.client,
            ) from None
        self.post("shares", shares)

    def upload(self) -> None:
        """Stage 2: fetch the shares addressed to this device, send the masked update."""
        self.post("masked", self.endpoint.masked_input(self.get("inbox")))

    def vouch(self) -> None:
        """The consistency check of an authenticated round: fetch the unmasking request, send this device's
        signature of it (one request per round: a second, different one is refused, SecAggAuthError)."""
        self.post("consistency", self.endpoint.sign_survivors(self.get("unmask")))

    def unmask(self) -> None:
        """Stage 3: fetch the unmasking request, send the shares it asks for (refusing any that asks for both,
        or has fewer survivors than ``min_inputs``: SecAggError, nothing sent). In an authenticated round it
        fetches the consistency check's signatures too and refuses (SecAggAuthError, nothing sent) unless
        ``threshold`` devices of its neighbourhood signed the request it fetched."""
        request = self.get("unmask")
        signatures = self.get("consistency") if self.authenticated else None
        self.post("unmask", self.endpoint.unmask(request, signatures))
