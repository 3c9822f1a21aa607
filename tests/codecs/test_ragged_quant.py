"""A ``quant`` stage encoded over rows of different counts (threshold's or approximate top-k's kept values) in
one pass: exactly each row's own encode (bytes, generators, -0.0, rows of 0 or 1 values), and taken by the
stacked sender and a batched run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.codecs.test_ragged_rows import _digest, _same_tree

import deltaplane.codecs.quantize as quantize
from deltaplane.codecs import get_codec
from deltaplane.codecs.base import Codec, Encoded, split_lossless
from deltaplane.codecs.entropy import pack_bits, pack_bits_ragged, unpack_bits_ragged
from deltaplane.codecs.quantize import Quantize
from deltaplane.sim import RunConfig, run_simulation


# -- pack_bits_ragged ---------------------------------------------------------------------------------------
@given(bits=st.integers(1, 8), sizes=st.lists(st.integers(0, 40), max_size=7), seed=st.integers(0, 2**16))
@settings(max_examples=300, deadline=None)
def test_pack_bits_ragged_equals_pack_bits_of_each_row(bits: int, sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, 1 << bits, m).astype(np.uint8) for m in sizes]
    joined = np.concatenate(rows) if rows else np.zeros(0, np.uint8)
    got = pack_bits_ragged(joined, bits, sizes)
    assert got == [pack_bits(r, bits) for r in rows]
    back = unpack_bits_ragged(got, bits, sizes)  # and its counterpart reads it back
    assert back is not None and np.array_equal(back, joined)


def test_pack_bits_ragged_refuses_sizes_that_do_not_split_the_codes() -> None:
    with pytest.raises(ValueError, match="do not split"):
        pack_bits_ragged(np.zeros(5, np.uint8), 3, [2, 2])
    with pytest.raises(ValueError, match="do not split"):
        pack_bits_ragged(np.zeros(2, np.uint8), 3, [3, -1])
    assert pack_bits_ragged(np.zeros(0, np.uint8), 4, []) == []


# -- Quantize.encode_ragged against each row's encode ---------------------------------------------------------
QUANT = st.builds(
    lambda bits, stochastic, chunk, scale: (
        f"quant(bits={bits}, stochastic={str(stochastic).lower()}, chunk={chunk}, scale={scale})"
    ),
    bits=st.integers(1, 8),
    stochastic=st.booleans(),
    chunk=st.sampled_from([1, 2, 3, 7, 8, 64, 512, 2**62]),
    scale=st.sampled_from(["max", "norm"]),
)


def _row(m: int, style: str, g: torch.Generator) -> torch.Tensor:
    x = (
        torch.randn(m, generator=g)
        * float(torch.rand(1, generator=g))
        * 10.0 ** int(torch.randint(-3, 4, (1,)))
    )
    if style == "zeros":
        x.zero_()
    elif style == "signed-zeros":
        x[::2] = -0.0
    elif style == "ties" and m:
        x[: m // 2] = 0.5
    elif style == "inf" and m:
        x[m // 3] = float("inf")
    return x


@given(
    quant=QUANT,
    rows=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 1, 2, 5, 8, 63, 511, 512, 513, 1500]),
            st.sampled_from(["randn", "randn", "zeros", "signed-zeros", "ties", "inf"]),
        ),
        min_size=1,
        max_size=7,
    ),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=400, deadline=None)
def test_quant_encode_ragged_equals_each_rows_encode(quant: str, rows, seed: int) -> None:
    """Rows of any sizes (0 and 1 included), bit widths, chunks, scales and stochastic rounding: each row's
    bytes are its own encode's, and each generator ends where that encode leaves it."""
    codec = get_codec(quant)
    g = torch.Generator().manual_seed(seed)
    xs = [_row(m, style, g) for m, style in rows]
    rngs = [torch.Generator().manual_seed(seed + i) for i in range(len(xs))]
    ref = [torch.Generator().manual_seed(seed + i) for i in range(len(xs))]
    got = codec.encode_ragged(xs, rngs)
    for a, b in zip(got, [codec.encode(x, r) for x, r in zip(xs, ref, strict=True)], strict=True):
        _same_tree(a, b)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(rngs, ref, strict=True))


@given(
    quant=QUANT,
    sizes=st.lists(st.sampled_from([0, 1, 3, 5, 6, 9, 40]), min_size=1, max_size=9),
    block=st.integers(1, 50),
    row=st.integers(0, 10),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=200, deadline=None)
def test_quant_encode_ragged_in_blocks_and_long_rows_alone(
    quant: str, sizes, block: int, row: int, seed: int
) -> None:
    """Rows joined in blocks and rows over the limit encoded alone, mixed: still each row's own encode."""
    codec = get_codec(quant)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(m, generator=g) for m in sizes]
    rngs = [torch.Generator().manual_seed(seed + i) for i in range(len(xs))]
    ref = [torch.Generator().manual_seed(seed + i) for i in range(len(xs))]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(quantize, "RAGGED_BLOCK_VALUES", block)
        m.setattr(quantize, "RAGGED_ROW_VALUES", row)
        got = codec.encode_ragged(xs, rngs)
    for a, b in zip(got, [codec.encode(x, r) for x, r in zip(xs, ref, strict=True)], strict=True):
        _same_tree(a, b)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(rngs, ref, strict=True))


def test_quant_encode_ragged_keeps_a_nan_chunks_scale_bits() -> None:
    """A NaN (only a direct call can pass one: the Compressor refuses it) takes each row's own encode."""
    codec = get_codec("quant(bits=4, chunk=3)")
    xs = [torch.tensor([1.0, float("nan"), -2.0, 0.5]), torch.tensor([3.0])]
    got = codec.encode_ragged(xs, [torch.Generator(), torch.Generator()])
    for a, b in zip(got, [codec.encode(x, torch.Generator()) for x in xs], strict=True):
        _same_tree(a, b)


# -- the pipelines that send ragged values ---------------------------------------------------------------
def _stack(shape: tuple[int, ...], rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *shape, generator=g) * torch.rand(rows, *[1] * len(shape), generator=g)
    x[0] = 0.0  # a row that keeps nothing (threshold) or only zeros (top-k)
    if rows > 1 and x[1].numel():  # a row that keeps a single value under a threshold
        x[1] = 0.0
        x[1].view(-1)[-1] = 100.0
    if rows > 2:
        x[2].view(-1)[::3] = -0.0
    return x


@given(
    sparsifier=st.sampled_from(["threshold(0.5)", "threshold(2.0)", "topk(0.02, approx=true)"]),
    quant=QUANT,
    shape=st.sampled_from([(1,), (7,), (3, 5), (40, 25), (100, 100), (9000,), (0,)]),
    rows=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=200, deadline=None)
def test_ragged_quant_pipelines_encode_rows_equal_the_per_row_encode(
    sparsifier: str, quant: str, shape, rows: int, seed: int
) -> None:
    """``threshold | quant`` and approximate ``topk | quant`` encode a stack as each row's own encode would."""
    body, _ = split_lossless(get_codec(f"{sparsifier} | {quant}"))
    x = _stack(shape, rows, seed)
    rngs = [torch.Generator().manual_seed(seed + i) for i in range(rows)]
    ref = [torch.Generator().manual_seed(seed + i) for i in range(rows)]
    got = body.encode_rows(x, rngs)
    for a, b in zip(got, [body.encode(x[i], ref[i]) for i in range(rows)], strict=True):
        _same_tree(a, b)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(rngs, ref, strict=True))


@pytest.mark.parametrize(
    "spec",
    [
        "threshold(0.3) | quant(bits=4)",
        "threshold(0.3) | quant(bits=3, chunk=7, scale=norm)",
        "topk(0.01, approx=true) | quant(bits=8)",
        "topk(0.05, approx=true) | quant(bits=2, stochastic=true)",
    ],
)
def test_ragged_quant_runs_on_all_rows_at_once(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    """No per-row quant encode and no per-row bit packing (fails before: the values of rows of different
    counts were quantized row by row)."""
    body, _ = split_lossless(get_codec(spec))
    g = torch.Generator().manual_seed(3)  # no row of zeros: approximate top-k would keep all 10⁴ values of
    x = torch.randn(6, 100, 100, generator=g) * torch.rand(6, 1, 1, generator=g)  # one, a row encoded alone
    want = [body.encode(x[i], torch.Generator().manual_seed(i)) for i in range(6)]
    assert len({w.fields["values"].shape for w in want}) > 1  # ragged indeed

    def refuse(*args: object) -> object:
        raise AssertionError("per-row path called")

    monkeypatch.setattr(Quantize, "encode", refuse)
    monkeypatch.setattr(quantize, "pack_bits", refuse)
    got = body.encode_rows(x, [torch.Generator().manual_seed(i) for i in range(6)])
    for a, b in zip(got, want, strict=True):
        _same_tree(a, b)


# -- a batched run takes it ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "codec", ["threshold(0.01) | quant(bits=4)", "topk(0.01, approx=true) | quant(bits=8, stochastic=true)"]
)
def test_batched_run_quantizes_ragged_values_on_the_stack(
    monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    """A 2-round batched run never quantizes one device's values on its own (fails before), and its bytes
    and final weights are the per-row path's."""
    cfg = RunConfig(clients=5, rounds=2, engine="batched", codec=codec)
    calls: list[int] = []
    per_row = Quantize.encode

    def counted(self: Quantize, x: torch.Tensor, rng: torch.Generator) -> Encoded:
        calls.append(x.numel())
        return per_row(self, x, rng)

    with monkeypatch.context() as m:
        m.setattr(Quantize, "encode", counted)
        stacked = run_simulation(cfg)
    # the wire session's template only (one encode a tensor); before, once a device a round besides
    assert len(calls) <= len(stacked.final_state), calls
    monkeypatch.setattr(Quantize, "encode_ragged", Codec.encode_ragged)
    loop = run_simulation(cfg)
    assert [r.uplink_bytes for r in stacked.rounds] == [r.uplink_bytes for r in loop.rounds]
    assert _digest(stacked.final_state) == _digest(loop.final_state)
