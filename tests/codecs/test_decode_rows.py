"""Batched ``Codec.decode_rows`` of the sparsifiers: exactly the per-row default (values, signed zeros, errors)."""

from __future__ import annotations

import dataclasses
import struct

import pytest
import torch

import deltaplane.codecs.sparsify as sparsify
from deltaplane.codecs import get_codec
from deltaplane.codecs.base import Codec, decode_tree, decode_tree_rows, split_lossless
from deltaplane.codecs.sparsify import STC, RandK, Threshold, TopK
from deltaplane.codecs.wire import finalize
from deltaplane.errors import DecodeError

SPECS = [
    "stc(0.01)",
    "stc(0.3)",
    "stc(1.0)",
    "topk(0.05)",
    "topk(1.0)",
    "topk(0.2) | quant(bits=8)",
    "topk(0.2) | quant(bits=4) | zstd",
    "topk(0.2) | fp16",
    "topk(0.2, approx=true)",
    "topk(0.01, approx=true)",
    "topk(0.05, approx=true) | quant(bits=8)",
    "threshold(0.3)",
    "threshold(1e-30)",
    "threshold(100.0)",
    "threshold(0.5) | fp16",
    "threshold(0.5) | quant(bits=4)",
    "randk(0.1)",
    "randk(1.0)",
    "randk(0.3, unbiased=true)",
    "randk(0.2) | quant(bits=8)",
]
# one element (k = 1), a ratio that keeps one, one that keeps all, sizes around a byte of signs; 100 x 100
# is where approximate top-k samples its threshold (a different count per row); empty tensors
SHAPES = [(1,), (7,), (8,), (9,), (3, 5), (40, 25), (100, 100), (0,), (3, 0)]


def _rows(spec: str, shape: tuple[int, ...], rows: int, seed: int) -> list:
    body, _ = split_lossless(get_codec(spec))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *shape, generator=g) * torch.rand(rows, *[1] * len(shape), generator=g)
    x[0] = 0.0  # a zero row: μ = 0, every kept value ±0
    if rows > 2:
        x[2].view(-1)[::3] = -0.0
    return [finalize(body.encode(x[i], torch.Generator().manual_seed(i))) for i in range(rows)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (a -0.0 against a 0.0 is a difference)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_decode_rows_equals_the_per_row_decode(spec: str, shape: tuple[int, ...], rows: int) -> None:
    trees = _rows(spec, shape, rows, seed=rows * 31 + len(shape))
    assert _same(decode_tree_rows(trees), torch.stack([decode_tree(t) for t in trees]))


def test_ragged_rows_are_covered() -> None:
    """The cases above include rows that keep different counts (the stacked scatter's ragged path)."""
    for spec in ["threshold(0.3)", "randk(0.1)", "topk(0.01, approx=true)"]:
        counts = {int(t.fields["values"].shape[0]) for t in _rows(spec, (100, 100), 5, seed=5 * 31 + 2)}
        assert len(counts) > 1, spec


@pytest.mark.parametrize(
    "spec, cls",
    [
        ("stc(0.05)", STC),
        ("topk(0.05)", TopK),
        ("topk(0.01, approx=true)", TopK),
        ("threshold(0.3)", Threshold),
        ("randk(0.1)", RandK),
    ],
)
def test_sparse_rows_run_on_the_stack(monkeypatch: pytest.MonkeyPatch, spec: str, cls: type) -> None:
    """No per-row decode and no per-row read of an index stream (fails before: they looped per row)."""
    trees = _rows(spec, (100, 100), 6, seed=3)
    expected = torch.stack([decode_tree(t) for t in trees])

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("per-row decode called")

    monkeypatch.setattr(cls, "decode", refuse)
    monkeypatch.setattr(sparsify, "decode_indices", refuse)
    monkeypatch.setattr(sparsify, "random_positions", refuse)
    assert _same(decode_tree_rows(trees), expected)


def test_stc_decode_rows_runs_on_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """STC's rows are decoded with one scatter, not one decode per row (the default's loop: fails before)."""
    trees = _rows("stc(0.05)", (40, 25), 6, seed=3)
    expected = torch.stack([decode_tree(t) for t in trees])

    def refuse(self: Codec, e: object) -> torch.Tensor:
        raise AssertionError("per-row STC.decode called")

    monkeypatch.setattr(STC, "decode", refuse)
    assert _same(decode_tree_rows(trees), expected)


def _with(e, **fields):
    return dataclasses.replace(e, fields={**e.fields, **fields})


@pytest.mark.parametrize(
    "fault, match",
    [
        (lambda e: _with(e, scales=struct.pack("<f", -1.0)), "finite and non-negative"),
        (lambda e: _with(e, scales=struct.pack("<f", float("nan"))), "finite and non-negative"),
        (lambda e: _with(e, scales=b"\0\0\0"), "'scales' holds 3 bytes"),
        (lambda e: _with(e, signs=e.fields["signs"][:-1] + bytes([e.fields["signs"][-1] | 0x80])), "padding"),
        (lambda e: _with(e, signs=e.fields["signs"] + b"\0"), "packed 1-bit codes"),
        (lambda e: _with(e, idx=e.fields["idx"][:1]), "index|position|stream"),
    ],
)
def test_stc_decode_rows_refuses_a_bad_row_as_decode_does(fault, match: str) -> None:
    # 45 values at 0.1: k = 5, so the last sign byte has 3 padding bits
    trees = _rows("stc(0.1)", (45,), 4, seed=1)
    trees[2] = fault(trees[2])
    with pytest.raises(DecodeError, match=match) as one:
        decode_tree(trees[2])
    with pytest.raises(DecodeError, match=match) as stacked:
        decode_tree_rows(trees)
    assert str(stacked.value) == str(one.value)


def _meta(e, **meta):
    return dataclasses.replace(e, meta={**e.meta, **meta})


def _values(e, n: int):
    """The values node cut to its first ``n`` entries (an identity node of raw float32)."""
    v = e.fields["values"]
    return _with(
        e, values=dataclasses.replace(v, shape=(n,), fields={**v.fields, "data": v.fields["data"][: 4 * n]})
    )


@pytest.mark.parametrize(
    "spec, fault, match",
    [
        ("threshold(0.3)", lambda e: _with(e, idx=e.fields["idx"][:-1]), "index|position|stream|bitmap"),
        ("threshold(0.3)", lambda e: _meta(e, ix="gzip"), "unknown index coder"),
        ("threshold(0.3)", lambda e: _values(e, e.fields["values"].shape[0] - 1), "positions|stream|bitmap"),
        ("threshold(0.3)", lambda e: _with(e, idx=None), "missing field 'idx'"),
        ("topk(0.01, approx=true)", lambda e: _values(e, 0), "positions|stream"),
        ("topk(0.05)", lambda e: _values(e, 2), "values, expected"),
        ("randk(0.1)", lambda e: _meta(e, seed=-1), "seed"),
        ("randk(0.1)", lambda e: _meta(e, seed=e.meta["seed"] + 1), "the seed selects"),
        ("randk(0.1)", lambda e: _values(e, 1), "the seed selects"),
    ],
)
def test_sparse_decode_rows_refuses_a_bad_row_as_decode_does(spec: str, fault, match: str) -> None:
    trees = _rows(spec, (100, 100), 4, seed=1)
    trees[2] = fault(trees[2])
    with pytest.raises(DecodeError, match=match) as one:
        decode_tree(trees[2])
    with pytest.raises(DecodeError, match=match) as stacked:
        decode_tree_rows(trees)
    assert str(stacked.value) == str(one.value)


QUANT = [
    "quant(bits=1)",
    "quant(bits=2)",
    "quant(bits=3)",
    "quant(bits=4)",
    "quant(bits=5, chunk=7)",
    "quant(bits=8)",
    "quant(bits=8, chunk=4, scale=norm)",
    "quant(bits=4, stochastic=true)",
    "quant(bits=1, stochastic=true)",
]


@pytest.mark.parametrize("spec", QUANT)
@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (3, 5), (40, 25), (0,)])
def test_quant_decode_rows_equals_the_per_row_decode(spec: str, shape: tuple[int, ...]) -> None:
    trees = _rows(spec, shape, 5, seed=len(shape))
    assert _same(decode_tree_rows(trees), torch.stack([decode_tree(t) for t in trees]))


def test_quant_decode_rows_runs_on_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row's codes and scales read at once: no per-row unpack (fails before)."""
    import deltaplane.codecs.quantize as quantize

    trees = _rows("quant(bits=4, chunk=64)", (40, 25), 6, seed=3)
    expected = torch.stack([decode_tree(t) for t in trees])

    def refuse(*args: object) -> object:
        raise AssertionError("per-row read called")

    monkeypatch.setattr(quantize, "unpack_bits", refuse)
    monkeypatch.setattr(quantize, "_read_scales", refuse)
    assert _same(decode_tree_rows(trees), expected)


def _bump_last(e, name: str, bit: int):
    data = bytes(e.fields[name])
    return _with(e, **{name: data[:-1] + bytes([data[-1] | bit])})


@pytest.mark.parametrize(
    "spec, fault, match",
    [
        (
            "quant(bits=4)",
            lambda e: _with(e, scales=struct.pack("<f", -1.0) + bytes(e.fields["scales"])[4:]),
            "non-negative",
        ),
        ("quant(bits=4)", lambda e: _with(e, scales=bytes(e.fields["scales"])[:-1]), "'scales' holds"),
        ("quant(bits=4)", lambda e: _with(e, codes=bytes(e.fields["codes"]) + b"\0"), "packed 4-bit codes"),
        ("quant(bits=3)", lambda e: _bump_last(e, "codes", 0x80), "padding"),
        (
            "quant(bits=4)",
            lambda e: _with(e, codes=b"\xff" + bytes(e.fields["codes"])[1:]),
            "code out of range",
        ),
        (
            "quant(bits=8)",
            lambda e: _with(e, codes=b"\xff" + bytes(e.fields["codes"])[1:]),
            "code out of range",
        ),
        ("quant(bits=8)", lambda e: _with(e, codes=None), "missing field 'codes'"),
    ],
)
def test_quant_decode_rows_refuses_a_bad_row_as_decode_does(spec: str, fault, match: str) -> None:
    trees = _rows(spec, (45,), 4, seed=1)  # 45 values: the last byte of 3-bit codes has padding bits
    trees[2] = fault(trees[2])
    with pytest.raises(DecodeError, match=match) as one:
        decode_tree(trees[2])
    with pytest.raises(DecodeError, match=match) as stacked:
        decode_tree_rows(trees)
    assert str(stacked.value) == str(one.value)
