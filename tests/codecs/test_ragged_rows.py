"""Stacked coding of rows with different counts, and the stacked decode of the simple codecs: exactly the
per-row path (bytes, bits, -0.0, empty tensors, errors), and taken in a batched run."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltaplane.codecs.entropy as entropy
import deltaplane.codecs.quantize as quantize
import deltaplane.codecs.sparsify as sparsify
from deltaplane.codecs import get_codec
from deltaplane.codecs.base import Codec, decode_tree, decode_tree_rows, split_lossless
from deltaplane.codecs.entropy import (
    decode_indices,
    encode_indices,
    encode_indices_ragged,
    pack_bits,
    unpack_bits,
    unpack_bits_ragged,
)
from deltaplane.codecs.quantize import BF16, FP16, Identity, Quantize, Sign
from deltaplane.codecs.sparsify import Threshold, TopK
from deltaplane.codecs.ternary import Ternary
from deltaplane.codecs.wire import finalize
from deltaplane.errors import DecodeError
from deltaplane.sim import RunConfig, run_simulation


def _positions(style: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` sorted unique positions in ``[0, n)`` laid out so that each coder gets its turn to win."""
    if style == "uniform" or k in (0, n):
        return np.sort(rng.choice(n, k, replace=False))
    if style == "block":  # contiguous: gaps of zero (Golomb-Rice with K = 0, or a bitmap)
        start = int(rng.integers(0, n - k + 1))
        return np.arange(start, start + k)
    # "ends": two clusters far apart, one huge gap among small ones (varint's case)
    head = k // 2
    return np.concatenate([np.arange(head), np.arange(n - (k - head), n)])


def _agree(rows: list[np.ndarray], n: int) -> list[tuple[str, bytes]]:
    counts = np.array([len(r) for r in rows], np.int64)
    flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    got = encode_indices_ragged(flat, counts, n)
    assert got == [encode_indices(r, n) for r in rows]
    for (coder, data), r in zip(got, rows, strict=True):  # and each stream reads back
        assert np.array_equal(decode_indices(coder, data, n, len(r)), r)
    return got


# -- index coding of rows with different counts -----------------------------------------------------------
@given(
    n=st.sampled_from([1, 2, 7, 8, 9, 64, 129, 300, 5000, 70_000, 3_000_000]),
    rows=st.lists(
        st.tuples(
            st.sampled_from(["uniform", "block", "ends"]),
            st.one_of(st.sampled_from(["zero", "one", "all"]), st.floats(0, 1)),
            st.integers(0, 2**32 - 1),
        ),
        min_size=1,
        max_size=8,
    ),
)
@settings(max_examples=400, deadline=None)
def test_ragged_rows_coded_at_once_equal_the_per_row_coder(n: int, rows) -> None:
    """Rows of any counts side by side (0, 1, n or between; sparse, contiguous, uneven): each row's coder
    and bytes are encode_indices' for that row."""
    made = []
    for style, count, seed in rows:
        k = {"zero": 0, "one": 1, "all": n}.get(count) if isinstance(count, str) else None
        k = min(n, round(count * min(n, 5000))) if k is None else k
        made.append(_positions(style, n, k, np.random.default_rng(seed)).astype(np.int64))
    _agree(made, n)


def test_each_coder_and_several_rice_parameters_with_different_counts() -> None:
    n = 70_000
    rng = np.random.default_rng(3)
    rows = [
        np.sort(rng.choice(n, 300, replace=False)),  # golomb, K ~ 7
        np.concatenate([np.arange(150), np.arange(n - 20, n)]),  # varint: one huge gap
        np.sort(rng.choice(1200, 300, replace=False)),  # golomb, K ~ 1
        np.arange(7),  # golomb, K = 0
        np.zeros(0, np.int64),  # none: on its own
        np.sort(rng.choice(n, 1, replace=False)),
    ]
    got = _agree(rows, n)
    assert [c for c, _ in got][:4] == ["golomb", "varint", "golomb", "golomb"]
    assert len({got[i][1][0] for i in (0, 2, 3)}) == 3  # three Rice parameters
    dense = [np.sort(rng.choice(64, k, replace=False)) for k in (40, 64, 33)]
    assert [c for c, _ in _agree(dense, 64)] == ["bitmap"] * 3


def test_a_ragged_row_never_takes_a_rice_parameter_only_another_row_tries() -> None:
    """As for equal rows (tests/codecs/test_index_rows_encode.py): a row whose candidates stop at K = 1 keeps
    the per-row coder's K = 0 beside a row that tries K = 2, though K = 2 would code it a byte shorter."""
    low = np.array([2, 6, 9, 15, 16, 19, 21, 23, 28, 30, 41, 44])
    got = _agree([low, np.arange(4, 52, 4), np.arange(4, 40, 4)], 60)
    assert [(c, d[0]) for c, d in got] == [("golomb", 0), ("golomb", 2), ("golomb", 0)]  # the third: a tie


def test_ragged_blocks_and_long_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are coded a block of at most 2^16 positions at a time; rows of no positions or of over 4096
    go one by one, as in encode_indices_rows, and the rows around them still share a block."""
    rng = np.random.default_rng(5)
    n = 70_000
    counts = [3000] * 22 + [0, 2000, 5000, 10, 1]
    rows = [np.sort(rng.choice(n, k, replace=False)) for k in counts]
    blocks: list[int] = []
    block = entropy._encode_ragged_block
    monkeypatch.setattr(
        entropy, "_encode_ragged_block", lambda idx, c, n: blocks.append(len(c)) or block(idx, c, n)
    )
    _agree(rows, n)
    assert blocks == [21, 4]  # 21 x 3000 fit 2^16; the 0 and the 5000 go alone, the rest together


def test_ragged_rows_refuse_counts_that_do_not_split_the_positions() -> None:
    with pytest.raises(ValueError, match="do not split"):
        encode_indices_ragged(np.arange(5), np.array([2, 2]), 10)
    with pytest.raises(ValueError, match="do not split"):
        encode_indices_ragged(np.arange(2), np.array([3, -1]), 10)
    assert encode_indices_ragged(np.zeros(0, np.int64), np.zeros(0, np.int64), 10) == []


# -- threshold and approximate top-k on the stack ----------------------------------------------------------
def _same_tree(a, b) -> None:
    assert (a.codec, a.shape, a.meta) == (b.codec, b.shape, b.meta)
    assert a.fields.keys() == b.fields.keys()
    for k, x in a.fields.items():
        y = b.fields[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.view(torch.int32), y.view(torch.int32))  # -0.0 kept
        elif isinstance(y, torch.Tensor) or hasattr(x, "codec"):
            _same_tree(x, y)
        else:
            assert bytes(x) == bytes(y)


def _stack(shape: tuple[int, ...], rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *shape, generator=g) * torch.rand(rows, *[1] * len(shape), generator=g)
    x[0] = 0.0  # a row that keeps nothing (threshold) or only zeros (top-k)
    if rows > 2:
        x[2].view(-1)[::3] = -0.0
    if rows > 3:
        x[3].view(-1)[: x[3].numel() // 2] = 0.5  # ties
    return x


RAGGED_ENCODE = [
    "threshold(0.3)",
    "threshold(1e-30)",
    "threshold(100.0)",
    "topk(0.01, approx=true)",
    "topk(0.2, approx=true)",
    *[f"topk(0.02, approx=true) | quant(bits={b})" for b in range(1, 9)],
    *[f"threshold(0.5) | quant(bits={b}, chunk=7)" for b in (1, 3, 8)],
    "threshold(0.5) | fp16",
]


@given(
    spec=st.sampled_from(RAGGED_ENCODE),
    shape=st.sampled_from([(1,), (7,), (3, 5), (40, 25), (100, 100), (9000,), (0,), (3, 0)]),
    rows=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=150, deadline=None)
def test_ragged_encode_rows_equals_the_per_row_encode(spec: str, shape, rows: int, seed: int) -> None:
    """Threshold and approximate top-k encode a stack as each row's own encode would (positions' bytes,
    values bit for bit, every generator advanced the same), pipelines included."""
    body, _ = split_lossless(get_codec(spec))
    x = _stack(shape, rows, seed)
    got = body.encode_rows(x, [torch.Generator().manual_seed(seed + i) for i in range(rows)])
    want = [body.encode(x[i], torch.Generator().manual_seed(seed + i)) for i in range(rows)]
    for a, b in zip(got, want, strict=True):
        _same_tree(a, b)


@pytest.mark.parametrize("spec", ["threshold(0.3)", "topk(0.01, approx=true)", "topk(0.05, approx=true)"])
def test_ragged_encode_rows_run_on_the_stack(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    """No per-row encode nor per-row index coding (fails before: both ran once a row)."""
    codec = get_codec(spec)
    x = _stack((100, 100), 6, 1)[:, :40]  # 4000 values: every row's count under 4096
    rngs = [torch.Generator().manual_seed(i) for i in range(6)]
    want = [codec.encode(x[i], torch.Generator().manual_seed(i)) for i in range(6)]
    counts = {len(w.fields["values"]) for w in want}
    if spec.startswith("threshold"):
        assert len(counts) > 1  # ragged indeed

    def refuse(*args: object) -> object:
        raise AssertionError("per-row path called")

    monkeypatch.setattr(sparsify, "encode_indices", refuse)
    monkeypatch.setattr(type(codec), "encode", refuse)
    for a, b in zip(codec.encode_rows(x, rngs), want, strict=True):
        _same_tree(a, b)


def test_approx_topk_draws_each_rows_sample_from_its_generator() -> None:
    """A row's sampled threshold comes from its own generator, which ends where the row's encode leaves it."""
    codec = get_codec("topk(0.01, approx=true)")
    x = _stack((100, 100), 4, 2)
    rngs = [torch.Generator().manual_seed(7 + i) for i in range(4)]
    ref = [torch.Generator().manual_seed(7 + i) for i in range(4)]
    got = codec.encode_rows(x, rngs)
    want = [codec.encode(x[i], ref[i]) for i in range(4)]
    assert len({len(w.fields["values"]) for w in want}) > 1
    for a, b in zip(got, want, strict=True):
        _same_tree(a, b)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(rngs, ref, strict=True))


# -- the values node of ragged rows, decoded together -------------------------------------------------------
def _trees(spec: str, shape: tuple[int, ...], rows: int, seed: int) -> list:
    body, _ = split_lossless(get_codec(spec))
    x = _stack(shape, rows, seed)
    return [finalize(body.encode(x[i], torch.Generator().manual_seed(seed + i))) for i in range(rows)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (a -0.0 against a 0.0 is a difference)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


RAGGED_DECODE = [
    "threshold(0.3)",
    "topk(0.02, approx=true)",
    "randk(0.2)",
    "randk(0.3, unbiased=true) | quant(bits=4)",
    *[f"threshold(0.4) | quant(bits={b})" for b in range(1, 9)],
    "topk(0.05, approx=true) | quant(bits=3, chunk=7)",
    "threshold(0.4) | quant(bits=8, chunk=5, scale=norm)",
    "threshold(0.4) | quant(bits=2, stochastic=true)",
    "threshold(0.4) | bf16",
]


@given(
    spec=st.sampled_from(RAGGED_DECODE),
    shape=st.sampled_from([(1,), (7,), (3, 5), (40, 25), (100, 100), (0,)]),
    rows=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=150, deadline=None)
def test_ragged_values_decode_equals_the_per_row_decode(spec: str, shape, rows: int, seed: int) -> None:
    trees = _trees(spec, shape, rows, seed)
    assert _same(decode_tree_rows(trees), torch.stack([decode_tree(t) for t in trees]))


@pytest.mark.parametrize(
    "spec, cls",
    [
        ("threshold(0.3)", Identity),
        ("topk(0.02, approx=true)", Identity),
        ("randk(0.2)", Identity),
        ("threshold(0.3) | quant(bits=3)", Quantize),
        ("topk(0.02, approx=true) | quant(bits=8)", Quantize),
    ],
)
def test_ragged_values_decode_on_the_stack(monkeypatch: pytest.MonkeyPatch, spec: str, cls: type) -> None:
    """The values node of rows of different counts is read for all rows at once (fails before: its
    decode ran once a row)."""
    trees = _trees(spec, (100, 100), 5, 4)
    assert len({t.fields["values"].shape for t in trees}) > 1
    expected = torch.stack([decode_tree(t) for t in trees])

    def refuse(*args: object) -> object:
        raise AssertionError("per-row decode called")

    monkeypatch.setattr(cls, "decode", refuse)
    monkeypatch.setattr(quantize, "unpack_bits", refuse)
    assert _same(decode_tree_rows(trees), expected)


@given(bits=st.integers(1, 8), sizes=st.lists(st.integers(0, 40), max_size=6), seed=st.integers(0, 2**16))
@settings(max_examples=200, deadline=None)
def test_unpack_bits_ragged_equals_unpack_bits(bits: int, sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, 1 << bits, m).astype(np.uint8) for m in sizes]
    data = [pack_bits(c, bits) for c in codes]
    got = unpack_bits_ragged(data, bits, sizes)
    assert got is not None
    assert np.array_equal(
        got, np.concatenate([unpack_bits(d, bits, m) for d, m in zip(data, sizes, strict=True)] or [[]])
    )
    for i, (d, m) in enumerate(zip(data, sizes, strict=True)):  # a bad row: refused where unpack_bits refuses
        if m * bits % 8:
            bad = [*data[:i], d[:-1] + bytes([d[-1] | 0x80]), *data[i + 1 :]]
            assert unpack_bits_ragged(bad, bits, sizes) is None
            with pytest.raises(DecodeError, match="padding"):
                unpack_bits(bad[i], bits, m)
    assert unpack_bits_ragged([*data, b"\0"], bits, [*sizes, 0]) is None


def _with(e, **fields):
    return dataclasses.replace(e, fields={**e.fields, **fields})


def _values(e, **fields):
    """``e`` with its values node's fields replaced."""
    return _with(e, values=_with(e.fields["values"], **fields))


def _bump_last(data, bit: int) -> bytes:
    data = bytes(data)
    return data[:-1] + bytes([data[-1] | bit])


@pytest.mark.parametrize(
    "spec, fault, match",
    [
        ("threshold(0.3)", lambda v: {"data": bytes(v.fields["data"])[:-4]}, "raw float32 data"),
        ("threshold(0.3)", lambda v: {"data": None}, "missing field 'data'"),
        (
            "threshold(0.3) | quant(bits=4)",
            lambda v: {"scales": struct.pack("<f", -1.0) + bytes(v.fields["scales"])[4:]},
            "non-negative",
        ),
        ("threshold(0.3) | quant(bits=4)", lambda v: {"scales": bytes(v.fields["scales"])[:-1]}, "'scales'"),
        ("threshold(0.3) | quant(bits=3)", lambda v: {"codes": bytes(v.fields["codes"]) + b"\0"}, "3-bit"),
        (
            "threshold(0.3) | quant(bits=3)",
            lambda v: {"codes": _bump_last(v.fields["codes"], 0x80)},
            "padding",
        ),
        (
            "topk(0.05, approx=true) | quant(bits=4)",
            lambda v: {"codes": b"\xff" + bytes(v.fields["codes"])[1:]},
            "code out of range",
        ),
        ("topk(0.05, approx=true) | quant(bits=8)", lambda v: {"codes": None}, "missing field 'codes'"),
    ],
)
def test_a_bad_ragged_values_node_fails_as_the_per_row_decode(spec: str, fault, match: str) -> None:
    trees = _trees(spec, (100, 100), 4, 1)
    counts = [t.fields["values"].shape[0] for t in trees]
    assert len(set(counts)) > 1  # ragged
    assert match != "padding" or counts[2] * 3 % 8  # row 2's 3-bit codes end in padding bits
    trees[2] = _values(trees[2], **fault(trees[2].fields["values"]))
    with pytest.raises(DecodeError, match=match) as one:
        decode_tree(trees[2])
    with pytest.raises(DecodeError, match=match) as stacked:
        decode_tree_rows(trees)
    assert str(stacked.value) == str(one.value)


# -- sign, fp16, bf16 and ternary: decode_rows on the stack -------------------------------------------------
SIMPLE = ["sign", "fp16", "bf16", "ternary", "ternary(chunk=7)", "ternary(chunk=64)"]


@given(
    spec=st.sampled_from(SIMPLE),
    shape=st.sampled_from([(1,), (5,), (8,), (9,), (3, 5), (40, 25), (0,), (2, 0)]),
    rows=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=150, deadline=None)
def test_simple_decode_rows_equals_the_per_row_decode(spec: str, shape, rows: int, seed: int) -> None:
    trees = _trees(spec, shape, rows, seed)
    assert _same(decode_tree_rows(trees), torch.stack([decode_tree(t) for t in trees]))


@pytest.mark.parametrize("spec, cls", [("sign", Sign), ("fp16", FP16), ("bf16", BF16), ("ternary", Ternary)])
def test_simple_decode_rows_run_on_the_stack(monkeypatch: pytest.MonkeyPatch, spec: str, cls: type) -> None:
    """No per-row decode (fails before: these codecs had no decode_rows)."""
    trees = _trees(spec, (40, 25), 5, 2)
    expected = torch.stack([decode_tree(t) for t in trees])

    def refuse(*args: object) -> object:
        raise AssertionError("per-row decode called")

    monkeypatch.setattr(cls, "decode", refuse)
    assert _same(decode_tree_rows(trees), expected)


@pytest.mark.parametrize(
    "spec, fault, match",
    [
        ("sign", lambda e: {"scales": struct.pack("<f", float("nan"))}, "finite"),
        ("sign", lambda e: {"scales": b"\0\0\0"}, "'scales' holds 3 bytes"),
        ("sign", lambda e: {"signs": _bump_last(e.fields["signs"], 0x80)}, "padding"),
        ("sign", lambda e: {"signs": None}, "missing field 'signs'"),
        ("fp16", lambda e: {"data": bytes(e.fields["data"])[:-2]}, "raw float16 data"),
        ("bf16", lambda e: {"data": bytes(e.fields["data"]) + b"\0\0"}, "raw bfloat16 data"),
        ("ternary", lambda e: {"trits": b"\xff" + bytes(e.fields["trits"])[1:]}, "above 242"),
        ("ternary", lambda e: {"trits": _bump_last(e.fields["trits"], 0xC0)}, "padding|above 242"),
        ("ternary(chunk=7)", lambda e: {"scales": struct.pack("<f", -2.0) * 7}, "non-negative"),
        ("ternary", lambda e: {"trits": bytes(e.fields["trits"])[1:]}, "packed trits"),
    ],
)
def test_a_bad_simple_row_fails_as_the_per_row_decode(spec: str, fault, match: str) -> None:
    trees = _trees(spec, (47,), 4, 1)  # 47 values: padding in the last byte of signs and of trits
    trees[2] = _with(trees[2], **fault(trees[2]))
    with pytest.raises(DecodeError, match=match) as one:
        decode_tree(trees[2])
    with pytest.raises(DecodeError, match=match) as stacked:
        decode_tree_rows(trees)
    assert str(stacked.value) == str(one.value)


# -- a batched run takes the stacked paths -----------------------------------------------------------------
def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "codec, refused",
    [
        ("threshold(0.01)", [(Threshold, "encode"), (Identity, "decode")]),
        ("topk(0.01, approx=true)", [(Identity, "decode")]),
        ("topk(0.01, approx=true) | quant(bits=8)", [(Quantize, "decode")]),
        ("sign", [(Sign, "decode")]),
        ("fp16", [(FP16, "decode")]),
        ("bf16", [(BF16, "decode")]),
    ],
)
def test_batched_run_takes_the_stacked_paths(monkeypatch: pytest.MonkeyPatch, codec: str, refused) -> None:
    """A 2-round batched run never encodes threshold rows nor decodes a values node or a simple codec's
    node one device at a time (fails before), and its bytes and final weights are the per-row path's."""
    cfg = RunConfig(clients=5, rounds=2, engine="batched", codec=codec)
    calls: list[str] = []

    def spy(cls: type, name: str):
        per_row = getattr(cls, name)

        def counted(*args: object) -> object:
            calls.append(f"{cls.__name__}.{name}")
            return per_row(*args)

        return counted

    with monkeypatch.context() as m:
        for cls, name in refused:
            m.setattr(cls, name, spy(cls, name))
        stacked = run_simulation(cfg)
    # the wire session's template (one encode a tensor) and the published model (one decode a tensor a
    # round); before, each ran once a device a round besides
    assert len(calls) <= len(stacked.final_state) * (1 + cfg.rounds), calls
    # the per-row paths: every codec's own encode and decode, row by row
    for cls in (Threshold, TopK):
        monkeypatch.setattr(cls, "encode_rows", Codec.encode_rows)
    for cls in (Sign, quantize._Cast):
        monkeypatch.setattr(cls, "decode_rows", Codec.decode_rows)
    for cls in (Identity, Quantize):
        monkeypatch.setattr(cls, "decode_ragged", Codec.decode_ragged)
    loop = run_simulation(cfg)
    assert [r.uplink_bytes for r in stacked.rounds] == [r.uplink_bytes for r in loop.rounds]
    assert _digest(stacked.final_state) == _digest(loop.final_state)
