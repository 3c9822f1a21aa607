import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaplane.codecs.entropy import (
    bitmap_decode,
    bitmap_encode,
    decode_indices,
    encode_indices,
    golomb_best_k,
    golomb_decode,
    golomb_encode,
    index_sizes,
    pack_bits,
    unpack_bits,
    varint_decode,
    varint_encode,
)
from deltaplane.errors import DecodeError


@given(bits=st.integers(1, 8), data=st.data())
@settings(max_examples=100, deadline=None)
def test_pack_bits_round_trip(bits: int, data) -> None:
    codes = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=300)), dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert len(packed) == (len(codes) * bits + 7) // 8
    assert np.array_equal(unpack_bits(packed, bits, len(codes)), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
def test_unpack_bits_refuses_nonzero_padding(bits: int) -> None:
    codes = np.arange(5, dtype=np.uint8) % (1 << bits)  # 5 codes never fill whole bytes at these widths
    packed = bytearray(pack_bits(codes, bits))
    assert np.array_equal(unpack_bits(bytes(packed), bits, 5), codes)
    packed[-1] |= 0x80  # a set bit past the last code
    with pytest.raises(DecodeError, match="padding bits"):
        unpack_bits(bytes(packed), bits, 5)


def test_unpack_bits_checks_length() -> None:
    with pytest.raises(DecodeError, match="expected 2"):
        unpack_bits(b"\x00", 4, 3)


@given(st.lists(st.integers(0, 2**35 - 1), max_size=200))
@settings(max_examples=100, deadline=None)
def test_varint_round_trip(values) -> None:
    v = np.array(values, dtype=np.int64)
    assert np.array_equal(varint_decode(varint_encode(v), len(v)), v)


def test_varint_exact_bytes_and_errors() -> None:
    assert varint_encode(np.array([0, 127, 128, 300])) == bytes([0, 127, 0x80, 1, 0xAC, 2])
    with pytest.raises(DecodeError, match="truncated"):
        varint_decode(bytes([0x80]), 1)
    with pytest.raises(DecodeError, match="holds 2 values"):
        varint_decode(bytes([1, 2]), 1)
    with pytest.raises(DecodeError, match="too long"):
        varint_decode(bytes([0x80] * 5 + [1]), 1)
    with pytest.raises(DecodeError, match="trailing"):
        varint_decode(b"\x01", 0)


def test_bitmap() -> None:
    idx = np.array([0, 3, 9])
    data = bitmap_encode(idx, 10)
    assert data == bytes([0b00001001, 0b00000010])
    assert np.array_equal(bitmap_decode(data, 10), idx)
    with pytest.raises(DecodeError, match="beyond"):
        bitmap_decode(bytes([0, 0b00000100]), 10)


@given(n=st.integers(1, 3000), data=st.data())
@settings(max_examples=100, deadline=None)
def test_index_coding_picks_cheapest_and_round_trips(n: int, data) -> None:
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))), dtype=np.int64)
    coder, payload = encode_indices(idx, n)
    assert len(payload) <= min(len(varint_encode(np.diff(idx, prepend=-1) - 1)), (n + 7) // 8)
    assert np.array_equal(decode_indices(coder, payload, n, len(idx)), idx)


def test_index_decoding_rejects_out_of_range() -> None:
    with pytest.raises(DecodeError, match="outside"):
        decode_indices("varint", varint_encode(np.array([0, 20])), 10, 2)
    with pytest.raises(DecodeError, match="unknown index coder"):
        decode_indices("gzip", b"", 10, 0)


# -- Golomb-Rice -------------------------------------------------------------------------------------------
def test_golomb_exact_bits() -> None:
    # k = 2: 5 -> q=1 r=1 ; 2 -> q=0 r=2 ; 9 -> q=2 r=1
    data = golomb_encode(np.array([5, 2, 9]), k=2)
    rem = 0b01_10_01  # remainders LSB-first: 1, 2, 1
    unary = 0b0_11_0_0_1 | (0b11 << 6)  # q=1 -> "10", q=0 -> "0", q=2 -> "110", padded with ones
    assert data == bytes([2, rem, unary])
    assert golomb_decode(data, 3).tolist() == [5, 2, 9]


@given(st.lists(st.integers(0, 2**34), max_size=200), st.integers(0, 40) | st.none())
@settings(max_examples=100, deadline=None)
def test_golomb_round_trip(values, k) -> None:
    v = np.array(values, dtype=np.int64)
    if k is not None and len(v) and int((v >> k).sum()) > 1 << 22:
        k = None  # a tiny k on huge values would spell out millions of unary bits
    data = golomb_encode(v, k)
    assert np.array_equal(golomb_decode(data, len(v)), v)
    if k is None:
        assert len(data) == golomb_best_k(v)[1]


def test_golomb_rejects_malformed_streams() -> None:
    good = golomb_encode(np.array([5, 2, 9]), k=2)
    for data, count, message in [
        (b"", 1, "empty"),
        (bytes([41]) + good[1:], 3, "exceeds"),
        (good[:2], 3, "holds 0 values|truncated"),
        (good + b"\xff", 3, "trailing"),
        (good, 2, "holds 3 values|padding"),
        (bytes([2, 0b11000000 | good[1], good[2]]), 3, "padding"),
        (bytes([0, 0]), 0, "trailing"),
    ]:
        with pytest.raises(DecodeError, match=message):
            golomb_decode(data, count)


def test_index_coder_choice() -> None:
    n = 100_000
    dense = np.arange(0, n, 2)
    sparse = np.sort(np.random.default_rng(0).choice(n, 1000, replace=False))
    uneven = np.array([0, 1, 2, 3, 99_990])
    assert encode_indices(dense, n)[0] == "bitmap"
    assert encode_indices(sparse, n)[0] == "golomb"
    assert encode_indices(uneven, n)[0] == "varint"
    for idx in (dense, sparse, uneven):
        coder, data = encode_indices(idx, n)
        assert len(data) == min(index_sizes(idx, n).values())
        assert np.array_equal(decode_indices(coder, data, n, len(idx)), idx)
    with pytest.raises(DecodeError, match="outside"):
        decode_indices("golomb", golomb_encode(np.array([5, 200])), 100, 2)
    with pytest.raises(DecodeError, match="cannot fit"):
        decode_indices("golomb", b"\x00", 10, 11)
