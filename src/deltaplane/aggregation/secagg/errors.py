"""The errors of the secure aggregation protocol (all are :class:`~deltaplane.errors.DeltaplaneError`)."""

from __future__ import annotations

from deltaplane.errors import DeltaplaneError

__all__ = [
    "AdvertisementUnbound",
    "KeyRevoked",
    "RevocationRollback",
    "RevocationsStale",
    "SecAggAuthError",
    "SecAggError",
    "SecAggFloorError",
    "SecAggOrderError",
    "SecAggRangeError",
]


class SecAggError(DeltaplaneError, RuntimeError):
    """The secure aggregation protocol cannot go on (too few clients left, a refused request)."""


class SecAggOrderError(SecAggError):
    """A message arrived at the wrong stage: too early, late (its stage is closed), twice, from a client that
    is not part of the stage, or for another round. The message is refused and the protocol state is unchanged.

    ``stage`` names the stage the receiver is in, so a transport can say what to do instead.
    """

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class SecAggFloorError(SecAggError):
    """A device refuses to unmask a sum of fewer masked inputs than its own floor (``min_inputs``: under
    distributed DP the m_min its noise was calibrated to). It revealed no share; every device of the run has
    the same floor and refuses the same request, so the sum is not unmasked and the device's update is in no
    published model (a fleet device keeps its error feedback as before the round).

    ``survivors`` is the size of the survivor set the request named; ``floor`` the device's floor.
    """

    def __init__(self, message: str, *, survivors: int, floor: int) -> None:
        super().__init__(message)
        self.survivors = survivors
        self.floor = floor


class SecAggRangeError(SecAggError):
    """A device refuses a round whose ring range (``clip_range``) is below its own least range (``min_range``:
    under distributed DP, C + 6σ_d for the device's own clip, noise multiplier and m_min). A narrower ring would
    clip the device's noised values before the sum, so the published sum would not carry the Gaussian noise the
    run's ε is computed for. Raised when the device reads the invitation, before it sends anything.

    ``clip_range`` is the round's range; ``min_range`` the device's least range.
    """

    def __init__(self, message: str, *, clip_range: float, min_range: float) -> None:
        super().__init__(message)
        self.clip_range = clip_range
        self.min_range = min_range


class SecAggAuthError(SecAggError):
    """A device refuses a key roster whose advertisements it cannot authenticate: a neighbour's device
    certificate is not signed by an enrollment authority the device trusts (or is expired, malformed, of another
    cohort), or the advertisement is not signed by the certified identity key for this round and slot. The device
    sends nothing and its state is unchanged: keys a server could have substituted are never used. Also raised
    by the consistency check: a device refuses to unmask unless ``threshold`` devices of its neighbourhood
    signed the very unmasking request it received (nothing revealed, state unchanged).

    ``client`` is the roster slot whose advertisement was refused (None: the roster as a whole).
    """

    def __init__(self, message: str, *, client: int | None = None) -> None:
        super().__init__(message)
        self.client = client


class AdvertisementUnbound(SecAggAuthError):
    """A neighbour's key advertisement does not verify under its certified identity key for this round's
    binding (:func:`~deltaplane.aggregation.secagg.protocol.round_binding`) and slot. The signature alone cannot
    say why: its keys were replaced after signing, or it was signed for another binding (another round, other
    parameters, another driver session: a replay from another round reads the same, and on the service so does
    a neighbour that reached the service by another address or TLS key). A driver that knows its session adds
    what to check (:class:`~deltaplane.serve.secagg_client.SecAggDevice` names the service identity)."""


class KeyRevoked(SecAggAuthError):
    """A device certificate binds an identity key the revocation list revokes, whatever device id or cohort the
    certificate names: a leaked key stays revoked when it is certified again under another id (a certification
    request for a new id signed by the leaked key, or a certificate issued under another id before the
    revocation). The device it belongs to generates a new identity key and is certified anew.

    ``fingerprint`` is the revoked key's SHA-256 (32 bytes:
    :func:`~deltaplane.aggregation.secagg.identity.key_fingerprint`).
    """

    def __init__(self, message: str, *, fingerprint: bytes, client: int | None = None) -> None:
        super().__init__(message, client=client)
        self.fingerprint = fingerprint


class RevocationsStale(SecAggAuthError):
    """The revocation list held is past its next update (beyond the clock-skew tolerance): the enrollment
    authority has issued, or should have issued, a newer one that may revoke more devices. A device refuses
    authenticated rounds and a server refuses to open them until a current list arrives (``deltaplane keys
    revoke`` issues one; a fleet device fetches the service's before each round). Fail closed: otherwise a server
    withholding the newer list could seat a device it revokes for as long as certificates last.

    ``next_update`` is the stale list's next update (unix seconds).
    """

    def __init__(self, message: str, *, next_update: int) -> None:
        super().__init__(message)
        self.next_update = next_update


class RevocationRollback(SecAggAuthError):
    """A revocation list older than the one held (a lower sequence number, or the same number with other
    contents): refused, as taking it would un-revoke devices. The held list stays.

    ``sequence`` is the refused list's number, ``held`` the number of the list held (equal: the same number with
    other contents).
    """

    def __init__(self, message: str, *, sequence: int, held: int) -> None:
        super().__init__(message)
        self.sequence = sequence
        self.held = held
