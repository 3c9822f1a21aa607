"""Message version 5 (authenticated rounds): a peer of another version is refused at its first message, with an
error that says which side to upgrade, and the round goes on without it.

The old-version messages are forged from the header bytes (the version byte of a valid message rewritten), not
made by the encoder: a version-4 ``AdvertiseKeys`` or ``KeyRoster`` has exactly the version-5 body, so only the
version byte tells them apart.
"""

from __future__ import annotations

import numpy as np
import pytest

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    RingEncoding,
    SecAggConfig,
    decode_message,
)
from deltaplane.aggregation.secagg.endpoints import DeviceEndpoint, ServerEndpoint
from deltaplane.errors import DecodeError

N, D = 5, 40
CFG = SecAggConfig(num_clients=N, threshold=3, bits=8, vector_size=D, round_id=7)
ENC = RingEncoding(bits=8, clip_range=1.0, weight_scale=0)


def _as_version(data: bytes, version: int) -> bytes:
    """The same message with another version byte (``magic | version | kind | round | body``)."""
    assert data[:4] == b"DPSA"
    return data[:4] + bytes([version]) + data[5:]


def _devices(authenticated: bool) -> list[DeviceEndpoint]:
    authority = EnrollmentAuthority.generate()
    out = []
    for u in range(N):
        creds = None
        if authenticated:
            ident = DeviceIdentity.enroll(authority, f"dev-{u}", cohort="c", expires=4_000_000_000)
            creds = DeviceCredentials(ident, authority.trust())
        dev = DeviceEndpoint(
            u, CFG, ENC, randbytes=np.random.default_rng(u).bytes, credentials=creds, session=b"m/7"
        )
        dev.set_codes(np.random.default_rng(100 + u).integers(0, 256, D))
        out.append(dev)
    return out


def test_messages_are_version_5() -> None:
    dev = _devices(authenticated=False)[0]
    data = dev.advertise()
    assert data[4] == 5
    assert decode_message(data, CFG).client_id == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("authenticated", [False, True])
def test_a_version_4_device_is_refused_at_its_advertisement_and_the_round_goes_on(
    authenticated: bool,
) -> None:
    devices = _devices(authenticated)
    server = ServerEndpoint(CFG, authenticated=authenticated)
    old = _as_version(devices[0].advertise(), 4)
    with pytest.raises(
        DecodeError, match="version 4 is not supported.*speaks version 5.*older deltaplane: upgrade it"
    ):
        server.receive(old, sender=0)
    assert server.server.stage == "advertise keys"
    # the others run the round without device 0: it never advertised, as if it had dropped before keys
    for dev in devices[1:]:
        server.receive(dev.advertise(), sender=dev.client_id)
    roster = server.roster()
    for dev in devices[1:]:
        server.receive(dev.share(roster), sender=dev.client_id)
    server.close_shares()
    for dev in devices[1:]:
        server.receive(dev.masked_input(server.inbox(dev.client_id)), sender=dev.client_id)
    request = server.unmask_request()
    signatures = None
    if authenticated:
        for dev in devices[1:]:
            server.receive(dev.sign_survivors(request), sender=dev.client_id)
        signatures = server.survivor_signatures()
    for dev in devices[1:]:
        server.receive(dev.unmask(request, signatures), sender=dev.client_id)
    expected = sum(np.asarray(d._codes, dtype=np.uint64) for d in devices[1:])
    assert np.array_equal(server.result(), expected)


def test_a_version_5_device_refuses_a_version_4_servers_first_message() -> None:
    """Under an older server the device's first message from it (the roster) is refused, nothing is sent."""
    devices = _devices(authenticated=True)
    server = ServerEndpoint(CFG, authenticated=True)
    for dev in devices:
        server.receive(dev.advertise(), sender=dev.client_id)
    roster = server.roster()
    with pytest.raises(DecodeError, match="version 4 is not supported.*older deltaplane: upgrade it"):
        devices[1].share(_as_version(roster, 4))
    assert devices[1].client.stage == "advertise keys"  # state unchanged: it can still take the real roster
    assert decode_message(devices[1].share(roster), CFG).client_id == 1  # type: ignore[attr-defined]


def test_a_newer_peer_says_upgrade_this_side() -> None:
    dev = _devices(authenticated=False)[0]
    with pytest.raises(DecodeError, match="version 6 is not supported.*newer deltaplane: upgrade this side"):
        ServerEndpoint(CFG).receive(_as_version(dev.advertise(), 6), sender=0)
