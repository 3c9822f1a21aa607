"""The consistency check of authenticated rounds (Bonawitz et al. 2017 §4, "ConsistencyCheck").

A malicious server can tell some of a target's neighbours that the target survived (they reveal its self-mask
seed's shares) and others that it dropped (they reveal its mask key's shares). The split is played out first on
the semi-honest protocol, where every device answers its own view; then every way a server could fake the check
(forged, missing, duplicated, too few, outside, another request's or round's signatures) is refused with the
device's state unchanged, and honest rounds with dropouts at every point still give the exact sum.
"""

import dataclasses

import numpy as np
import pytest

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceIdentity,
    Dropouts,
    EnrollmentAuthority,
    MaskedInput,
    SecAggAuthError,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggOrderError,
    SecAggServer,
    Stage,
    SurvivorSignature,
    SurvivorSignatures,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
    run_secagg,
    shamir,
)
from deltaplane.aggregation.secagg import protocol as P
from deltaplane.aggregation.secagg.identity import consistency_statement
from deltaplane.aggregation.secagg.protocol import request_digest
from deltaplane.errors import DecodeError

N, D, BITS, T = 6, 24, 8, 5  # complete graph of 6: threshold > 2/3 of a neighbourhood
EXPIRES, NOW = 4_000_000_000, 1_800_000_000.0
TARGET = 5


def _cfg(neighbours: int | None = None, round_id: int = 7) -> SecAggConfig:
    return SecAggConfig(N, T if neighbours is None else 4, BITS, D, neighbours=neighbours, round_id=round_id,
                        graph_seed=3)  # fmt: skip


def _codes(seed: int = 0, n: int = N) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 1 << BITS, D).astype(np.uint32) for u in range(n)}


@pytest.fixture(scope="module")
def creds() -> dict[int, DeviceCredentials]:
    authority = EnrollmentAuthority.generate()
    return {
        u: DeviceCredentials(
            DeviceIdentity.enroll(authority, f"device-{u}", cohort="fleet", expires=EXPIRES),
            authority.trust(),
            lambda: NOW,
        )
        for u in range(10)
    }


def _masked(cfg, creds=None, session=b"m/7", seed=0):
    """A round brought to its unmasking request: every client uploaded."""
    rb = np.random.default_rng(seed).bytes
    cred = lambda u: creds[u] if creds is not None else None  # noqa: E731
    clients = {u: SecAggClient(u, cfg, randbytes=rb, credentials=cred(u), session=session) for u in range(N)}
    server = SecAggServer(cfg, authenticated=creds is not None)
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    roster = server.roster()
    for c in clients.values():
        server.receive_shares(c.share_keys(roster))
    server.close_shares()
    codes = _codes(seed)
    for u, c in clients.items():
        server.receive_masked_input(c.masked_input(server.inbox(u), codes[u]))
    return clients, server, codes


def _split(req: UnmaskRequest) -> tuple[UnmaskRequest, UnmaskRequest]:
    """The two views of a server lying about TARGET: survived (the honest request) and dropped."""
    dropped = dataclasses.replace(
        req,
        survivors=tuple(v for v in req.survivors if v != TARGET),
        dropped=tuple(sorted({*req.dropped, TARGET})),
    )
    return req, dropped


def _state(c: SecAggClient) -> bytes:
    return c.export_state()


def _vouch(clients, req, signers):
    """The signatures honest ``signers`` give for ``req`` (each device signs only the request it was sent)."""
    return {u: clients[u].sign_survivors(req).signature for u in signers}


def _colluders_vouch(cfg, creds, req, colluders, session=b"m/7"):
    """Colluding devices sign whatever the server asks: their identity keys on any request."""
    digest, binding = request_digest(req), P.round_binding(cfg, session)
    return {u: creds[u].identity.sign(consistency_statement(binding, u, digest)) for u in colluders}


SURVIVED_VIEW, DROPPED_VIEW = (0, 1, 2, TARGET), (3, 4)


def test_the_semi_honest_protocol_answers_a_split_view_with_both_secrets_of_the_target() -> None:
    """The attack the check exists for, on the protocol without it: devices told TARGET survived reveal shares
    of its self-mask seed, devices told it dropped reveal shares of its mask key, each consistent with its own
    view. With ``2t − g`` colluders answering both views the server would hold t shares of each."""
    clients, server, _ = _masked(_cfg())
    survived, dropped = _split(server.unmask_request())
    b_shares = [u for u in SURVIVED_VIEW if TARGET in clients[u].unmask(survived).shares]
    s_shares = [u for u in DROPPED_VIEW if TARGET in clients[u].unmask(dropped).shares]
    assert b_shares == list(SURVIVED_VIEW) and s_shares == list(DROPPED_VIEW)


def test_a_split_view_is_refused_by_every_device_and_reveals_nothing(creds) -> None:
    """The same split in an authenticated round: each device signs its own view and the server forwards each
    view's signatures to its devices (4 and 2, threshold 5): every device refuses, nothing revealed, state kept.
    Fails before: a device with credentials answered its view (``unmask(request)``) as above."""
    cfg = _cfg()
    clients, server, _ = _masked(cfg, creds)
    survived, dropped = _split(server.unmask_request())
    views = {
        survived: _vouch(clients, survived, SURVIVED_VIEW),
        dropped: _vouch(clients, dropped, DROPPED_VIEW),
    }
    for req, members in ((survived, SURVIVED_VIEW), (dropped, DROPPED_VIEW)):
        sigs = SurvivorSignatures(cfg.round_id, views[req])
        for u in members:
            before = _state(clients[u])
            with pytest.raises(SecAggAuthError, match=f"{len(members)} devices of its neighbourhood"):
                clients[u].unmask(req, sigs)
            assert _state(clients[u]) == before and clients[u]._revealed == {}
    # a device vouches for one request: the server cannot collect its signature on the other view as well
    with pytest.raises(SecAggAuthError, match="second, different unmasking request"):
        clients[0].sign_survivors(dropped)
    with pytest.raises(SecAggAuthError, match="did not sign"):
        clients[3].unmask(survived, SurvivorSignatures(cfg.round_id, views[survived]))


def test_with_2t_minus_g_colluders_the_split_still_verifies(creds) -> None:
    """What remains: colluders sign both views, so with ``2t − g`` of them (4 of 6 here) each view gathers t
    signatures and the two honest devices answer opposite views. The check does not raise that number; the
    two-thirds threshold sets it (docs/aggregation.md)."""
    cfg = _cfg()
    clients, server, _ = _masked(cfg, creds)
    survived, dropped = _split(server.unmask_request())
    colluders = (0, 1, 2, 3)
    answers = {}
    for req, honest in ((survived, TARGET), (dropped, 4)):
        sigs = {**_colluders_vouch(cfg, creds, req, colluders), **_vouch(clients, req, [honest])}
        answers[honest] = clients[honest].unmask(req, SurvivorSignatures(cfg.round_id, sigs)).shares[TARGET]
    # the colluders' own shares of TARGET's secrets (a colluding device decrypts what it was sent)
    b_pts, s_pts = {TARGET + 1: answers[TARGET]}, {4 + 1: answers[4]}
    for u in colluders:
        ct = clients[u]._received[TARGET]
        plain = clients[u]._aead(TARGET).decrypt(ct[:12], ct[12:], P._aad(cfg, TARGET, u))
        b_pts[u + 1], s_pts[u + 1] = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
    rebuild = lambda pts: shamir.combine(  # noqa: E731
        {x: shamir.share_from_bytes(v) for x, v in pts.items()}, threshold=cfg.threshold
    )
    assert rebuild(b_pts) == clients[TARGET]._self_seed  # its self-mask seed
    assert rebuild(s_pts) == P._raw_private(clients[TARGET]._s_key)  # and its mask key


def _honest_signatures(clients, server, req, signers):
    for u in signers:
        server.receive_signature(clients[u].sign_survivors(req))
    return server.survivor_signatures()


@pytest.mark.parametrize(
    "tamper, why",
    [
        ("missing", "4 devices"),
        ("forged", r"do not verify on this request: \[4\]"),
        ("duplicated", r"do not verify on this request: \[4\]"),
        ("other_request", r"do not verify on this request: \[1, 2, 3, 4\]"),
        ("other_round", r"do not verify on this request: \[1, 2, 3, 4\]"),
        ("unsigned", "without the consistency check"),
    ],
)
def test_faked_consistency_checks_are_refused_with_the_state_unchanged(creds, tamper, why) -> None:
    cfg = _cfg()
    clients, server, codes = _masked(cfg, creds)
    req = server.unmask_request()
    honest = _honest_signatures(clients, server, req, range(N))
    sigs = {u: honest.signatures[u] for u in range(5)}  # 0..4: exactly threshold with device 0 itself
    if tamper == "missing":
        del sigs[4]
    elif tamper == "forged":
        sigs[4] = bytes(64)
    elif tamper == "duplicated":  # device 3's signature in slot 4's place
        sigs[4] = sigs[3]
    elif tamper == "other_request":  # signed by the certified keys, on another survivor set of this round
        _, other = _split(req)
        sigs = {0: sigs[0], **_colluders_vouch(cfg, creds, other, (1, 2, 3, 4))}
    elif tamper == "other_round":  # the same survivor set signed in another round (session m/8)
        sigs = {0: sigs[0], **_colluders_vouch(cfg, creds, req, (1, 2, 3, 4), session=b"m/8")}
    before = _state(clients[0])
    with pytest.raises(SecAggAuthError, match=why):
        clients[0].unmask(req, None if tamper == "unsigned" else SurvivorSignatures(cfg.round_id, sigs))
    assert _state(clients[0]) == before
    # the honest check still unmasks the exact sum afterwards
    for c in clients.values():
        server.receive_unmask(c.unmask(req, honest))
    assert np.array_equal(server.result(), sum(c.astype(np.uint64) for c in codes.values()))


def test_signatures_from_outside_the_neighbourhood_do_not_count(creds) -> None:
    """SecAgg+ (degree 4 of 6, threshold 4): the one device outside client 0's neighbourhood vouches in vain."""
    cfg = _cfg(neighbours=4)
    clients, server, _ = _masked(cfg, creds)
    req = server.unmask_request()
    honest = _honest_signatures(clients, server, req, range(N))
    (outsider,) = set(range(1, N)) - set(P.neighbours_of(cfg, 0))
    near = sorted(P.neighbours_of(cfg, 0))[:2]
    sigs = {u: honest.signatures[u] for u in (0, *near, outsider)}
    with pytest.raises(SecAggAuthError, match=rf"3 devices .* outside its neighbourhood: \[{outsider}\]"):
        clients[0].unmask(req, SurvivorSignatures(cfg.round_id, sigs))


@pytest.mark.parametrize("neighbours, threshold", [(None, 7), (8, 5)])
def test_authenticated_rounds_with_dropouts_at_every_point_are_exact(creds, neighbours, threshold) -> None:
    """A device gone before the check (after its upload) and one gone during it (signed, then vanished) are
    still in the sum; the sum is bit for bit the semi-honest round's (10 devices)."""
    cfg = SecAggConfig(10, threshold, BITS, D, neighbours=neighbours, round_id=7, graph_seed=3)
    codes = _codes(4, n=10)
    d = Dropouts(before_upload={1}, after_upload={2}, after_signing={3})
    rb = lambda: np.random.default_rng(9).bytes  # noqa: E731
    total, rep = run_secagg(codes, cfg, dropouts=d, credentials=creds, session=b"m/7", randbytes=rb())
    plain, plain_rep = run_secagg(codes, cfg, dropouts=d, randbytes=rb())
    assert rep.survivors == [0, 2, 3, 4, 5, 6, 7, 8, 9] and 3 not in rep.responders
    assert rep.responders == [0, 4, 5, 6, 7, 8, 9] == plain_rep.responders
    want = sum(codes[u].astype(np.uint64) for u in rep.survivors)
    assert np.array_equal(total, want) and np.array_equal(plain, want)


def test_server_stage_signature_checks_and_wire(creds) -> None:
    cfg = _cfg()
    # a semi-honest round has no consistency stage
    _, plain, _ = _masked(cfg)
    plain.unmask_request()
    assert plain.stage == Stage.UNMASK
    clients, server, _ = _masked(cfg, creds)
    req = server.unmask_request()
    assert server.stage == Stage.CONSISTENCY
    with pytest.raises(SecAggOrderError, match="too late"):  # a late masked input
        server.receive_masked_input(MaskedInput(cfg.round_id, 0, b""))
    with pytest.raises(SecAggOrderError):  # unmasking before the check closed
        server.receive_unmask(UnmaskResponse(cfg.round_id, 0, {}))
    sig = clients[0].sign_survivors(req)
    assert clients[0].sign_survivors(req) == sig  # a retry gets the same signature
    assert decode_message(sig.to_bytes(), cfg) == sig
    server.receive_signature(sig)
    with pytest.raises(SecAggOrderError, match="already signed"):
        server.receive_signature(sig)
    with pytest.raises(SecAggError, match="only 1 survivors signed"):
        server.survivor_signatures()
    assert server.stage == Stage.CONSISTENCY
    for u in range(1, N):
        server.receive_signature(clients[u].sign_survivors(req))
    out = server.survivor_signatures()
    assert server.stage == Stage.UNMASK and decode_message(out.to_bytes(), cfg) == out
    for cut in (1, 64):
        with pytest.raises(DecodeError):
            decode_message(out.to_bytes()[:-cut], cfg)
    with pytest.raises(DecodeError):
        SurvivorSignature(cfg.round_id, 0, b"x").to_bytes()
    # a device restored mid-check keeps what it vouched for
    state = clients[1].export_state()
    back = SecAggClient.restore(cfg, state, credentials=creds[1], session=b"m/7")
    with pytest.raises(SecAggAuthError, match="second, different"):
        back.sign_survivors(_split(req)[1])
    server.receive_unmask(back.unmask(req, out))
    # an unauthenticated device is not asked to sign, and takes no signatures
    c, _, _ = _masked(cfg)
    with pytest.raises(SecAggError, match="no identity"):
        c[0].sign_survivors(req)
    with pytest.raises(SecAggError, match="without device identities"):
        c[0].unmask(req, out)
