"""Issue #14 item 10: the survivor set is frozen at the unmasking request, late and out-of-order messages get
typed errors at every stage, and sums stay exact."""

import numpy as np
import pytest

from deltaplane.aggregation.secagg import (
    AdvertiseKeys,
    KeyRoster,
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggOrderError,
    SecAggServer,
    ShareInbox,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)

N, D, BITS = 6, 40, 8


def _setup(seed: int = 0):
    cfg = SecAggConfig(num_clients=N, threshold=4, bits=BITS, vector_size=D, round_id=7)
    rng = np.random.default_rng(seed)
    codes = {u: rng.integers(0, 1 << BITS, D).astype(np.uint32) for u in range(N)}
    rb = np.random.default_rng(seed + 1).bytes
    return cfg, codes, {u: SecAggClient(u, cfg, randbytes=rb) for u in range(N)}, SecAggServer(cfg)


def _to_stage(stage: str, seed: int = 0):
    """A round driven up to ``stage`` with every client taking part; returns what the stages produced."""
    cfg, codes, clients, server = _setup(seed)
    out = {"adv": {u: c.advertise_keys() for u, c in clients.items()}}
    if stage == Stage.ADVERTISE:
        return cfg, codes, clients, server, out
    for m in out["adv"].values():
        server.receive_keys(m)
    out["roster"] = server.roster()
    out["shares"] = {u: c.share_keys(out["roster"]) for u, c in clients.items()}
    if stage == Stage.SHARE:
        return cfg, codes, clients, server, out
    for m in out["shares"].values():
        server.receive_shares(m)
    server.close_shares()
    out["masked"] = {u: c.masked_input(server.inbox(u), codes[u]) for u, c in clients.items()}
    if stage == Stage.MASKED:
        return cfg, codes, clients, server, out
    raise AssertionError(stage)


def _state(server: SecAggServer):
    return (
        server.stage,
        dict(server.keys),
        {k: dict(v) for k, v in server.mailbox.items()},
        set(server.share_senders),
        list(server.uploaded),
        server.masked_sum.copy(),
        {k: dict(v) for k, v in server.responses.items()},
    )


def _same(a, b) -> bool:
    return all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b, strict=True)
    )


def test_late_masked_input_after_unmask_request_is_refused_and_the_sum_stays_exact() -> None:
    _cfg, codes, clients, server, out = _to_stage(Stage.MASKED)
    for u in range(N - 1):  # client 5 is slow
        server.receive_masked_input(out["masked"][u])
    req = server.unmask_request()
    assert req.survivors == (0, 1, 2, 3, 4) and req.dropped == (5,)
    before = _state(server)
    with pytest.raises(SecAggOrderError, match="too late") as exc:
        server.receive_masked_input(out["masked"][5])  # arrives after the request
    assert exc.value.stage == Stage.UNMASK
    assert _same(before, _state(server))  # refused messages change nothing
    assert server.unmask_request() == req  # the frozen request is what every client is asked
    for u in req.survivors:
        server.receive_unmask(clients[u].unmask(req))
    total = server.result()
    assert np.array_equal(total, sum(codes[u].astype(np.uint64) for u in range(N - 1)))
    with pytest.raises(SecAggOrderError):
        server.receive_masked_input(out["masked"][5])  # still refused once the round is done


@pytest.mark.parametrize(
    "stage, message",
    [
        # each stage's server refuses every message that belongs to another stage
        (Stage.ADVERTISE, "shares"),
        (Stage.ADVERTISE, "masked"),
        (Stage.ADVERTISE, "unmask"),
        (Stage.SHARE, "adv"),
        (Stage.SHARE, "masked"),
        (Stage.SHARE, "unmask"),
        (Stage.MASKED, "adv"),
        (Stage.MASKED, "shares"),
        (Stage.MASKED, "unmask"),
        (Stage.UNMASK, "adv"),
        (Stage.UNMASK, "shares"),
        (Stage.UNMASK, "masked"),
        (Stage.DONE, "adv"),
        (Stage.DONE, "shares"),
        (Stage.DONE, "masked"),
        (Stage.DONE, "unmask"),
    ],
)
def test_server_refuses_messages_of_another_stage(stage: str, message: str) -> None:
    cfg, _codes, clients, _server, out = _to_stage(Stage.MASKED)
    # a fresh server driven to `stage` with the messages of a complete round
    srv = SecAggServer(cfg)
    msgs = {
        "adv": out["adv"][0],
        "shares": out["shares"][0],
        "masked": out["masked"][0],
        "unmask": UnmaskResponse(cfg.round_id, 0, {}),
    }
    order = [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.UNMASK, Stage.DONE]
    steps = [
        lambda: ([srv.receive_keys(m) for m in out["adv"].values()], srv.roster()),
        lambda: ([srv.receive_shares(m) for m in out["shares"].values()], srv.close_shares()),
        lambda: ([srv.receive_masked_input(m) for m in out["masked"].values()], srv.unmask_request()),
        lambda: (
            [srv.receive_unmask(clients[u].unmask(srv.unmask_request())) for u in range(N)],
            srv.result(),
        ),
    ]
    for step in steps[: order.index(stage)]:
        step()
    assert srv.stage == stage
    before = _state(srv)
    with pytest.raises(SecAggOrderError) as exc:
        {
            "adv": srv.receive_keys,
            "shares": srv.receive_shares,
            "masked": srv.receive_masked_input,
            "unmask": srv.receive_unmask,
        }[message](msgs[message])
    assert exc.value.stage == stage
    if stage != Stage.DONE:  # the done server dropped its sum; nothing else to compare
        assert _same(before, _state(srv))


def test_server_refuses_duplicates_strangers_and_other_rounds() -> None:
    cfg, codes, clients, srv = _setup()
    adv = {u: c.advertise_keys() for u, c in clients.items()}
    for u in range(N - 1):  # client 5 advertises too late
        srv.receive_keys(adv[u])
    with pytest.raises(SecAggOrderError, match="already advertised"):
        srv.receive_keys(adv[0])
    with pytest.raises(SecAggOrderError, match="round 8"):
        srv.receive_keys(AdvertiseKeys(8, 5, b"\1" * 32, b"\2" * 32))
    roster = srv.roster()
    assert set(roster.keys) == set(range(N - 1))
    with pytest.raises(SecAggOrderError, match="too late"):
        srv.receive_keys(adv[5])  # its advertisement arrives after the roster was sent
    shares = {u: clients[u].share_keys(roster) for u in range(N - 1)}
    with pytest.raises(SecAggOrderError, match="not in the key roster"):
        srv.receive_shares(ShareKeys(cfg.round_id, 5, {}))
    for u in range(N - 2):  # client 4 shares only after the stage closed
        srv.receive_shares(shares[u])
    with pytest.raises(SecAggOrderError, match="already sent"):
        srv.receive_shares(shares[0])
    with pytest.raises(SecAggOrderError, match="still open"):
        srv.inbox(0)
    srv.close_shares()
    with pytest.raises(SecAggOrderError, match="too late"):
        srv.receive_shares(shares[4])
    with pytest.raises(SecAggOrderError, match="did not share"):
        srv.inbox(4)
    masked = {u: clients[u].masked_input(srv.inbox(u), codes[u]) for u in range(N - 2)}
    with pytest.raises(SecAggOrderError, match="cannot upload"):
        srv.receive_masked_input(MaskedInput(cfg.round_id, 4, masked[0].packed))
    for u in range(N - 2):
        srv.receive_masked_input(masked[u])
    with pytest.raises(SecAggOrderError, match="already uploaded"):
        srv.receive_masked_input(masked[1])
    req = srv.unmask_request()
    responses = {u: clients[u].unmask(req) for u in req.survivors}
    with pytest.raises(SecAggOrderError, match="not a survivor"):
        srv.receive_unmask(UnmaskResponse(cfg.round_id, 4, {}))
    for r in responses.values():
        srv.receive_unmask(r)
    with pytest.raises(SecAggOrderError, match="already answered"):
        srv.receive_unmask(responses[0])
    assert np.array_equal(srv.result(), sum(codes[u].astype(np.uint64) for u in range(N - 2)))


@pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED])
def test_client_refuses_every_stage_out_of_order(stage: str) -> None:
    cfg, codes, _clients, _server, out = _to_stage(Stage.MASKED)
    c = SecAggClient(0, cfg)
    roster_for_c = dict(out["roster"].keys)
    adv = c.advertise_keys()
    roster_for_c[0] = (adv.c_public, adv.s_public)
    roster = KeyRoster(cfg.round_id, roster_for_c)
    inbox = ShareInbox(cfg.round_id, 0, {})
    req = UnmaskRequest(cfg.round_id, tuple(range(N)), ())
    if stage in (Stage.SHARE, Stage.MASKED):
        c.share_keys(roster)
    if stage == Stage.MASKED:
        c.masked_input(_inbox_for(c, roster), codes[0])
    calls = {
        "advertise": lambda: c.advertise_keys(),
        "share": lambda: c.share_keys(roster),
        "masked": lambda: c.masked_input(inbox, codes[0]),
        "unmask": lambda: c.unmask(req),
    }
    allowed = {Stage.ADVERTISE: {"advertise", "share"}, Stage.SHARE: {"masked"}, Stage.MASKED: {"unmask"}}[
        stage
    ]
    for name, call in calls.items():
        if name in allowed:
            continue
        with pytest.raises(SecAggOrderError):
            call()
    assert c.stage == stage


def _inbox_for(c: SecAggClient, roster) -> ShareInbox:
    """Shares addressed to client 0 by clients 1..5 after they saw a roster holding c's keys."""
    cts = {}
    for u in range(1, N):
        fresh = SecAggClient(u, c.config, randbytes=np.random.default_rng(100 + u).bytes)
        keys = dict(roster.keys)
        keys[u] = (fresh.advertise_keys().c_public, fresh.advertise_keys().s_public)
        cts[u] = fresh.share_keys(KeyRoster(c.config.round_id, keys)).ciphertexts[0]
    return ShareInbox(c.config.round_id, 0, cts)


def test_client_refuses_a_roster_without_its_own_keys_and_messages_of_another_round() -> None:
    cfg, _codes, _clients, _server, out = _to_stage(Stage.SHARE)
    stranger = SecAggClient(0, cfg)  # its keys are not the roster's entry for client 0
    stranger.advertise_keys()
    with pytest.raises(SecAggError, match="own keys"):
        stranger.share_keys(out["roster"])
    assert stranger.stage == Stage.ADVERTISE
    other = SecAggConfig(num_clients=N, threshold=4, bits=BITS, vector_size=D, round_id=8)
    with pytest.raises(SecAggOrderError, match="round 7"):
        SecAggClient(1, other).share_keys(out["roster"])


def test_result_waits_for_enough_shares_and_then_is_exact() -> None:
    _cfg, codes, clients, server, out = _to_stage(Stage.MASKED)
    for u in (0, 1, 2, 3, 4):  # client 5 drops before uploading
        server.receive_masked_input(out["masked"][u])
    req = server.unmask_request()
    for u in (0, 1, 2):  # three answers: below the threshold of 4
        server.receive_unmask(clients[u].unmask(req))
    with pytest.raises(SecAggError, match="threshold 4"):
        server.result()
    assert server.stage == Stage.UNMASK  # still waiting; a late responder may complete the round
    server.receive_unmask(clients[3].unmask(req))
    assert np.array_equal(server.result(), sum(codes[u].astype(np.uint64) for u in range(5)))


def test_dropouts_at_every_stage_and_a_late_upload_keep_the_sum_exact() -> None:
    from deltaplane.aggregation.secagg import Dropouts, run_secagg

    n, d, bits = 14, 300, 10
    cfg = SecAggConfig(num_clients=n, threshold=8, bits=bits, vector_size=d, round_id=2)
    rng = np.random.default_rng(4)
    codes = {u: rng.integers(0, 1 << bits, d).astype(np.uint32) for u in range(n)}
    drops = Dropouts(
        before_advertise={0}, before_shares={3}, before_upload={5}, late_upload={8}, after_upload={11}
    )
    total, rep = run_secagg(codes, cfg, dropouts=drops, randbytes=np.random.default_rng(5).bytes)
    assert (
        rep.refused_late == [8] and rep.dropped == [5, 8] and 11 in rep.survivors and 11 not in rep.responders
    )
    assert rep.survivors == [u for u in range(n) if u not in (0, 3, 5, 8)]
    assert np.array_equal(total, sum(codes[u].astype(np.uint64) for u in rep.survivors))


def test_server_endpoint_checks_the_authenticated_sender_and_the_direction() -> None:
    from deltaplane.aggregation.secagg import DeviceEndpoint, RingEncoding, ServerEndpoint
    from deltaplane.errors import DecodeError

    cfg, _codes, _clients, _server = _setup()
    server = ServerEndpoint(cfg)
    dev = DeviceEndpoint(2, cfg, RingEncoding(bits=BITS))
    with pytest.raises(SecAggOrderError, match="client 3 sent a message signed as client 2"):
        server.receive(dev.advertise(), sender=3)
    assert server.receive(dev.advertise(), sender=2) == "AdvertiseKeys"
    with pytest.raises(DecodeError, match="sent by the server"):
        server.receive(UnmaskRequest(cfg.round_id, (), ()).to_bytes(), sender=2)
    with pytest.raises(SecAggOrderError, match="no update to mask"):
        dev.masked_input(ShareInbox(cfg.round_id, 2, {}).to_bytes())


def test_a_client_resumed_from_its_exported_state_finishes_the_round_exactly() -> None:
    cfg, codes, clients, server, out = _to_stage(Stage.MASKED)
    for u in range(N):
        server.receive_masked_input(out["masked"][u])
    req = server.unmask_request()
    for u in range(N):
        resumed = SecAggClient.restore(cfg, clients[u].export_state())
        assert resumed.stage == Stage.MASKED
        server.receive_unmask(resumed.unmask(req))
    assert np.array_equal(server.result(), sum(c.astype(np.uint64) for c in codes.values()))
    from deltaplane.errors import DecodeError

    with pytest.raises(DecodeError, match="malformed SecAgg client state"):
        SecAggClient.restore(cfg, b'{"client_id": 1}')


#: X25519 public keys of order 1, 2, 4 or 8 (cr.yp.to/ecdh.html, RFC 7748 §6.1), some non-canonical (u ≥ p):
#: every private key agrees on the all-zero secret with them
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 19 - 1).to_bytes(32, "little"),
    (2**255 - 19).to_bytes(32, "little"),
    (2**255 - 19 + 1).to_bytes(32, "little"),
]


@pytest.mark.parametrize("point", range(len(LOW_ORDER)))
@pytest.mark.parametrize("which", ["c", "s"])
def test_a_low_order_public_key_is_refused_by_the_server_and_by_every_device(point: int, which: str) -> None:
    """A malicious device advertising a low-order point made every neighbour's masking (and the server's
    unmasking) raise a bare ValueError: one device stopped the round for all. The server now refuses the
    advertisement (DecodeError, nothing stored), and a device handed such a key in a roster refuses the roster
    (SecAggError) without changing its state."""
    from deltaplane.errors import DecodeError

    low = LOW_ORDER[point]
    cfg, codes, clients, server, out = _to_stage(Stage.ADVERTISE)
    for u in range(N - 1):
        server.receive_keys(out["adv"][u])
    honest = out["adv"][N - 1]
    bad = AdvertiseKeys(
        cfg.round_id,
        N - 1,
        low if which == "c" else honest.c_public,
        low if which == "s" else honest.s_public,
    )
    before = _state(server)
    with pytest.raises(DecodeError, match="low-order"):
        server.receive_keys(bad)
    assert _same(before, _state(server))
    server.receive_keys(honest)  # the device may still advertise real keys

    # a server that forwards such a key anyway: the devices refuse it with a typed error, state unchanged
    keys = {u: (m.c_public, m.s_public) for u, m in out["adv"].items()}
    keys[N - 1] = (bad.c_public, bad.s_public)
    roster = KeyRoster(cfg.round_id, keys)
    c0 = clients[0]
    if which == "c":
        snapshot = c0.export_state()
        with pytest.raises(SecAggError, match="low-order"):
            c0.share_keys(roster)
        assert c0.stage == Stage.ADVERTISE and c0.export_state() == snapshot
        return
    server.roster()
    for u in range(N - 1):
        server.receive_shares(clients[u].share_keys(roster))  # the c keys are fine: sharing works
    server.close_shares()
    inbox = ShareInbox(cfg.round_id, 0, dict(server.inbox(0).ciphertexts))
    inbox.ciphertexts[N - 1] = next(iter(inbox.ciphertexts.values()))  # as if N-1 had shared too
    snapshot = c0.export_state()
    with pytest.raises(SecAggError, match="low-order"):
        c0.masked_input(inbox, codes[0])
    assert c0.stage == Stage.SHARE and c0.export_state() == snapshot


@pytest.mark.parametrize(
    ("n", "degree", "seed"), [(2, None, 0), (9, None, 3), (9, 2, 3), (40, 8, 11), (41, 40, 5)]
)
def test_a_device_builds_the_same_neighbourhood_as_the_server(n: int, degree: int | None, seed: int) -> None:
    from deltaplane.aggregation.secagg import neighbours

    cfg = SecAggConfig(
        num_clients=n,
        threshold=((degree or n - 1) + 1) // 2 + 1,
        bits=4,
        vector_size=3,
        neighbours=degree,
        graph_seed=seed,
    )
    graph = neighbours(cfg)
    assert sorted(graph) == list(range(n))
    for u in range(n):
        assert SecAggClient(u, cfg)._graph == graph[u]
        assert all(u in graph[v] for v in graph[u]) and u not in graph[u]  # undirected, no loops


def test_a_device_invited_to_a_large_round_does_not_build_everyones_neighbourhood() -> None:
    """A device built the whole communication graph to read its own row: O(clients²) memory for the complete
    graph (~0.6 GB at 3,000 clients), so a server inviting it to a large round could exhaust it. It now
    builds its own neighbourhood only."""
    import tracemalloc

    n = 2500
    cfg = SecAggConfig(num_clients=n, threshold=2 * n // 3 + 1, bits=8, vector_size=4, graph_seed=987_654)
    tracemalloc.start()
    try:
        client = SecAggClient(n - 1, cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert client._graph == frozenset(range(n - 1))
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB to set up one device"


def test_a_repeated_share_key_is_refused_by_the_server_not_by_every_device() -> None:
    """Devices refuse a roster that repeats a share-encryption key. The server accepted a second device
    advertising another's key, so two colluding devices made every honest device of their neighbourhoods
    refuse the roster: the round died. The server now refuses the repeat (SecAggError, nothing stored) and
    the honest devices share as usual."""
    cfg, _codes, clients, server, out = _to_stage(Stage.ADVERTISE)
    for u in range(N - 1):
        server.receive_keys(out["adv"][u])
    copy = AdvertiseKeys(cfg.round_id, N - 1, out["adv"][0].c_public, out["adv"][N - 1].s_public)
    before = _state(server)
    with pytest.raises(SecAggError, match="client 0 already advertised"):
        server.receive_keys(copy)
    assert _same(before, _state(server))
    roster = server.roster()
    for u in range(N - 1):
        server.receive_shares(clients[u].share_keys(roster))
    server.close_shares()  # N - 1 devices shared: above the threshold, the round goes on


def test_a_device_checks_an_update_shape_and_weight_against_the_round_before_it_has_one() -> None:
    """A device can refuse a round before it trains: ``check_update`` on zeros shaped like its update says
    whether the round's vector is that size and a weighted ring carries its example count (the count sits in one
    ``bits``-bit slot); ``set_update`` refuses the same updates with the same messages, as it did on its own."""
    import torch

    from deltaplane.aggregation.secagg import DeviceEndpoint, RingEncoding
    from deltaplane.delta import Delta

    cfg = SecAggConfig(num_clients=N, threshold=4, bits=BITS, vector_size=D + 1, round_id=7)
    fits, short = Delta({"w": torch.zeros(D)}), Delta({"w": torch.zeros(D - 1)})
    dev = DeviceEndpoint(0, cfg, RingEncoding(bits=BITS, weight_scale=10.0))
    dev.check_update(fits, 255)  # 255 < 2^8: fits the weight slot
    rng = np.random.default_rng(0)
    for like, weight, named in [
        (short, 3, "update has 39 values; the round expects 40"),
        (fits, 256, "Found 256"),
    ]:
        with pytest.raises(SecAggError, match=named):
            dev.check_update(like, weight)
        with pytest.raises(SecAggError, match=named):
            dev.set_update(like, weight, rng)
    DeviceEndpoint(0, cfg, RingEncoding(bits=BITS)).check_update(fits, 10**6)  # unweighted: any count
