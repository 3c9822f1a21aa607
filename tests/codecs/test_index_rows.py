"""Reading many rows at once (``decode_indices_rows``, ``unpack_bits_rows``): exactly the per-row readers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deltaplane.codecs.entropy as entropy
from deltaplane.codecs.entropy import (
    bitmap_encode,
    decode_indices,
    decode_indices_rows,
    golomb_encode,
    pack_bits,
    unpack_bits,
    unpack_bits_rows,
    varint_encode,
)
from deltaplane.errors import DecodeError


def _encode(coder: str, idx: np.ndarray, n: int) -> bytes:
    gaps = np.diff(idx, prepend=-1) - 1
    if coder == "bitmap":
        return bitmap_encode(idx, n)
    return varint_encode(gaps) if coder == "varint" else golomb_encode(gaps)


def _one_by_one(coders, streams, n, counts) -> np.ndarray | str:
    try:
        parts = [decode_indices(c, s, n, k) for c, s, k in zip(coders, streams, counts, strict=True)]
    except DecodeError as exc:
        return str(exc)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _stacked(coders, streams, n, counts) -> np.ndarray | str:
    try:
        return decode_indices_rows(coders, streams, n, counts)
    except DecodeError as exc:
        return str(exc)


def _agree(coders, streams, n, counts) -> None:
    want, got = _one_by_one(coders, streams, n, counts), _stacked(coders, streams, n, counts)
    if isinstance(want, str) or isinstance(got, str):
        assert got == want
    else:
        assert got.dtype == np.int64 and np.array_equal(got, want)


ROW = st.tuples(st.sampled_from(["bitmap", "varint", "golomb"]), st.integers(0, 2**32 - 1), st.floats(0, 1))


@given(n=st.sampled_from([1, 2, 7, 8, 9, 64, 300, 5000]), rows=st.lists(ROW, max_size=6), corrupt=st.data())
@settings(max_examples=400, deadline=None)
def test_rows_read_at_once_equal_the_per_row_reader(n: int, rows, corrupt) -> None:
    """Any mix of coders and counts (0, 1, n, ragged), valid or damaged: the same positions or the same error."""
    coders, streams, counts = [], [], []
    for coder, seed, density in rows:
        rng = np.random.default_rng(seed)
        k = round(density * n)
        idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        data = bytearray(_encode(coder, idx, n))
        how = corrupt.draw(st.sampled_from(["none"] * 6 + ["flip", "cut", "grow", "count", "first"]))
        if how == "flip" and data:
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        elif how == "cut":
            data = data[:-1]
        elif how == "grow":
            data.append(int(rng.integers(256)))
        elif how == "count":
            k += int(rng.choice([-1, 1]))
        elif how == "first" and data:
            data[0] = int(rng.integers(256))
        coders.append(coder)
        streams.append(bytes(data))
        counts.append(k)
    _agree(coders, streams, n, counts)


def test_valid_rows_are_read_on_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid streams of every coder never reach the per-row reader (it reads one stream a call)."""
    rng = np.random.default_rng(0)
    n = 1000
    coders, streams, counts, want = [], [], [], []
    for coder, k in [
        ("golomb", 10),
        ("varint", 3),
        ("bitmap", 700),
        ("golomb", 1),
        ("varint", 0),
        ("golomb", 0),
    ]:
        idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        coders.append(coder)
        streams.append(_encode(coder, idx, n))
        counts.append(k)
        want.append(idx)

    def refuse(*args: object) -> np.ndarray:
        raise AssertionError("per-row decode_indices called")

    monkeypatch.setattr(entropy, "decode_indices", refuse)
    assert np.array_equal(decode_indices_rows(coders, streams, n, counts), np.concatenate(want))


def test_the_first_bad_row_raises_its_own_error() -> None:
    n = 200
    idx = np.arange(0, 200, 20, dtype=np.int64)
    good = _encode("golomb", idx, n)
    too_far = varint_encode(np.array([0, 250]))  # a gap past the tensor's end
    rows = (["golomb", "varint", "golomb", "bitmap"], [good, too_far, good[:-1], b"\0"], n, [10, 2, 10, 0])
    with pytest.raises(DecodeError, match="outside the tensor") as exc:
        decode_indices_rows(*rows)
    with pytest.raises(DecodeError) as one:
        decode_indices("varint", too_far, n, 2)
    assert str(exc.value) == str(one.value)
    with pytest.raises(DecodeError, match="unknown index coder 'gzip'"):
        decode_indices_rows(["golomb", "gzip"], [good, b""], n, [10, 0])
    with pytest.raises(DecodeError, match="cannot fit"):
        decode_indices_rows(["varint"], [b""], 3, [4])
    assert decode_indices_rows([], [], n, []).shape == (0,)


def test_golomb_rows_of_different_rice_parameters() -> None:
    """Rows whose remainders have different widths (sparse and dense rows of one tensor) in one read."""
    n = 100_000
    rng = np.random.default_rng(1)
    idx = [np.sort(rng.choice(n, k, replace=False)).astype(np.int64) for k in (5, 50, 3000, 40_000, 1)]
    streams = [_encode("golomb", i, n) for i in idx]
    assert len({s[0] for s in streams}) >= 4  # as many Rice parameters
    _agree(["golomb"] * 5, streams, n, [len(i) for i in idx])
    got = decode_indices_rows(["golomb"] * 5, streams, n, [len(i) for i in idx])
    assert np.array_equal(got, np.concatenate(idx))


@given(bits=st.integers(1, 8), n=st.integers(0, 40), rows=st.integers(0, 5), data=st.data())
@settings(max_examples=200, deadline=None)
def test_unpack_bits_rows_equals_unpack_bits(bits: int, n: int, rows: int, data) -> None:
    """Every row's codes at once, or ``None`` exactly where the per-row unpack refuses a row."""
    packed = []
    for _ in range(rows):
        codes = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)), np.uint8)
        raw = bytearray(pack_bits(codes, bits))
        if raw and data.draw(st.booleans()):
            raw[-1] |= 1 << data.draw(st.integers(0, 7))  # maybe a padding bit
        if data.draw(st.integers(0, 9)) == 0:
            raw.append(0)  # a wrong length
        packed.append(bytes(raw))
    got = unpack_bits_rows(packed, bits, n)
    try:
        want = np.stack([unpack_bits(p, bits, n) for p in packed]) if rows else np.zeros((0, n), np.uint8)
    except DecodeError:
        assert got is None
        return
    assert got is not None and got.dtype == np.uint8 and np.array_equal(got, want)
