"""compress_many and Codec.encode_rows: the stacked path gives exactly the per-device path's bytes and states."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltaplane.codecs import Compressor, compress_many, decompress, get_codec
from deltaplane.codecs.base import (
    decode_tree,
    decode_tree_rows,
    encode_stages,
    encode_stages_rows,
    split_lossless,
)
from deltaplane.codecs.sparsify import topk_indices, topk_rows
from deltaplane.codecs.wire import WireHeader, finalize, pack
from deltaplane.delta import Delta
from deltaplane.errors import CodecError, DecodeError, InvalidUpdate, ShapeMismatch

SPECS = [
    "identity",
    "quant(bits=8)",
    "quant(bits=4)",
    "quant(bits=2, stochastic=true)",
    "topk(0.01)",
    "topk(0.1) | quant(bits=8)",
    "topk(0.01) | quant(bits=4) | zstd",
    "stc(0.01)",
    "stc(0.002)",
    "quant(bits=1)",
    "topk(0.3) | quant(bits=3)",
    "powersgd(rank=2)",  # stateful: compress_many falls back to the per-device path
]
CLIENTS = 4


def stacked_round(rnd: int, clients: int = CLIENTS) -> dict[str, torch.Tensor]:
    """Awkward deltas for ``clients`` devices: 0-d, 1-element, many exact zeros (ties), a 3-D conv weight."""
    g = torch.Generator().manual_seed(100 + rnd)
    sparse = torch.randn(clients, 1200, generator=g)
    sparse[:, ::2] = 0.0  # half exact zeros: top-k of a residual-free row ties at zero
    sparse[:, 1::4] = 0.25  # and a block of equal magnitudes straddling the top-k boundary
    sparse[:, 3::8] = -0.25
    sparse[:, 5::16] = -0.0
    big = torch.randn(clients, 9000, generator=g)  # large enough for top-k's sampled candidate path
    big[:, :4000] = 0.5  # ... with ties at the k-th value there too
    return {
        "scalar": torch.randn(clients, generator=g),  # each row a 0-d tensor
        "one": torch.randn(clients, 1, generator=g),
        "conv.weight": torch.randn(clients, 16, 4, 5, generator=g) * 0.1,
        "sparse": sparse,
        "big": big,
        "steps": torch.full((clients,), rnd, dtype=torch.int64),  # integer buffers travel raw
    }


def state_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("feedback", [True, False])
@pytest.mark.parametrize("spec", SPECS)
def test_compress_many_equals_per_device_loop(spec: str, feedback: bool) -> None:
    loop = [Compressor(spec, error_feedback=feedback, seed=s) for s in range(CLIENTS)]
    many = [Compressor(spec, error_feedback=feedback, seed=s) for s in range(CLIENTS)]
    for rnd in range(3):
        stack = stacked_round(rnd)
        expected = [
            c.compress(Delta({k: v[i] for k, v in stack.items()}), base_id="m", base_version=rnd)
            for i, c in enumerate(loop)
        ]
        got = compress_many(many, stack, base_id="m", base_version=rnd)
        assert got == expected, f"round {rnd}: payloads differ"
        for a, b in zip(loop, many, strict=True):
            assert state_equal(a.state_dict(), b.state_dict()), f"round {rnd}: compressor states differ"
        if feedback and spec != "identity" and spec != "powersgd(rank=2)":
            assert many[0].state.residual is not None and many[0].state.residual["big"].abs().sum() > 0
    # the payloads are real: the receiver decodes them
    assert decompress(got[0], expect_base=("m", 2))["conv.weight"].shape == (16, 4, 5)


def test_compress_many_mixed_residuals_and_signed_zeros() -> None:
    """A device that joins late (no residual yet) next to devices that carry one."""
    spec = "topk(0.1)"
    loop = [Compressor(spec, seed=s) for s in range(CLIENTS)]
    many = [Compressor(spec, seed=s) for s in range(CLIENTS)]
    first = stacked_round(0)
    for group in (loop, many):  # devices 0 and 2 took part in round 0
        for i in (0, 2):
            group[i].compress(Delta({k: v[i] for k, v in first.items()}))
    stack = stacked_round(1)
    expected = [c.compress(Delta({k: v[i] for k, v in stack.items()})) for i, c in enumerate(loop)]
    assert compress_many(many, stack) == expected
    for a, b in zip(loop, many, strict=True):
        assert state_equal(a.state_dict(), b.state_dict())


def test_compress_many_failures() -> None:
    stack = stacked_round(0)
    stack["sparse"][2, 7] = float("nan")
    loop = [Compressor("topk(0.1) | quant(bits=8)", seed=s) for s in range(CLIENTS)]
    many = [Compressor("topk(0.1) | quant(bits=8)", seed=s) for s in range(CLIENTS)]
    got = compress_many(many, stack, return_exceptions=True)
    assert isinstance(got[2], InvalidUpdate)
    for i in (0, 1, 3):
        assert got[i] == loop[i].compress(Delta({k: v[i] for k, v in stack.items()}))
        assert state_equal(loop[i].state_dict(), many[i].state_dict())
    with pytest.raises(InvalidUpdate, match="sparse"):
        compress_many([Compressor("quant(bits=8)", seed=s) for s in range(CLIENTS)], stack)
    with pytest.raises(ShapeMismatch, match="no row per compressor"):
        compress_many([Compressor("quant(bits=8)")], {"w": torch.zeros(3, 2)})
    # a residual laid out unlike the delta is refused as by Compressor.compress
    c = [Compressor("topk(0.5)", seed=s) for s in range(2)]
    compress_many(c, {"w": torch.ones(2, 4)})
    with pytest.raises(ShapeMismatch, match="error-feedback state"):
        compress_many(c, {"w": torch.ones(2, 5)})


def test_compress_many_mixed_codecs_fall_back() -> None:
    specs = ["quant(bits=8)", "topk(0.1)", "quant(bits=8)"]
    stack = {k: v[:3] for k, v in stacked_round(0).items()}
    loop = [Compressor(s, seed=i) for i, s in enumerate(specs)]
    many = [Compressor(s, seed=i) for i, s in enumerate(specs)]
    expected = [c.compress(Delta({k: v[i] for k, v in stack.items()})) for i, c in enumerate(loop)]
    assert compress_many(many, stack) == expected
    assert compress_many([], {}) == []


def _bytes(e: Any) -> bytes:
    return pack({"t": (torch.float32, finalize(e))}, WireHeader())


@pytest.mark.parametrize(
    "spec",
    [
        "quant(bits=1)",
        "quant(bits=1, stochastic=true)",
        "quant(bits=3, stochastic=true, chunk=7)",
        "quant(bits=8, scale=norm)",
        "topk(0.05, approx=true) | quant(bits=4, stochastic=true)",
        "stc(0.3)",
        "sign",
        "topk(1.0) | quant(bits=2)",
    ],
)
@pytest.mark.parametrize("shape", [(), (1,), (5, 3, 3), (1300,), (9000,)])
def test_encode_rows_equals_encode(spec: str, shape: tuple[int, ...]) -> None:
    codec, _ = split_lossless(get_codec(spec))
    g = torch.Generator().manual_seed(1)
    x = torch.randn((3, *shape), generator=g)
    if math.prod(shape) > 100:
        x.view(3, -1)[:, ::3] = 0.0
    per_row = [torch.Generator().manual_seed(i) for i in range(3)]
    stacked = [torch.Generator().manual_seed(i) for i in range(3)]
    expected = [_bytes(codec.encode(x[i].clone(), per_row[i])) for i in range(3)]
    rows = codec.encode_rows(x, stacked)
    assert [_bytes(e) for e in rows] == expected
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(per_row, stacked, strict=True))
    # and back: the stacked decode is the per-row decode, bit for bit
    trees = [finalize(e) for e in rows]
    assert torch.equal(decode_tree_rows(trees), torch.stack([decode_tree(t) for t in trees]))


def test_encode_rows_with_one_shared_generator() -> None:
    """Rows drawing from one generator draw row after row, as a loop over rows would."""
    stages = get_codec("topk(0.5) | quant(bits=2, stochastic=true)").stages
    x = torch.randn(3, 700, generator=torch.Generator().manual_seed(2))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = [_bytes(encode_stages(stages, x[i], g1, None)) for i in range(3)]
    assert [_bytes(e) for e in encode_stages_rows(stages, x, [g2] * 3)] == expected
    with pytest.raises(CodecError, match="one generator per row"):
        encode_stages_rows(stages, x, [g2])
    with pytest.raises(CodecError, match="one generator per row"):
        get_codec("quant(bits=4)").encode_rows(x, [g2])


def test_topk_ties_go_to_the_lowest_positions() -> None:
    mag = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 2.0, 3.0])
    assert topk_indices(mag, 4).tolist() == [1, 2, 3, 6]
    assert topk_indices(mag, 2).tolist() == [1, 6]
    assert topk_indices(torch.zeros(10), 3).tolist() == [0, 1, 2]
    # the sampled-candidate path of a large tensor follows the same rule
    big = torch.zeros(20000)
    big[5000:] = 1.0
    assert topk_indices(big, 100).tolist() == list(range(5000, 5100))
    rows = torch.stack([mag, mag.flip(0), torch.zeros(7)])
    assert topk_rows(rows, 4).tolist() == [topk_indices(r, 4).tolist() for r in rows]
    assert topk_rows(rows, 7).tolist() == [list(range(7))] * 3
    # large rows (the batched candidate selection) with ties at the boundary, and without
    g = torch.Generator().manual_seed(4)
    wide = torch.rand(4, 20000, generator=g)
    wide[0] = big
    wide[1, wide[1] > 0.99] = 0.995  # ~200 values tied above the 100th largest
    wide[2, ::2] = 0.0
    for k in (100, 200, 2500):
        assert torch.equal(topk_rows(wide, k), torch.stack([topk_indices(r, k) for r in wide]))


ROW_SPECS = [
    "identity",
    "quant(bits=8)",
    "quant(bits=2, stochastic=true, chunk=5)",
    "quant(bits=1, stochastic=true, chunk=3)",
    "quant(bits=4, scale=norm, chunk=4)",
    "topk(0.3)",
    "topk(0.05) | quant(bits=3, stochastic=true, chunk=2)",
    "stc(0.2)",
]


@given(
    spec=st.sampled_from(ROW_SPECS),
    rows=st.integers(1, 4),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    levels=st.sampled_from([2, 3, 1000]),  # few distinct values: top-k ties everywhere
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_encode_rows_property(spec: str, rows: int, shape: list[int], levels: int, seed: int) -> None:
    codec = get_codec(spec)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-levels, levels + 1, (rows, *shape), generator=g).float() / levels).mul_(0.3)
    a = [torch.Generator().manual_seed(seed + i) for i in range(rows)]
    b = [torch.Generator().manual_seed(seed + i) for i in range(rows)]
    expected = [_bytes(codec.encode(x[i].clone(), a[i])) for i in range(rows)]
    encoded = codec.encode_rows(x, b)
    assert [_bytes(e) for e in encoded] == expected
    trees = [finalize(e) for e in encoded]
    assert torch.equal(decode_tree_rows(trees), torch.stack([decode_tree(t) for t in trees]))


@given(
    spec=st.sampled_from([*ROW_SPECS, "topk(0.2) | quant(bits=4) | zstd"]),
    rows=st.integers(1, 4),
    feedback=st.booleans(),
    levels=st.sampled_from([2, 1000]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_compress_many_property(spec: str, rows: int, feedback: bool, levels: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loop = [Compressor(spec, error_feedback=feedback, seed=seed + i) for i in range(rows)]
    many = [Compressor(spec, error_feedback=feedback, seed=seed + i) for i in range(rows)]
    for rnd in range(2):
        stack = {
            name: torch.randint(-levels, levels + 1, (rows, *shape), generator=g).float() / levels
            for name, shape in (("a", (3, 7)), ("b", ()), ("c", (40,)))
        }
        expected = [
            c.compress(Delta({k: v[i] for k, v in stack.items()}), base_version=rnd)
            for i, c in enumerate(loop)
        ]
        assert compress_many(many, stack, base_version=rnd) == expected
        for a, b in zip(loop, many, strict=True):
            assert state_equal(a.state_dict(), b.state_dict())


def test_a_failure_on_the_stack_rewinds_and_goes_device_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after the generators moved (here: decoding what was sent) leaves no trace of the stacked try."""
    import deltaplane.codecs.compressor as compressor

    def broken(trees):
        raise DecodeError("simulated")

    monkeypatch.setattr(compressor, "decode_tree_rows", broken)
    spec = "topk(0.1) | quant(bits=2, stochastic=true)"
    loop = [Compressor(spec, seed=s) for s in range(CLIENTS)]
    many = [Compressor(spec, seed=s) for s in range(CLIENTS)]
    for rnd in range(2):
        stack = stacked_round(rnd)
        expected = [c.compress(Delta({k: v[i] for k, v in stack.items()})) for i, c in enumerate(loop)]
        assert compress_many(many, stack) == expected
        for a, b in zip(loop, many, strict=True):
            assert state_equal(a.state_dict(), b.state_dict())
