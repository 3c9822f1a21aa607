"""Coding many rows at once (``encode_indices_rows``, ``pack_bits_rows``): exactly the per-row coders' bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deltaplane.codecs.entropy as entropy
from deltaplane.codecs.entropy import (
    decode_indices,
    encode_indices,
    encode_indices_rows,
    index_sizes,
    pack_bits,
    pack_bits_rows,
)


def _row(style: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` sorted unique positions in ``[0, n)`` laid out so that each coder gets its turn to win."""
    if style == "uniform" or k in (0, n):
        return np.sort(rng.choice(n, k, replace=False))
    if style == "block":  # contiguous: gaps of zero (Golomb-Rice with K = 0, or a bitmap)
        start = int(rng.integers(0, n - k + 1))
        return np.arange(start, start + k)
    if style == "ends":  # two clusters far apart: one huge gap among small ones (varint's case)
        head = k // 2
        return np.concatenate([np.arange(head), np.arange(n - (k - head), n)])
    # "dense": most positions kept (the bitmap's case)
    keep = rng.permutation(n)[:k]
    return np.sort(keep)


def _agree(m: np.ndarray, n: int) -> list[tuple[str, bytes]]:
    got = encode_indices_rows(m, n)
    assert got == [encode_indices(r, n) for r in m]
    for (coder, data), r in zip(got, m, strict=True):  # and each stream reads back
        assert np.array_equal(decode_indices(coder, data, n, len(r)), r)
    return got


@given(
    n=st.sampled_from([1, 2, 7, 8, 9, 64, 129, 300, 5000, 70_000, 3_000_000]),
    rows=st.lists(
        st.tuples(st.sampled_from(["uniform", "block", "ends", "dense"]), st.integers(0, 2**32 - 1)),
        min_size=1,
        max_size=6,
    ),
    count=st.one_of(st.sampled_from(["zero", "one", "all"]), st.floats(0, 1)),
)
@settings(max_examples=400, deadline=None)
def test_rows_coded_at_once_equal_the_per_row_coder(n: int, rows, count) -> None:
    """Any rows of one count (0, 1, n or between; dense, sparse, clustered, uneven): the same coder choice
    and the same bytes as encode_indices row by row."""
    if count == "zero":
        k = 0
    elif count == "one":
        k = 1
    elif count == "all":
        k = n
    else:
        k = min(n, round(count * min(n, 4000)))
    m = np.stack([_row(style, n, k, np.random.default_rng(seed)) for style, seed in rows]).astype(np.int64)
    _agree(m, n)


def test_each_coder_and_several_rice_parameters_in_one_stack() -> None:
    """One stack whose rows take each coder, and Golomb-Rice rows of different parameters."""
    n, k = 70_000, 300
    rng = np.random.default_rng(3)
    m = np.stack(
        [
            np.sort(rng.choice(n, k, replace=False)),  # golomb, K ~ 7
            np.concatenate([np.arange(150), np.arange(n - 150, n)]),  # varint: one huge gap
            np.sort(rng.choice(1200, k, replace=False)),  # golomb, K ~ 1
            np.arange(k),  # golomb, K = 0
            np.sort(rng.choice(n, k, replace=False)),
        ]
    )
    got = _agree(m, n)
    assert [c for c, _ in got] == ["golomb", "varint", "golomb", "golomb", "golomb"]
    assert len({got[i][1][0] for i in (0, 2, 3)}) == 3  # three Rice parameters
    dense = np.stack([np.sort(rng.choice(64, 40, replace=False)) for _ in range(3)])
    assert [c for c, _ in _agree(dense, 64)] == ["bitmap"] * 3


def test_ties_in_the_size_choice() -> None:
    """Equal sizes go where the per-row coder sends them: bitmap before varint before golomb, and the
    smaller Rice parameter of two of equal size."""
    # bitmap 1 byte = varint 1 byte (< golomb 2)
    assert index_sizes(np.array([5]), 8) == {"bitmap": 1, "varint": 1, "golomb": 2}
    assert [c for c, _ in _agree(np.array([[5], [3]]), 8)] == ["bitmap", "bitmap"]
    # varint 2 bytes = golomb 2 bytes (K = 0), bitmap larger
    assert index_sizes(np.array([0, 1]), 1000) == {"bitmap": 125, "varint": 2, "golomb": 2}
    assert [c for c, _ in _agree(np.array([[0, 1], [10, 11]]), 1000)] == ["varint", "varint"]
    # eight gaps of 1: K = 0 and K = 1 both take 3 bytes; the per-row coder keeps K = 0
    row = np.arange(1, 17, 2)
    assert entropy._rice_sizes(np.full(8, 1), range(0, 2)) == {0: 3, 1: 3}
    got = _agree(np.stack([row, row + 1]), 1000)
    assert [(c, d[0]) for c, d in got] == [("golomb", 0), ("golomb", 0)]
    # all three equal: bitmap
    assert index_sizes(np.array([0, 1]), 16) == {"bitmap": 2, "varint": 2, "golomb": 2}
    assert [c for c, _ in _agree(np.array([[0, 1]]), 16)] == ["bitmap"]


#: a row whose Rice estimate is K = 0 (gaps of mean 2.75: the per-row coder tries K = 0 and 1 and keeps K = 0)
#: though K = 2 would code it a byte shorter, and a row whose estimate is K = 1 (gaps of 3: it tries K = 0 to 2)
LOW_K = np.array([2, 6, 9, 15, 16, 19, 21, 23, 28, 30, 41, 44])
HIGH_K = np.arange(4, 52, 4)


def test_a_row_never_takes_a_rice_parameter_only_another_row_tries() -> None:
    """Stacked with a row that tries K = 2, a row whose own candidates stop at K = 1 keeps the parameter the
    per-row coder gives it, not the shorter K = 2 (the stacked coder once sized every row at every parameter
    any row tried, so one device's frame depended on the other devices of its round)."""
    gaps = np.diff(LOW_K, prepend=-1) - 1
    assert entropy.golomb_best_k(gaps) == (0, 7)
    assert entropy._rice_sizes(gaps, range(3))[2] == 6
    got = _agree(np.stack([LOW_K, HIGH_K]), 60)
    assert [(c, d[0]) for c, d in got] == [("golomb", 0), ("golomb", 2)]


def test_empty_and_refused_shapes() -> None:
    assert encode_indices_rows(np.zeros((0, 3), np.int64), 10) == []
    assert (
        encode_indices_rows(np.zeros((4, 0), np.int64), 10) == [encode_indices(np.zeros(0, np.int64), 10)] * 4
    )
    assert encode_indices_rows(np.zeros((2, 0), np.int64), 0) == [("bitmap", b"")] * 2
    with pytest.raises(ValueError, match=r"\(rows, k\) matrix"):
        encode_indices_rows(np.arange(3), 10)


def test_rows_are_coded_without_the_per_row_coder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stack of a non-zero count never reaches encode_indices (one call a row)."""
    rng = np.random.default_rng(0)
    m = np.stack([np.sort(rng.choice(5000, 20, replace=False)) for _ in range(5)])
    want = [encode_indices(r, 5000) for r in m]

    def refuse(*args: object) -> tuple[str, bytes]:
        raise AssertionError("per-row encode_indices called")

    monkeypatch.setattr(entropy, "encode_indices", refuse)
    assert encode_indices_rows(m, 5000) == want


@given(bits=st.integers(1, 8), n=st.integers(0, 40), rows=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_pack_bits_rows_equals_pack_bits(bits: int, n: int, rows: int, seed: int) -> None:
    """Every width (1, 2, 4, 8 and the bit-plane widths), any count (a partial last byte, none)."""
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, n)).astype(np.uint8)
    got = pack_bits_rows(codes, bits)
    assert got == [pack_bits(r, bits) for r in codes]
    assert all(type(b) is bytes for b in got)


def test_blocks_of_rows_and_long_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many rows are coded a block at a time (at most 2^16 positions), rows of over 4096 positions one by
    one (faster there); the bytes are the same either way."""
    rng = np.random.default_rng(5)
    n = 70_000
    many = np.stack([np.sort(rng.choice(n, 3000, replace=False)) for _ in range(25)])  # blocks of 21 rows
    long = np.stack([np.sort(rng.choice(1 << 20, 5000, replace=False)) for _ in range(3)])
    want_many, want_long = [encode_indices(r, n) for r in many], [encode_indices(r, 1 << 20) for r in long]
    blocks = []
    block = entropy._encode_block
    monkeypatch.setattr(entropy, "_encode_block", lambda idx, n: blocks.append(len(idx)) or block(idx, n))
    assert encode_indices_rows(many, n) == want_many
    assert blocks == [21, 4]
    assert encode_indices_rows(long, 1 << 20) == want_long
    assert blocks == [21, 4]  # no block: one by one
