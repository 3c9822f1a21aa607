"""The two ends of a secure aggregation round as byte-in, byte-out objects: what every transport plugs into.

:class:`DeviceEndpoint` runs on a device: it turns the device's update into ring codes (kept on the device) and
answers each stage's server message with its own message, as bytes. :class:`ServerEndpoint` runs on the server:
it decodes each incoming message strictly, checks that the authenticated sender is the client the message
claims to be from, and hands it to :class:`~deltaplane.aggregation.secagg.SecAggServer`. A transport — in
process, HTTP, Flower — only moves these bytes; it never sees a plaintext update because neither endpoint emits
one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import numpy as np

from deltaplane.aggregation.secagg.encoding import RingEncoding
from deltaplane.aggregation.secagg.errors import SecAggError, SecAggOrderError, SecAggRangeError
from deltaplane.aggregation.secagg.identity import DeviceCredentials
from deltaplane.aggregation.secagg.messages import (
    AdvertiseKeys,
    KeyRoster,
    MaskedInput,
    ShareInbox,
    ShareKeys,
    SignedAdvertiseKeys,
    SurvivorSignature,
    SurvivorSignatures,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from deltaplane.aggregation.secagg.protocol import SecAggClient, SecAggConfig, SecAggServer, Stage
from deltaplane.aggregation.secagg.revocation import RevocationList
from deltaplane.delta import Delta
from deltaplane.errors import DecodeError

__all__ = ["DeviceEndpoint", "ServerEndpoint"]


class DeviceEndpoint:
    """One device's side of a round: its secrets, its codes, and a method per stage (bytes in, bytes out).

    Partner: :class:`ServerEndpoint`. Call :meth:`set_update` once the device has its update (after its own
    codec and error feedback: pass what it decoded from its own payload), then the stages in order.

    Args:
        client_id: the device's id in the round.
        config: the round's public parameters (from the server's invitation).
        encoding: how the update becomes ring codes (bits, clip range, weight scale).
        randbytes: secret randomness (OS randomness by default; seeded only in simulations).
        min_inputs: the fewest masked inputs whose sum the device helps unmask (distributed DP's m_min, from
            the device's own configuration; 0: SecAgg's threshold alone). See :class:`SecAggClient`.
        min_range: the least ring range the device accepts (distributed DP's C + 6σ_d from its own
            configuration, :meth:`~deltaplane.engine.RunConfig.min_secagg_range`; 0: any). A round whose
            ``encoding.clip_range`` is narrower would clip the device's noised values: :class:`SecAggRangeError`
            here, before anything is sent. With a minimum the ring must also be unweighted (``weight_scale``
            0, as distributed DP's mean is): a weighted ring scales each value by count / weight_scale before
            the clip, so the range would no longer bound what is clipped, and one device could move the sum
            by more than C.
        credentials: the device's enrollment: it signs its advertisement and refuses a roster whose
            neighbours' keys it cannot authenticate (:class:`~deltaplane.aggregation.secagg.SecAggAuthError`).
            See :class:`SecAggClient`.
        session: the driver's name for the round, bound into signed advertisements (the same on every device).
    """

    def __init__(
        self,
        client_id: int,
        config: SecAggConfig,
        encoding: RingEncoding,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        min_inputs: int = 0,
        min_range: float = 0.0,
        credentials: DeviceCredentials | None = None,
        session: bytes = b"",
    ) -> None:
        if not encoding.clip_range >= min_range:  # NaN included
            raise SecAggRangeError(
                f"refusing this SecAgg round: its ring range is {encoding.clip_range:g}, below the "
                f"{min_range:g} this device's distributed-DP noise needs (clip + 6 noise stds); a narrower ring "
                "would clip the noised values and the published sum would not carry the accounted noise",
                clip_range=encoding.clip_range,
                min_range=min_range,
            )
        if min_range > 0 and encoding.weight_scale != 0:
            raise SecAggRangeError(
                f"refusing this SecAgg round: its ring weights each update (weight_scale={encoding.weight_scale:g}); "
                "under this device's distributed DP every device weighs 1 (weight_scale 0), or its noised values "
                "would be scaled before the ring's clip and one device could move the sum by more than the clip",
                clip_range=encoding.clip_range,
                min_range=min_range,
            )
        if encoding.bits != config.bits:
            raise SecAggError(f"encoding has {encoding.bits}-bit codes, the round {config.bits}-bit")
        self.config = config
        self.encoding = encoding
        self.client = SecAggClient(
            client_id,
            config,
            randbytes=randbytes,
            min_inputs=min_inputs,
            credentials=credentials,
            session=session,
        )
        self._codes: np.ndarray | None = None

    @property
    def client_id(self) -> int:
        return self.client.client_id

    def export_state(self) -> bytes:
        """The protocol state (secrets included) for the device's own storage; the codes are not kept."""
        return self.client.export_state()

    @classmethod
    def restore(
        cls,
        config: SecAggConfig,
        encoding: RingEncoding,
        state: bytes,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        credentials: DeviceCredentials | None = None,
        session: bytes = b"",
    ) -> DeviceEndpoint:
        """A device endpoint resumed from :meth:`export_state` (for devices that run each stage afresh); the
        state keeps the device's ``min_inputs``, and one made with credentials needs them again."""
        out = cls.__new__(cls)
        out.config, out.encoding, out._codes = config, encoding, None
        out.client = SecAggClient.restore(
            config, state, randbytes=randbytes, credentials=credentials, session=session
        )
        return out

    def check_update(self, like: Delta, weight: int) -> None:
        """Refuse an update shaped like ``like`` with ``weight`` examples that this round cannot carry: its vector
        size is not the round's, or the weight does not fit a weighted ring (:class:`SecAggError`).

        A device calls it with zeros shaped like what it will mask *before* it trains, so a round it cannot take
        part in costs no training pass; :meth:`set_update` calls it again on the actual update."""
        size = self.encoding.vector_size(like)
        if size != self.config.vector_size:
            raise SecAggError(
                f"update has {size - 1} values; the round expects {self.config.vector_size - 1}"
            )
        self.encoding.check_weight(weight)

    def set_update(self, delta: Delta, weight: int, rng: np.random.Generator) -> None:
        """Quantize the device's update (and weight) into the ring; the codes never leave this object."""
        self.check_update(delta, weight)
        self._codes = self.encoding.encode(delta, weight, rng)

    def set_codes(self, codes: np.ndarray) -> None:
        """Use ready-made ring codes (integers in ``[0, 2^bits)``, one per value) instead of :meth:`set_update`."""
        self._codes = np.asarray(codes)

    def advertise(self) -> bytes:
        """Stage 0: this device's public keys (signed, with its certificate, when it has credentials)."""
        return self.client.advertise_keys().to_bytes()

    def share(self, roster: bytes) -> bytes:
        """Stage 1: encrypted shares for the neighbours in the server's roster."""
        return self.client.share_keys(KeyRoster.from_bytes(roster, self.config)).to_bytes()

    def masked_input(self, inbox: bytes) -> bytes:
        """Stage 2: the masked update (needs :meth:`set_update` first)."""
        if self._codes is None:
            raise SecAggOrderError(
                f"client {self.client_id}: no update to mask yet (call set_update)", stage=self.client.stage
            )
        msg = ShareInbox.from_bytes(inbox, self.config)
        return self.client.masked_input(msg, self._codes).to_bytes()

    def sign_survivors(self, request: bytes) -> bytes:
        """The consistency check of an authenticated round: this device's signature of the unmasking request it
        received (one request per round: :meth:`SecAggClient.sign_survivors`)."""
        msg = UnmaskRequest.from_bytes(request, self.config)
        return self.client.sign_survivors(msg).to_bytes()

    def unmask(self, request: bytes, signatures: bytes | None = None) -> bytes:
        """Stage 3: the shares the server may have (self-mask shares of survivors, key shares of dropouts);
        a request with fewer survivors than ``min_inputs`` is refused (:class:`SecAggError`), revealing nothing.
        In an authenticated round ``signatures`` (the server's ``SurvivorSignatures``) must show ``threshold``
        devices of this one's neighbourhood signed the same request (:class:`SecAggAuthError` otherwise)."""
        msg = UnmaskRequest.from_bytes(request, self.config)
        sigs = SurvivorSignatures.from_bytes(signatures, self.config) if signatures is not None else None
        return self.client.unmask(msg, sigs).to_bytes()


_RECEIVERS = {
    AdvertiseKeys: "receive_keys",
    SignedAdvertiseKeys: "receive_keys",
    ShareKeys: "receive_shares",
    MaskedInput: "receive_masked_input",
    SurvivorSignature: "receive_signature",
    UnmaskResponse: "receive_unmask",
}


class ServerEndpoint:
    """The server's side of a round: strict decoding, sender checks, the state machine; bytes in and out.

    Partner: :class:`DeviceEndpoint`. ``receive`` accepts any device → server message; the stage methods close
    stages and return what devices fetch next. ``authenticated``: the round takes signed advertisements and sends
    a signed roster (:class:`~deltaplane.aggregation.secagg.SecAggServer`); ``revocations``: it refuses the
    advertisements of devices the enrollment authority's revocation list revokes.
    """

    def __init__(
        self,
        config: SecAggConfig,
        *,
        min_inputs: int = 0,
        authenticated: bool = False,
        revocations: RevocationList | None = None,
    ) -> None:
        self.config = config
        self.server = SecAggServer(
            config, min_inputs=min_inputs, authenticated=authenticated, revocations=revocations
        )

    @property
    def stage(self) -> str:
        return self.server.stage

    def receive(self, data: bytes, *, sender: int | None = None) -> str:
        """Decode and apply one device → server message; returns its kind. ``sender`` is the authenticated
        client id (None when the transport authenticates otherwise); a message naming another client is refused.
        """
        msg = decode_message(data, self.config)
        method = _RECEIVERS.get(type(msg))
        if method is None:
            raise DecodeError(f"a {type(msg).__name__} is sent by the server, not to it")
        claimed = msg.client_id  # type: ignore[attr-defined]  # every kind in _RECEIVERS (device-sent) names its sender
        if sender is not None and claimed != sender:
            raise SecAggOrderError(
                f"client {sender} sent a message signed as client {claimed}", stage=self.stage
            )
        getattr(self.server, method)(msg)
        return type(msg).__name__

    def roster(self) -> bytes:
        """Close key advertisement; the key roster every device fetches."""
        return self.server.roster().to_bytes()

    def close_shares(self) -> None:
        """Close share exchange."""
        self.server.close_shares()

    def inbox(self, recipient: int) -> bytes:
        """The shares addressed to ``recipient`` (after :meth:`close_shares`)."""
        return self.server.inbox(recipient).to_bytes()

    def unmask_request(self) -> bytes:
        """Close masked inputs, freezing the survivors; the request every survivor fetches."""
        return self.server.unmask_request().to_bytes()

    def survivor_signatures(self) -> bytes:
        """Close the consistency check (authenticated rounds); the signatures every survivor fetches."""
        return self.server.survivor_signatures().to_bytes()

    def result(self) -> np.ndarray:
        """The exact integer sum of the frozen survivors' codes."""
        return self.server.result()

    def advance(self) -> str:
        """Close the current stage (whatever it is) and return the new one; the driver's deadline hook."""
        stage = self.stage
        if stage == Stage.ADVERTISE:
            self.roster()
        elif stage == Stage.SHARE:
            self.close_shares()
        elif stage == Stage.MASKED:
            self.unmask_request()
        elif stage == Stage.CONSISTENCY:
            self.survivor_signatures()
        elif stage == Stage.UNMASK:
            self.result()
        else:
            raise SecAggOrderError("the round is done; nothing to advance", stage=stage)
        return self.stage
