import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaplane.codecs.entropy import (
    bitmap_decode,
    bitmap_encode,
    decode_indices,
    encode_indices,
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
