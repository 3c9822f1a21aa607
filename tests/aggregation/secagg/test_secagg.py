import secrets

import numpy as np
import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation.secagg import (
    RingEncoding,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    UnmaskRequest,
    UnmaskResponse,
    pack,
    run_secagg,
    secure_mean,
    shamir,
    unpack,
)


def _codes(n: int, d: int, bits: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 1 << bits, d).astype(np.uint32) for u in range(n)}


@pytest.mark.parametrize("neighbours", [None, 8])
def test_exact_integer_sum_with_dropouts_before_and_after_upload(neighbours) -> None:
    n, d, bits = 20, 257, 12
    cfg = SecAggConfig(num_clients=n, threshold=(neighbours or n - 1) // 2 + 2 if neighbours else 11,
                       bits=bits, vector_size=d, neighbours=neighbours)  # fmt: skip
    codes = _codes(n, d, bits)
    before, after = {2}, {5, 11}
    total, rep = run_secagg(codes, cfg, drop_before_upload=before, drop_after_upload=after,
                            randbytes=np.random.default_rng(1).bytes)  # fmt: skip
    assert rep.dropped == [2] and 5 in rep.survivors and 5 not in rep.responders
    expected = sum(codes[u].astype(np.uint64) for u in range(n) if u not in before)
    assert np.array_equal(total, expected)  # exact, in the integer domain


def _round_to_masked(n: int, d: int, bits: int, seed: int = 0, threshold: int = 4):
    cfg = SecAggConfig(num_clients=n, threshold=threshold, bits=bits, vector_size=d)
    codes = _codes(n, d, bits, seed=seed)
    clients = {u: SecAggClient(u, cfg) for u in range(n)}
    server = SecAggServer(cfg)
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    roster = server.roster()
    for c in clients.values():
        server.receive_shares(c.share_keys(roster))
    server.close_shares()
    return cfg, codes, clients, server


def test_server_never_holds_an_individual_unmasked_update() -> None:
    n, d, bits = 6, 64, 8
    cfg, codes, clients, server = _round_to_masked(n, d, bits, seed=3)
    seen_payloads: list[tuple[int, bytes]] = []
    for u, c in clients.items():
        msg = c.masked_input(server.inbox(u), codes[u])
        seen_payloads.append((u, msg.packed))
        server.receive_masked_input(msg)
    req = server.unmask_request()
    for u in req.survivors:
        server.receive_unmask(clients[u].unmask(req))
    total = server.result()
    assert np.array_equal(total, sum(c.astype(np.uint64) for c in codes.values()))

    # 1. what the server received per client is masked: no relation to the plaintext codes
    k = cfg.ring_bits
    for u, payload in seen_payloads:
        y = unpack(payload, k, d)
        assert np.mean(y == codes[u]) < 0.05
        assert y.mean() > (1 << k) / 4  # masks spread values over the whole 2^k ring, codes sit below 2^8
    # 2. nothing the server object holds equals any client's plaintext, as array or as packed bytes
    plain_arrays = list(codes.values())
    plain_bytes = {pack(c, k) for c in plain_arrays} | {c.astype(np.uint8).tobytes() for c in plain_arrays}

    def walk(obj, depth=0):
        if depth > 6:
            return
        if isinstance(obj, np.ndarray):
            for c in plain_arrays:
                assert not (obj.shape == c.shape and np.array_equal(obj.astype(np.uint64), c)), (
                    "plaintext held"
                )
        elif isinstance(obj, bytes | bytearray):
            assert bytes(obj) not in plain_bytes
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, list | tuple | set | frozenset):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v, depth + 1)

    walk(server)
    # 3. the shares the server got are only self-mask shares of survivors (never a mask key): it cannot
    # rebuild anyone's pairwise masks, so it cannot peel a single client's input out of its upload
    assert all(set(sh) <= set(req.survivors) for sh in server.responses.values())


def test_clients_refuse_to_reveal_both_secrets_of_a_client() -> None:
    n = 5
    _cfg, codes, clients, server = _round_to_masked(n, 8, 4, threshold=3)
    for u, c in clients.items():
        server.receive_masked_input(c.masked_input(server.inbox(u), codes[u]))
    with pytest.raises(SecAggError, match="listed as both"):
        clients[0].unmask(UnmaskRequest(0, (0, 1, 2, 3), (3,)))
    clients[0].unmask(UnmaskRequest(0, (0, 1, 2, 3, 4), ()))  # honest request: self-mask shares of all five
    with pytest.raises(SecAggError, match="both secrets of client 4"):
        clients[0].unmask(UnmaskRequest(0, (0, 1, 2, 3), (4,)))  # a later request for 4's mask key is refused


def test_too_many_dropouts_abort_instead_of_leaking() -> None:
    cfg = SecAggConfig(num_clients=6, threshold=4, bits=4, vector_size=8)
    with pytest.raises(SecAggError, match="threshold"):
        run_secagg(_codes(6, 8, 4), cfg, drop_before_upload={0, 1, 2})


def test_shamir_round_trip_and_threshold() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    assert shamir.combine({x: shares[x] for x in (2, 4, 5)}, threshold=3) == secret
    with pytest.raises(dp.DeltaplaneError, match="cannot recover"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3)
    # t-1 shares are consistent with any secret: interpolating 2 shares + a fake third gives garbage
    assert shamir.combine({1: shares[1], 2: shares[2], 3: shares[3] ^ 1}, threshold=3, size=66) != secret


def test_config_validation_and_upload_overhead() -> None:
    with pytest.raises(dp.ConfigError, match="threshold must be in"):
        SecAggConfig(num_clients=10, threshold=3, bits=8, vector_size=4)
    with pytest.raises(dp.ConfigError, match="34-bit ring"):
        SecAggConfig(num_clients=1000, threshold=600, bits=24, vector_size=4)
    n, d, bits = 10, 20_000, 8
    cfg = SecAggConfig(num_clients=n, threshold=6, bits=bits, vector_size=d)
    _, rep = run_secagg(_codes(n, d, bits), cfg)
    assert rep.ring_bits == 12
    # exact wire bytes: keys (4 + 2·32) + 9 encrypted share pairs (4 + 12 nonce + 2·66 + 16 tag)
    # + the masked vector at 12 bits (30,000) + 10 unmask shares (4 + 66)
    # exact wire bytes, each message with its 10-byte header: keys (4 + 2·32), shares (4 + 4 + 9 × (4 + 160)),
    # the masked vector (4 + 20,000 × 12 bits = 30,000), unmasking (4 + 4 + 10 × (4 + 66))
    per_client = (10 + 68) + (10 + 8 + 9 * 164) + (10 + 4 + 30_000) + (10 + 8 + 10 * 70)
    assert set(rep.upload_bytes.values()) == {per_client}
    assert rep.overhead(bits, d) == pytest.approx(per_client / 20_000)


def test_secure_mean_of_deltas_is_close_to_the_plain_mean() -> None:
    g = torch.Generator().manual_seed(0)
    deltas = [dp.Delta({"w": 0.1 * torch.randn(30, 20, generator=g), "b": 0.1 * torch.randn(20, generator=g)})
              for _ in range(8)]  # fmt: skip
    mean, _ = secure_mean(deltas, bits=16, clip_range=1.0, drop_before_upload={3}, seed=0)
    plain = dp.FedAvg()
    for i, d in enumerate(deltas):
        if i != 3:
            plain.add(d)
    ref = plain.result()
    step = 2.0 / (2**16 - 1)
    for k in ("w", "b"):
        assert (mean[k] - ref[k]).abs().max() < step  # within one quantization step
    again, _ = secure_mean(deltas, bits=16, clip_range=1.0, drop_before_upload={3}, seed=0)
    assert torch.equal(mean["w"], again["w"])


def test_a_seeded_rounds_public_config_does_not_carry_the_seed_of_its_secrets(monkeypatch) -> None:
    """secure_mean(seed=s) seeds every device's secrets with s and used s itself as the config's graph seed,
    which every party receives: whoever held the config could regenerate each device's keys (the first
    32 bytes of ``default_rng(s)`` are device 0's first secret). The graph seed is now derived one-way."""
    from deltaplane.aggregation.secagg import session

    seen: list = []
    real = session.ServerEndpoint.__init__

    def keep(self, config, *args, **kwargs):
        seen.append(config)
        real(self, config, *args, **kwargs)

    monkeypatch.setattr(session.ServerEndpoint, "__init__", keep)
    deltas = [dp.Delta({"w": torch.full((6,), 0.01 * i)}) for i in range(5)]
    for seed in (0, 1, 12345):
        mean, _ = secure_mean(deltas, bits=16, clip_range=1.0, neighbours=2, seed=seed)
        assert seen[-1].graph_seed != seed
        assert torch.allclose(mean["w"], torch.full((6,), 0.02), atol=1e-4)  # the sum is still exact
    assert len({c.graph_seed for c in seen}) == 3


@pytest.mark.slow
def test_hundred_clients_thirty_percent_dropout_exact() -> None:
    n, d, bits = 100, 5_000, 8
    cfg = SecAggConfig(num_clients=n, threshold=51, bits=bits, vector_size=d)
    codes = _codes(n, d, bits, seed=9)
    drop = set(np.random.default_rng(7).choice(n, size=30, replace=False).tolist())
    total, rep = run_secagg(codes, cfg, drop_before_upload=drop, randbytes=np.random.default_rng(2).bytes)
    assert len(rep.survivors) == 70
    assert np.array_equal(total, sum(codes[u].astype(np.uint64) for u in range(n) if u not in drop))


def test_decode_sum_refuses_sums_no_honest_devices_can_produce() -> None:
    """decode_sum divided by the unmasked weight sum unchecked: a device that wrapped its slots got a
    ZeroDivisionError or a mean many times too large. Sums outside the honest range are refused now."""
    like = dp.Delta({"w": torch.zeros(3)})
    levels = (1 << 8) - 1
    weighted, plain = RingEncoding(bits=8, weight_scale=10.0), RingEncoding(bits=8)
    ok = np.array([levels, 0, 3 * levels // 2, 30], dtype=np.uint32)  # 3 devices, weights 10 each
    mean, w = weighted.decode_sum(ok, count=3, like=like)
    assert w == 30 and torch.allclose(mean["w"], torch.tensor([-1 / 3, -1.0, 0.0]), atol=1e-2)
    for weight in (0, 1, 2, 3 * levels + 1):  # below one example per device, or above the ring's codes
        with pytest.raises(SecAggError, match="weight sum"):
            weighted.decode_sum(np.array([0, 0, 0, weight], dtype=np.uint32), count=3, like=like)
    with pytest.raises(SecAggError, match="weight sum"):  # unweighted: each device's slot is exactly 1
        plain.decode_sum(np.array([0, 0, 0, 4], dtype=np.uint32), count=3, like=like)
    with pytest.raises(SecAggError, match="value sum"):
        plain.decode_sum(np.array([0, 3 * levels + 1, 0, 3], dtype=np.uint32), count=3, like=like)
    assert plain.decode_sum(np.array([0, 3 * levels, 0, 3], dtype=np.uint32), count=3, like=like)[1] == 3


@pytest.mark.parametrize("liar", [0, 2, 3])  # among the shares combined (0, 2) or the extra one (3)
def test_a_corrupted_unmasking_share_is_refused_not_summed(liar) -> None:
    """A survivor that shifted its share of another client's self-mask seed made result() return a wrong sum
    with no error (the seed still decoded to 32 bytes). With more than t shares the extra one must lie on the
    polynomial the others define: any single corrupted share now raises SecAggError instead."""
    n, d, bits = 5, 16, 8
    _, codes, clients, server = _round_to_masked(n, d, bits, seed=3, threshold=3)
    for u, c in clients.items():
        server.receive_masked_input(c.masked_input(server.inbox(u), codes[u]))
    request = server.unmask_request()
    for u in range(4):  # four answers, threshold 3: one more share than needed
        response = clients[u].unmask(request)
        if u == liar:  # malicious: shift its share of client 4's seed by one field element
            shares = dict(response.shares)
            shares[4] = shamir.share_to_bytes((shamir.share_from_bytes(shares[4]) + 1) % shamir.PRIME)
            response = UnmaskResponse(response.round_id, u, shares)
        server.receive_unmask(response)
    with pytest.raises(SecAggError, match="client 4's secret are inconsistent"):
        server.result()


def test_honest_unmasking_with_extra_shares_still_sums_exactly() -> None:
    n, d, bits = 6, 16, 8
    _, codes, clients, server = _round_to_masked(n, d, bits, seed=4, threshold=4)
    for u, c in clients.items():
        if u != 5:  # client 5 drops before uploading: its mask key is rebuilt from 5 shares
            server.receive_masked_input(c.masked_input(server.inbox(u), codes[u]))
    request = server.unmask_request()
    for u in range(5):
        server.receive_unmask(clients[u].unmask(request))
    expected = sum(codes[u].astype(np.uint64) for u in range(5))
    assert np.array_equal(server.result(), expected)
