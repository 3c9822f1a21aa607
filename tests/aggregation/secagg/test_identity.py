"""Authenticated key advertisements (Bonawitz et al. 2017 §4's device PKI): a server that substitutes, forges or
replays key advertisements is refused by every device, with its state unchanged; honest rounds stay exact.

The attack itself is played out in full against the semi-honest protocol (the server recovers a target's input
from substituted keys, with no colluding device), so the refusal tests refuse something that is real.
"""

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from deltaplane.aggregation.secagg import (
    DeviceCertificate,
    DeviceCredentials,
    DeviceEndpoint,
    DeviceIdentity,
    Dropouts,
    EnrollmentAuthority,
    KeyRoster,
    RingEncoding,
    SecAggAuthError,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    ServerEndpoint,
    ShareInbox,
    SignedAdvertiseKeys,
    SignedKeyRoster,
    Stage,
    TrustedAuthorities,
    decode_message,
    exchange,
    run_secagg,
    shamir,
)
from deltaplane.aggregation.secagg import protocol as P
from deltaplane.aggregation.secagg.messages import CIPHERTEXT_BYTES
from deltaplane.aggregation.secagg.prg import add_masks, agree, derive
from deltaplane.aggregation.secagg.ring import from_words, reduce_words, unpack_words, word_count
from deltaplane.errors import ConfigError, DecodeError

N, D, BITS, T = 6, 40, 8, 5  # complete graph of 6: neighbourhoods of 6, threshold > 2/3 of them
EXPIRES = 4_000_000_000  # 2096
NOW = 1_800_000_000.0


def _cfg(round_id: int = 3, graph_seed: int = 11) -> SecAggConfig:
    return SecAggConfig(
        num_clients=N, threshold=T, bits=BITS, vector_size=D, round_id=round_id, graph_seed=graph_seed
    )


def _codes(seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 1 << BITS, D).astype(np.uint32) for u in range(N)}


@pytest.fixture(scope="module")
def authority() -> EnrollmentAuthority:
    return EnrollmentAuthority.generate()


@pytest.fixture(scope="module")
def creds(authority) -> dict[int, DeviceCredentials]:
    trust = authority.trust()
    return {
        u: DeviceCredentials(
            DeviceIdentity.enroll(authority, f"device-{u}", cohort="fleet", expires=EXPIRES),
            trust,
            lambda: NOW,
        )
        for u in range(N)
    }


def _advertised(cfg, creds, session=b"m/1", seed=0):
    """Clients with credentials, and the server holding every one's signed advertisement."""
    rb = np.random.default_rng(seed).bytes
    clients = {u: SecAggClient(u, cfg, randbytes=rb, credentials=creds[u], session=session) for u in range(N)}
    server = SecAggServer(cfg, authenticated=True)
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    return clients, server


def _substituted(
    roster: KeyRoster, target: int
) -> tuple[KeyRoster, dict[int, tuple[X25519PrivateKey, X25519PrivateKey]]]:
    """The roster a key-substituting server sends ``target``: every other client's keys replaced by its own."""
    fake = {v: (X25519PrivateKey.generate(), X25519PrivateKey.generate()) for v in roster.keys if v != target}
    pub = lambda k: k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)  # noqa: E731
    keys = {v: (pub(fake[v][0]), pub(fake[v][1])) if v in fake else ks for v, ks in roster.keys.items()}
    return dataclasses.replace(roster, keys=keys), fake


def _recover_input(cfg, target: SecAggClient, roster: KeyRoster, fake) -> np.ndarray:
    """The attack: decrypt the target's shares for the substituted neighbours, rebuild bᵤ and sᵤ, unmask its
    masked input. Needs no colluding device, only the server's place between the devices."""
    u, codes = target.client_id, _codes()[target.client_id]
    shares = target.share_keys(roster)
    b_pts, s_pts = {}, {}
    for v, ct in shares.ciphertexts.items():
        key = derive(agree(fake[v][0], roster.keys[u][0]), "share-encryption", P._pair_context(cfg, u, v))
        plain = AESGCM(key).decrypt(ct[:12], ct[12:], P._aad(cfg, u, v))
        b_pts[v + 1] = shamir.share_from_bytes(plain[: shamir.SHARE_BYTES])
        s_pts[v + 1] = shamir.share_from_bytes(plain[shamir.SHARE_BYTES :])
    b_u = shamir.combine(b_pts, threshold=cfg.threshold)
    s_u_public = roster.keys[u][1]
    inbox = ShareInbox(cfg.round_id, u, {v: bytes(CIPHERTEXT_BYTES) for v in fake})
    masked = target.masked_input(inbox, codes)
    words = np.zeros(word_count(cfg.vector_size, cfg.ring_bits), dtype=np.uint64)
    unpack_words(masked.packed, cfg.ring_bits, cfg.vector_size, words)
    masks = [(P._self_key(cfg, b_u, u), -1)] + [
        (P._pair_key(cfg, fake[v][1], s_u_public, u, v), -1 if u < v else 1) for v in fake
    ]
    add_masks(words, masks)
    assert len(s_pts) >= cfg.threshold  # sᵤ is recoverable too: every pairwise mask of the target is open
    return from_words(reduce_words(words, cfg.vector_size, cfg.ring_bits), cfg.ring_bits, cfg.vector_size)


def test_substituted_keys_reveal_a_targets_input_without_device_pki() -> None:
    # the semi-honest protocol (no credentials) accepts the substituted roster, and the server reads the input
    cfg = _cfg()
    clients = {u: SecAggClient(u, cfg) for u in range(N)}
    server = SecAggServer(cfg)
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    roster, fake = _substituted(server.roster(), target=0)
    assert np.array_equal(_recover_input(cfg, clients[0], roster, fake), _codes()[0])


def _snapshot(c: SecAggClient):
    return (c.stage, dict(c._peers), dict(c._aeads), c._self_seed, c._own_shares)


def test_substituted_keys_are_refused_and_the_honest_roster_still_works(creds) -> None:
    cfg = _cfg()
    clients, server = _advertised(cfg, creds)
    honest = server.roster()
    assert isinstance(honest, SignedKeyRoster)
    evil, fake = _substituted(honest, target=0)
    before = _snapshot(clients[0])
    with pytest.raises(SecAggAuthError, match="not signed by device") as exc:
        _recover_input(cfg, clients[0], evil, fake)
    assert exc.value.client in fake
    assert _snapshot(clients[0]) == before and clients[0].stage == Stage.ADVERTISE
    # one substituted key is enough to be refused
    one = dataclasses.replace(honest, keys={**honest.keys, 4: evil.keys[4]})
    with pytest.raises(SecAggAuthError) as exc:
        clients[0].share_keys(one)
    assert exc.value.client == 4
    # the honest roster, after the refusals: the round runs to the exact sum
    for c in clients.values():
        server.receive_shares(c.share_keys(honest))
    server.close_shares()
    codes = _codes()
    for u, c in clients.items():
        server.receive_masked_input(c.masked_input(server.inbox(u), codes[u]))
    req = server.unmask_request()
    for c in clients.values():  # the consistency check of an authenticated round
        server.receive_signature(c.sign_survivors(req))
    sigs = server.survivor_signatures()
    for c in clients.values():
        server.receive_unmask(c.unmask(req, sigs))
    assert np.array_equal(server.result(), sum(c.astype(np.uint64) for c in codes.values()))


def test_a_certificate_from_another_authority_is_refused(creds) -> None:
    cfg = _cfg()
    clients, server = _advertised(cfg, creds)
    honest = server.roster()
    # the server enrolls a key of its own as device-4 with an authority of its own, and signs keys with it
    rogue = DeviceIdentity.enroll(EnrollmentAuthority.generate(), "device-4", cohort="fleet", expires=EXPIRES)
    mallory = SecAggClient(
        4, cfg, credentials=DeviceCredentials(rogue, TrustedAuthorities([b"\1" * 32])), session=b"m/1"
    )
    ad = mallory.advertise_keys()
    forged = SignedKeyRoster(
        cfg.round_id,
        {**honest.keys, 4: (ad.c_public, ad.s_public)},
        {**honest.attestations, 4: (ad.certificate, ad.signature)},
    )
    with pytest.raises(SecAggAuthError, match="does not trust"):
        clients[0].share_keys(forged)
    # the same rogue certificate relabelled as the trusted authority's: its signature does not verify
    cert = DeviceCertificate.from_bytes(ad.certificate)
    relabelled = dataclasses.replace(cert, authority=creds[0].identity.certificate.authority)
    forged2 = dataclasses.replace(
        forged, attestations={**forged.attestations, 4: (relabelled.to_bytes(), ad.signature)}
    )
    with pytest.raises(SecAggAuthError, match="forged or altered"):
        clients[0].share_keys(forged2)
    # device-4's genuine certificate with the rogue keys and the rogue's signature: not signed by device-4
    genuine = honest.attestations[4][0]
    forged3 = dataclasses.replace(forged, attestations={**forged.attestations, 4: (genuine, ad.signature)})
    with pytest.raises(SecAggAuthError, match="not signed by device 'device-4'"):
        clients[0].share_keys(forged3)
    assert clients[0].stage == Stage.ADVERTISE


@pytest.mark.parametrize(
    "other",
    [
        {"round_id": 4},  # another round of the service
        {"graph_seed": 12},  # the same round number, another round's fresh parameters
        {"session": b"m/2"},  # the same parameters under another session name
    ],
)
def test_a_replayed_advertisement_of_another_round_is_refused(creds, other) -> None:
    session = other.pop("session", b"m/1")
    old_cfg = _cfg(**{"round_id": 3, "graph_seed": 11, **other})
    _, old_server = _advertised(old_cfg, creds, session=session, seed=5)
    old = old_server.roster()  # device-4's signed advertisement of another round
    cfg = _cfg()
    clients, server = _advertised(cfg, creds)
    honest = server.roster()
    replayed = SignedKeyRoster(
        cfg.round_id, {**honest.keys, 4: old.keys[4]}, {**honest.attestations, 4: old.attestations[4]}
    )
    with pytest.raises(SecAggAuthError, match="replay"):
        clients[0].share_keys(replayed)


def test_an_advertisement_moved_to_another_slot_is_refused(creds) -> None:
    cfg = _cfg()
    clients, server = _advertised(cfg, creds)
    honest = server.roster()
    moved = SignedKeyRoster(
        cfg.round_id, {**honest.keys, 5: honest.keys[4]}, {**honest.attestations, 5: honest.attestations[4]}
    )
    with pytest.raises(SecAggError):  # the repeated key or the slot binding: refused either way
        clients[0].share_keys(moved)
    # device-4 re-signing for slot 5 under its own identity (a device in two slots) is refused too
    twin = SecAggClient(5, cfg, credentials=creds[4], session=b"m/1").advertise_keys()
    doubled = SignedKeyRoster(
        cfg.round_id,
        {**honest.keys, 5: (twin.c_public, twin.s_public)},
        {**honest.attestations, 5: (twin.certificate, twin.signature)},
    )
    with pytest.raises(SecAggAuthError, match="holds roster slots 4 and 5"):
        clients[0].share_keys(doubled)


def test_unsigned_roster_expired_certificate_and_other_cohort_are_refused(authority, creds) -> None:
    cfg = _cfg()
    clients, server = _advertised(cfg, creds)
    honest = server.roster()
    with pytest.raises(SecAggAuthError, match="unsigned roster"):
        clients[0].share_keys(KeyRoster(cfg.round_id, dict(honest.keys)))
    unsigned_slot = {v: a for v, a in honest.attestations.items() if v != 2}
    with pytest.raises(SecAggAuthError, match="slot 2 carries no signature"):
        clients[0].share_keys(dataclasses.replace(honest, attestations=unsigned_slot))
    late = dataclasses.replace(creds[0], clock=lambda: EXPIRES + 1.0)
    c = SecAggClient(0, cfg, randbytes=np.random.default_rng(0).bytes, credentials=late, session=b"m/1")
    with pytest.raises(SecAggAuthError, match="expired"):
        c.share_keys(honest)
    other = DeviceIdentity.enroll(authority, "device-4", cohort="other", expires=EXPIRES)
    ad = SecAggClient(
        4, cfg, credentials=dataclasses.replace(creds[4], identity=other), session=b"m/1"
    ).advertise_keys()
    mixed = SignedKeyRoster(
        cfg.round_id,
        {**honest.keys, 4: (ad.c_public, ad.s_public)},
        {**honest.attestations, 4: (ad.certificate, ad.signature)},
    )
    with pytest.raises(SecAggAuthError, match="cohort 'other'"):
        clients[0].share_keys(mixed)


@pytest.mark.parametrize("neighbours", [None, 4])
def test_authenticated_round_is_exact_with_dropouts(creds, neighbours) -> None:
    cfg = dataclasses.replace(_cfg(), neighbours=neighbours, threshold=T if neighbours is None else 4)
    codes = _codes(1)
    total, rep = run_secagg(codes, cfg, dropouts=Dropouts(after_upload={2}), credentials=creds, session=b"m/1",
                            randbytes=np.random.default_rng(2).bytes)  # fmt: skip
    assert rep.survivors == list(range(N)) and 2 not in rep.responders
    assert np.array_equal(total, sum(c.astype(np.uint64) for c in codes.values()))


def test_server_modes_and_wire_round_trip(creds) -> None:
    cfg = _cfg()
    signed = SecAggClient(0, cfg, credentials=creds[0], session=b"m/1").advertise_keys()
    plain = SecAggClient(1, cfg).advertise_keys()
    assert isinstance(signed, SignedAdvertiseKeys)
    assert decode_message(signed.to_bytes(), cfg) == signed
    with pytest.raises(SecAggError, match="takes signed ones"):
        SecAggServer(cfg, authenticated=True).receive_keys(plain)
    with pytest.raises(SecAggError, match="takes unsigned ones"):
        SecAggServer(cfg).receive_keys(signed)
    _, server = _advertised(cfg, creds)
    roster = server.roster()
    assert decode_message(roster.to_bytes(), cfg) == roster
    for cut in (1, 64, 70):
        with pytest.raises(DecodeError):
            decode_message(roster.to_bytes()[:-cut], cfg)
    with pytest.raises(DecodeError):
        DeviceCertificate.from_bytes(signed.certificate[:-1])
    with pytest.raises(ConfigError, match="another identity key"):
        DeviceIdentity(DeviceIdentity.enroll(EnrollmentAuthority.generate(), "x", cohort="c", expires=EXPIRES)._key,
                       creds[0].identity.certificate)  # fmt: skip


def test_endpoints_carry_credentials_through_bytes_and_restore(creds) -> None:
    cfg, enc = _cfg(), RingEncoding(bits=BITS)
    devices = {u: DeviceEndpoint(u, cfg, enc, credentials=creds[u], session=b"m/1") for u in range(N)}
    codes = _codes(3)
    for u, d in devices.items():
        d.set_codes(codes[u])
    # an endpoint exported after advertising is restored only with its credentials
    server = ServerEndpoint(cfg, authenticated=True)
    server.receive(devices[0].advertise(), sender=0)
    state = devices[0].export_state()
    with pytest.raises(SecAggAuthError, match="restore it with"):
        DeviceEndpoint.restore(cfg, enc, state)
    devices[0] = DeviceEndpoint.restore(cfg, enc, state, credentials=creds[0], session=b"m/1")
    devices[0].set_codes(codes[0])
    fresh = ServerEndpoint(cfg, authenticated=True)
    total, _ = exchange(devices, fresh)
    assert np.array_equal(total, sum(c.astype(np.uint64) for c in codes.values()))
