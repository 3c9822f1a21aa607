"""Batched ``Codec.decode_rows`` of the sparsifiers: exactly the per-row default (values, signed zeros, errors)."""

from __future__ import annotations

import dataclasses
import struct

import pytest
import torch

from deltaplane.codecs import get_codec
from deltaplane.codecs.base import Codec, decode_tree, decode_tree_rows, split_lossless
from deltaplane.codecs.sparsify import STC
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
]
# one element (k = 1), a ratio that keeps one, one that keeps all, sizes around a byte of signs
SHAPES = [(1,), (7,), (8,), (9,), (3, 5), (40, 25)]


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
