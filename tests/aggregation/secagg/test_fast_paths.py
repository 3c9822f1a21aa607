"""The vectorized SecAgg paths (issue #16, part 5) against simple references, and the version-3 mask layout.

* ring packing == a bit-by-bit reference and the bit-plane packer it replaced; the 9-15-bit lane packer on every
  length (whole groups and a ragged last group), values taken modulo 2^bits, unpacked into uint16 or uint32 sums;
* ``add_masks`` (every keystream a block at a time, reduced once) == the sum of the masks expanded one by one;
* the keystream layout of version 3: AES-128-CTR of a 16-byte key, pinned by FIPS-197's known answer and
  checked against ``cryptography``'s AES-128 directly; a key of another length is refused;
* exact integer sums with dropouts at every stage, for rings of at most 16 bits (16-bit mask words) and wider
  ones (32-bit words), complete graph and SecAgg+; version-1 and version-2 messages are refused, not summed.
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from deltaplane.aggregation.secagg import Dropouts, MaskedInput, SecAggConfig, pack, run_secagg, unpack
from deltaplane.aggregation.secagg.errors import SecAggError
from deltaplane.aggregation.secagg.messages import decode_message
from deltaplane.aggregation.secagg.prg import add_masks, expand_mask, mask_word_bits
from deltaplane.errors import DecodeError


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


def _keystream_words(key: bytes, n: int, width: int) -> np.ndarray:
    enc = Cipher(algorithms.AES128(key), modes.CTR(b"\0" * 16)).encryptor()
    raw = enc.update(bytes(n * width // 8)) + enc.finalize()
    return np.frombuffer(raw, dtype=f"<u{width // 8}").astype(np.uint64)


def test_mask_layout_of_version_3_is_aes_128_ctr() -> None:
    # FIPS-197: AES-128 of the zero block under the zero key (the first CTR block with a zero counter)
    first = bytes.fromhex("66e94bd4ef8a2c3b884cfa59ca342b2e")
    assert expand_mask(bytes(16), 8, 15)[0] == int.from_bytes(first[:2], "little") & 0x7FFF
    assert expand_mask(bytes(16), 8, 20)[0] == int.from_bytes(first[:4], "little") & 0xFFFFF
    key = bytes(range(16))
    for bits in (1, 8, 15, 16, 17, 24, 31, 32):
        width = mask_word_bits(bits)
        assert width == (16 if bits <= 16 else 32)
        want = _keystream_words(key, 1000, width) & np.uint64((1 << bits) - 1)
        assert np.array_equal(expand_mask(key, 1000, bits), want.astype(np.uint32))
    for wrong in (bytes(32), bytes(24)):  # AES-256 / AES-192 keys would expand other masks
        with pytest.raises(SecAggError, match="16 bytes"):
            expand_mask(wrong, 8, 15)
        with pytest.raises(SecAggError, match="16 bytes"):
            add_masks(np.zeros(8, np.uint16), [(wrong, 1)], 15)


@pytest.mark.parametrize("bits", [12, 15, 16, 20, 32])
@pytest.mark.parametrize("n", [1, 1000, 70_001])  # one step of add_masks and several, with a ragged end
def test_add_masks_equals_adding_expanded_masks_one_by_one(bits: int, n: int) -> None:
    rng = np.random.default_rng(n + bits)
    masks = [(rng.bytes(16), int(rng.choice([-1, 1]))) for _ in range(7)]
    start = rng.integers(0, 1 << bits, n).astype(np.uint32)
    want = start.astype(np.int64)
    for key, sign in masks:
        want += sign * expand_mask(key, n, bits).astype(np.int64)
    want %= 1 << bits
    for dtype in (np.uint16, np.uint32) if bits <= 16 else (np.uint32,):
        acc = start.astype(dtype)
        add_masks(acc, masks, bits)
        assert np.array_equal(acc.astype(np.int64) % (1 << bits), want), dtype


@pytest.mark.parametrize(
    ("bits", "n", "neighbours"), [(8, 40, None), (8, 40, 10), (12, 40, None), (14, 40, 10)]
)
def test_exact_sums_with_dropouts_at_every_stage_for_both_mask_widths(bits: int, n: int, neighbours) -> None:
    d = 5003
    group = (neighbours if neighbours is not None else n - 1) + 1
    cfg = SecAggConfig(
        num_clients=n, threshold=group // 2 + 1, bits=bits, vector_size=d, neighbours=neighbours
    )
    assert mask_word_bits(cfg.ring_bits) == (16 if bits + 6 <= 16 else 32)
    rng = np.random.default_rng(bits * 100 + n)
    codes = {u: rng.integers(0, 1 << bits, d).astype(np.uint32) for u in range(n)}
    drops = Dropouts(
        before_advertise={0}, before_shares={3}, before_upload={5, 6}, late_upload={8}, after_upload={11}
    )
    total, rep = run_secagg(codes, cfg, dropouts=drops, randbytes=np.random.default_rng(9).bytes)
    assert rep.survivors == [u for u in range(n) if u not in (0, 3, 5, 6, 8)]
    assert 11 in rep.survivors and 11 not in rep.responders and rep.refused_late == [8]
    assert np.array_equal(total, sum(codes[u].astype(np.uint64) for u in rep.survivors))


def test_masked_input_size_and_version_1_and_2_messages_are_refused() -> None:
    cfg = SecAggConfig(num_clients=100, threshold=11, bits=8, vector_size=1001, neighbours=20)
    msg = MaskedInput(0, 3, bytes(cfg.packed_bytes))
    data = msg.to_bytes()
    assert len(data) == msg.wire_size() == 10 + 4 + -(-1001 * 15 // 8)  # the additive-masking limit
    assert decode_message(data, cfg) == msg
    for old in (1, 2):  # 2: AES-256 masks; its masked inputs would unmask to garbage, so they are refused
        with pytest.raises(DecodeError, match=f"version {old} is not supported"):
            decode_message(data[:4] + bytes([old]) + data[5:], cfg)
