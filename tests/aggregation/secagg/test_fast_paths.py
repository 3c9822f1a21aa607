"""The vectorized SecAgg paths (issue #16, part 5) against simple references, and the version-4 mask layout.

* ring packing == a bit-by-bit reference and the bit-plane packer it replaced; the 9-15-bit lane packer on every
  length (whole groups and a ragged last group), values taken modulo 2^bits, unpacked into uint16 or uint32 sums;
* ``add_masks`` (every keystream a block at a time, reduced once) == the sum of the masks expanded one by one;
* the keystream layout of version 4: 64-bit words of AES-128-CTR of a 16-byte key, pinned by FIPS-197's known
  answer and checked against ``cryptography``'s AES-128 directly; a key of another length is refused;
* lane words (the masks' group since version 4) == a plain-Python reference for every ring width, their wire
  bytes == the values packed bit by bit, so uploads keep the additive-masking size;
* exact integer sums with dropouts at every stage, for 8, 4 and 2 lanes per word, complete graph and SecAgg+,
  and on extreme inputs (all zeros, all the largest code) for 100 clients; versions 1-3 are refused, not summed;
* Shamir: the lazily reduced Horner split == Horner reduced at every step, and Lagrange coefficients with one
  inversion == one inversion per point (the textbook formula), on small and huge points and thresholds.
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from deltaplane.aggregation.secagg import (
    Dropouts,
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    pack,
    ring,
    run_secagg,
    shamir,
    unpack,
)
from deltaplane.aggregation.secagg.errors import SecAggError
from deltaplane.aggregation.secagg.messages import decode_message
from deltaplane.aggregation.secagg.prg import add_masks, expand_mask
from deltaplane.aggregation.secagg.ring import from_words, pack_words, to_words, unpack_words, word_moduli
from deltaplane.errors import DecodeError, DeltaplaneError


def _ref_pack(values: np.ndarray, bits: int) -> bytes:
    """Bit ``b`` of value ``i`` is bit ``i · bits + b`` of a little-endian bit stream."""
    planes = (values.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


@pytest.mark.parametrize("bits", range(1, 33))
def test_ring_packing_is_the_little_endian_bit_stream(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 9, 63, 64, 1001, 4096):
        v = rng.integers(0, 1 << bits, n, dtype=np.uint64).astype(np.uint32)
        data = pack(v, bits)
        assert data == _ref_pack(v, bits), n
        if bits <= 16:
            assert pack(v.astype(np.uint16), bits) == data  # the device packs its uint16 masked vector
        high = (rng.integers(0, 1 << 32, n, dtype=np.uint64) << np.uint64(bits)) % (1 << 32)
        assert pack((v | high).astype(np.uint32), bits) == data, n  # taken modulo 2^bits
        assert np.array_equal(unpack(data, bits, n), v), n
        acc = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
        want = acc + v  # wraps mod 2^32
        assert np.array_equal(unpack(data, bits, n, add_to=acc), want), n
    with pytest.raises(DecodeError, match="expected"):
        unpack(b"\0" * 3, bits, 100)


def _bit_by_bit_pack(values: list[int], bits: int) -> bytes:
    """The plainest reference: bit ``b`` of value ``i`` goes to bit ``(i · bits + b) mod 8`` of byte ``…// 8``."""
    out = bytearray((len(values) * bits + 7) // 8)
    for i, x in enumerate(values):
        for b in range(bits):
            if x >> b & 1:
                pos = i * bits + b
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", [9, 10, 11, 12, 13, 14, 15])
def test_lane_packing_of_9_to_15_bits_is_bit_by_bit_exact_on_every_length(bits: int) -> None:
    rng = np.random.default_rng(100 + bits)
    for n in [*range(1, 42), 199]:  # whole groups of 8, a ragged last group, and a group alone
        v = rng.integers(0, 1 << 16, n).astype(np.uint16)  # the device's wrapped uint16 sum: reduced by pack
        low = [int(x) % (1 << bits) for x in v]
        data = pack(v, bits)
        assert data == _bit_by_bit_pack(low, bits), n
        assert pack(v.astype(np.uint32), bits) == data, n
        assert unpack(data, bits, n).tolist() == low, n
        acc16 = rng.integers(0, 1 << 16, n).astype(np.uint16)
        want = [(int(a) + x) % (1 << 16) for a, x in zip(acc16, low, strict=True)]
        assert unpack(data, bits, n, add_to=acc16).tolist() == want, n  # the server's sum in mask words
    with pytest.raises(DecodeError, match="uint16 for rings of at most 16 bits"):
        unpack(pack(np.zeros(8, np.uint16), 20), 20, 8, add_to=np.zeros(8, np.uint16))


def _keystream_words(key: bytes, n: int) -> np.ndarray:
    enc = Cipher(algorithms.AES128(key), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)) + enc.finalize(), dtype="<u8").astype(np.uint64)


def test_mask_layout_of_version_4_is_aes_128_ctr_in_64_bit_words() -> None:
    # FIPS-197: AES-128 of the zero block under the zero key (the first CTR block with a zero counter)
    first = bytes.fromhex("66e94bd4ef8a2c3b884cfa59ca342b2e")
    assert expand_mask(bytes(16), 2).tolist() == [
        int.from_bytes(first[:8], "little"),
        int.from_bytes(first[8:], "little"),
    ]
    key = bytes(range(16))
    assert np.array_equal(expand_mask(key, 1000), _keystream_words(key, 1000))
    for wrong in (bytes(32), bytes(24)):  # AES-256 / AES-192 keys would expand other masks
        with pytest.raises(SecAggError, match="16 bytes"):
            expand_mask(wrong, 8)
        with pytest.raises(SecAggError, match="16 bytes"):
            add_masks(np.zeros(8, np.uint64), [(wrong, 1)])
    with pytest.raises(SecAggError, match="uint64"):
        add_masks(np.zeros(8, np.uint16), [(key, 1)])


@pytest.mark.parametrize("n", [1, 1000, 70_001])  # one step of add_masks and several, with a ragged end
def test_add_masks_equals_adding_expanded_masks_one_by_one(n: int) -> None:
    rng = np.random.default_rng(n)
    masks = [(rng.bytes(16), int(rng.choice([-1, 1]))) for _ in range(7)]
    start = rng.integers(0, 1 << 64, n, dtype=np.uint64)
    want = [int(x) for x in start]
    for key, sign in masks:
        want = [(w + sign * int(m)) % (1 << 64) for w, m in zip(want, expand_mask(key, n), strict=True)]
    acc = start.copy()
    add_masks(acc, masks)
    assert acc.tolist() == want


def _ref_words(values: list[int], k: int) -> list[int]:
    """Plain Python: ``L`` values per word, value ``L·i + j`` at bit ``k·j`` of word ``i``."""
    lanes = 8 if k <= 8 else 4 if k <= 16 else 2
    return [
        sum(v << (k * j) for j, v in enumerate(values[i : i + lanes])) for i in range(0, len(values), lanes)
    ]


@pytest.mark.parametrize("k", range(2, 33))
def test_lane_words_are_the_ring_bit_stream_for_every_ring_width(k: int) -> None:
    """Every ring width (2..32 bits: 8, 4 or 2 lanes per word, whole-byte, half-byte and odd word widths):
    words == a plain-Python reference; their wire bytes == the values bit by bit (the additive-masking limit),
    whatever bits a device's wrapping sum holds above each word's width; read back they add exactly."""
    rng = np.random.default_rng(300 + k)
    for n in [*range(1, 20), 63, 1001]:
        values = rng.integers(0, 1 << k, n, dtype=np.uint64)
        words = to_words(values.astype(np.uint32), k)
        ref = _ref_words([int(v) for v in values], k)
        assert words.tolist() == ref, n
        assert from_words(words, k, n).tolist() == values.tolist(), n
        full, last = word_moduli(n, k)
        noisy = words.copy()  # the device's sum wraps modulo 2^64: bits above each word's group are noise
        noise = rng.integers(0, 1 << 64, len(words), dtype=np.uint64)
        noisy[:-1] |= noise[:-1] & np.uint64(~full & (1 << 64) - 1)
        noisy[-1] |= noise[-1] & np.uint64(~last & (1 << 64) - 1)
        data = pack_words(noisy, k, n)
        assert data == _bit_by_bit_pack([int(v) for v in values], k) == pack(values.astype(np.uint32), k), n
        acc = rng.integers(0, 1 << 64, len(words), dtype=np.uint64)
        want = [(int(a) + w) % (1 << 64) for a, w in zip(acc, ref, strict=True)]
        assert unpack_words(data, k, n, acc).tolist() == want, n
        with pytest.raises(DecodeError, match="expected"):
            unpack_words(bytes(data) + b"\0", k, n, acc)
        with pytest.raises(DecodeError, match="expected"):
            unpack_words(data[:-1], k, n, acc)
    with pytest.raises(DecodeError, match="uint64"):
        unpack_words(pack(np.zeros(8, np.uint32), k), k, 8, np.zeros(8, np.uint16))


@pytest.mark.parametrize("bits", [1, 8, 15, 16, 25])
def test_100_clients_extreme_inputs_sum_exactly_with_and_without_dropouts(bits: int) -> None:
    """All zeros, all the largest code (the ring's lane sums reach their top: the carries that must never
    cross a lane), and random codes: the unmasked sum equals the plaintext integer sum, computed independently,
    when every device uploads and when 10 drop before uploading (their masks rebuilt from shares)."""
    n, d = 100, 1003  # a ragged last word for every lane count
    cfg = SecAggConfig(num_clients=n, threshold=11, bits=bits, vector_size=d, neighbours=20)
    top = (1 << bits) - 1
    rng = np.random.default_rng(bits)
    cases = {
        "zeros": {u: np.zeros(d, np.uint32) for u in range(n)},
        "max": {u: np.full(d, top, np.uint32) for u in range(n)},
        "random": {u: rng.integers(0, top + 1, d).astype(np.uint32) for u in range(n)},
    }
    dropped = set(rng.choice(n, 10, replace=False).tolist())  # every neighbourhood of 21 keeps 11
    for name, codes in cases.items():
        for drop in (set(), dropped):
            total, rep = run_secagg(codes, cfg, drop_before_upload=drop, randbytes=rng.bytes)
            assert rep.survivors == [u for u in range(n) if u not in drop]
            want = [sum(int(codes[u][i]) for u in rep.survivors) for i in range(d)]
            assert total.dtype == np.uint64 and total.tolist() == want, (name, len(drop))


@pytest.mark.parametrize(
    ("bits", "n", "neighbours"), [(8, 40, None), (8, 40, 10), (12, 40, None), (14, 40, 10)]
)
def test_exact_sums_with_dropouts_at_every_stage_for_several_lane_counts(
    bits: int, n: int, neighbours
) -> None:
    d = 5003
    group = (neighbours if neighbours is not None else n - 1) + 1
    cfg = SecAggConfig(
        num_clients=n, threshold=group // 2 + 1, bits=bits, vector_size=d, neighbours=neighbours
    )
    rng = np.random.default_rng(bits * 100 + n)
    codes = {u: rng.integers(0, 1 << bits, d).astype(np.uint32) for u in range(n)}
    drops = Dropouts(
        before_advertise={0}, before_shares={3}, before_upload={5, 6}, late_upload={8}, after_upload={11}
    )
    total, rep = run_secagg(codes, cfg, dropouts=drops, randbytes=np.random.default_rng(9).bytes)
    assert rep.survivors == [u for u in range(n) if u not in (0, 3, 5, 6, 8)]
    assert 11 in rep.survivors and 11 not in rep.responders and rep.refused_late == [8]
    assert np.array_equal(total, sum(codes[u].astype(np.uint64) for u in rep.survivors))


def test_masked_input_size_and_versions_1_to_4_are_refused() -> None:
    cfg = SecAggConfig(num_clients=100, threshold=11, bits=8, vector_size=1001, neighbours=20)
    msg = MaskedInput(0, 3, bytes(cfg.packed_bytes))
    data = msg.to_bytes()
    assert len(data) == msg.wire_size() == 10 + 4 + -(-1001 * 15 // 8)  # the additive-masking limit
    assert decode_message(data, cfg) == msg
    assert data[4] == 5
    # 2: AES-256 masks, 3: value-by-value masks; their masked inputs would unmask to garbage, so are refused;
    # 4: no authenticated rounds (test_version.py)
    for old in (1, 2, 3, 4):
        with pytest.raises(DecodeError, match=f"version {old} is not supported.*upgrade it"):
            decode_message(data[:4] + bytes([old]) + data[5:], cfg)
    for size in (cfg.packed_bytes - 1, cfg.packed_bytes + 1):  # one byte short or over: refused, not summed
        with pytest.raises(DecodeError):
            decode_message(MaskedInput(0, 3, bytes(size)).to_bytes(), cfg)


def test_an_out_of_range_input_is_refused_and_changes_nothing() -> None:
    """A code at 2^bits (in the last block of a long input, where the range is checked as it is read) or a
    negative one would spill into the next lane of its word: refused before the device stores anything."""
    d = 200_001
    cfg = SecAggConfig(num_clients=3, threshold=2, bits=8, vector_size=d)
    server = SecAggServer(cfg)
    clients = [SecAggClient(u, cfg) for u in range(3)]
    for c in clients:
        server.receive_keys(c.advertise_keys())
    roster = server.roster()
    for c in clients:
        server.receive_shares(c.share_keys(roster))
    server.close_shares()
    before = clients[0].export_state()
    high = np.zeros(d, np.uint32)
    high[-1] = 256
    negative = np.zeros(d, np.int64)
    negative[7] = -1
    for bad in (high, negative, high.astype(np.float64)):
        with pytest.raises(SecAggError, match=r"integer codes in \[0, 2\^8\)"):
            clients[0].masked_input(server.inbox(0), bad)
        assert clients[0].export_state() == before
    high[-1] = 255
    server.receive_masked_input(clients[0].masked_input(server.inbox(0), high))  # the top code is fine


def _ref_split(secret: bytes, threshold: int, xs: list[int], pool: bytes) -> dict[int, int]:
    """Textbook Shamir: coefficients from ``pool`` as :func:`shamir.split` draws them, Horner mod p every step."""
    size, p = shamir.SHARE_BYTES, shamir.PRIME
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [int.from_bytes(pool[i : i + size], "big") % p for i in range(0, len(pool), size)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % p
        out[x] = y
    return out


def _ref_lagrange(xs: list[int], at: int) -> dict[int, int]:
    """Textbook Lagrange coefficients modulo p: one modular inversion per point."""
    p, lam = shamir.PRIME, {}
    for j in xs:
        num = den = 1
        for m in xs:
            if m != j:
                num, den = num * (m - at) % p, den * (m - j) % p
        lam[j] = num * pow(den, -1, p) % p
    return lam


_POINT_SETS = [
    [1, 2],
    [3, 1, 2],
    list(range(1, 22)),
    [5, 17, 33, 48, 51, 60, 72, 90, 99, 100, 101],
    list(range(1, 201, 3)),
    [2**32 - 1, 7, 2**31, 12345],  # large points, still reduced lazily
    [shamir.PRIME - 1, shamir.PRIME - 2, 2**600, 9],  # beyond the prime, and equal to -1, -2 mod p
    [2**600 + i for i in range(5)],  # thresholds 2-3 reduce lazily, 5 at every step
]


@pytest.mark.parametrize("xs", _POINT_SETS)
def test_shamir_split_with_lazy_reduction_equals_reducing_every_step(xs: list[int]) -> None:
    rng = np.random.default_rng(len(xs))
    for threshold in sorted({1, 2, len(xs) // 2 + 1, len(xs)}):
        secret = rng.bytes(32)
        pool = rng.bytes(shamir.SHARE_BYTES * (threshold - 1))
        got = shamir.split(secret, threshold=threshold, xs=xs, randbytes=lambda n, pool=pool: pool[:n])
        assert got == _ref_split(secret, threshold, xs, pool)
        assert shamir.combine(dict(list(got.items())[:threshold]), threshold=threshold) == secret


@pytest.mark.parametrize("xs", _POINT_SETS)
def test_lagrange_with_one_inversion_equals_one_inversion_per_point(xs: list[int]) -> None:
    others = [0, 1, -3, max(xs) + 1, 2**40 + 3, shamir.PRIME + 5, *xs[:1]]  # at a share point itself, too
    for at in others:
        want = _ref_lagrange(xs, at) if at not in xs else {j: int(j == at) for j in xs}
        assert shamir.lagrange_at(xs, at) == want, at
    # and the coefficients interpolate: a random polynomial through the points, evaluated anywhere
    p, rng = shamir.PRIME, np.random.default_rng(7)
    coeffs = [int.from_bytes(rng.bytes(64), "big") % p for _ in xs]
    f = {x: sum(c * pow(x, i, p) for i, c in enumerate(coeffs)) % p for x in [*xs, 0, 12345]}
    for at in (0, 12345):
        assert sum(lam * f[x] for x, lam in shamir.lagrange_at(xs, at).items()) % p == f[at]


def test_lagrange_refuses_repeated_points() -> None:
    with pytest.raises(DeltaplaneError, match="distinct"):
        shamir.lagrange_at([1, 2, 2], 0)
    with pytest.raises(DeltaplaneError, match="distinct"):
        shamir.lagrange_at([1, 1 + shamir.PRIME], 0)


@pytest.mark.parametrize("k", [7, 8, 12, 15, 16, 20, 31])
def test_lane_words_over_several_blocks_and_the_range_check_in_the_last(k: int) -> None:
    """Across :func:`to_words`' cache-sized blocks (3 and a bit): the words == a per-lane numpy reference, and
    a value out of range in the last block is caught; a dtype that cannot exceed the bound needs no check."""
    lanes = 8 if k <= 8 else 4 if k <= 16 else 2
    n = 3 * ring._WORDS_BLOCK + 13
    values = np.random.default_rng(k).integers(0, 1 << k, n, dtype=np.uint64).astype(np.uint32)
    padded = np.zeros(-(-n // lanes) * lanes, np.uint64)
    padded[:n] = values
    ref = np.zeros(len(padded) // lanes, np.uint64)
    for j in range(lanes):
        ref |= padded[j::lanes] << np.uint64(k * j)
    assert np.array_equal(to_words(values, k, below=1 << k), ref)
    bad = values.copy()
    bad[-1] = 1 << k
    with pytest.raises(ValueError, match="not below"):
        to_words(bad, k, below=1 << k)
    if k >= 8:  # uint8 codes are all below 2^8: same words, no check needed
        small = (values & 0xFF).astype(np.uint8)
        assert np.array_equal(to_words(small, k, below=256), to_words(small.astype(np.uint32), k))
