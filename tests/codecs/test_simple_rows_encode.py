"""The stacked encode of ``randk``, ``sign``, ``ternary``, ``fp16`` and ``bf16``: exactly each row's own encode
(bytes, every random draw, the generators' end states, errors), and taken by ``compress_many`` and a batched run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.codecs.test_ragged_rows import _digest

from deltaplane.codecs import Compressor, compress_many, get_codec
from deltaplane.codecs.base import Codec, decode_tree, decode_tree_rows, split_lossless
from deltaplane.codecs.quantize import BF16, FP16, Sign, _Cast
from deltaplane.codecs.sparsify import RandK
from deltaplane.codecs.ternary import Ternary, pack_trits, pack_trits_rows
from deltaplane.codecs.wire import WireHeader, finalize, pack
from deltaplane.delta import Delta
from deltaplane.errors import CodecError
from deltaplane.sim import RunConfig, run_simulation

SPECS = [
    "randk(0.01)",
    "randk(0.3)",
    "randk(0.2, unbiased=true)",
    "randk(1.0)",
    "sign",
    "fp16",
    "bf16",
    "ternary",
    "ternary(chunk=7)",
    "ternary(chunk=1)",
    "ternary(chunk=512)",
    "randk(0.5) | fp16",
    "randk(0.4) | quant(bits=3, stochastic=true, chunk=5)",
]


def _bytes(e: object) -> bytes:
    return pack({"t": (torch.float32, finalize(e))}, WireHeader())  # type: ignore[arg-type]


def _stack(shape: tuple[int, ...], rows: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *shape, generator=g) * torch.rand(rows, *[1] * len(shape), generator=g)
    if rows > 1:
        x[1] = 0.0  # a row of zeros: ternary's scale 0, sign's mean 0
    if rows > 2:
        x[2].view(-1)[::3] = -0.0  # sign(-0.0) >= 0, and -0.0 kept as it is by a cast
    if rows > 3:
        x[3].view(-1)[: x[3].numel() // 2] = 0.5  # ties at a chunk's max
    return x.to(dtype)


def _agree(spec: str, x: torch.Tensor, seed: int, *, decode: bool = True) -> None:
    """``encode_rows`` gives every row's ``encode`` bytes and leaves every generator where the loop leaves it."""
    body, _ = split_lossless(get_codec(spec))
    rows = x.shape[0]
    a = [torch.Generator().manual_seed(seed + i) for i in range(rows)]
    b = [torch.Generator().manual_seed(seed + i) for i in range(rows)]
    want = [_bytes(body.encode(x[i].clone(), a[i])) for i in range(rows)]
    got = body.encode_rows(x, b)
    assert [_bytes(e) for e in got] == want
    assert all(torch.equal(p.get_state(), q.get_state()) for p, q in zip(a, b, strict=True))
    if decode and rows and x[0].numel():  # and back: the stacked decode reads them as the per-row decode does
        trees = [finalize(e) for e in got]
        stacked, one = decode_tree_rows(trees), torch.stack([decode_tree(t) for t in trees])
        assert torch.equal(stacked.view(torch.int32), one.view(torch.int32))  # NaN and -0.0 bit for bit


@given(
    spec=st.sampled_from(SPECS),
    shape=st.sampled_from(
        [(), (1,), (2,), (5,), (7,), (3, 5), (8, 1, 3, 3), (40, 25), (1031,), (0,), (3, 0)]
    ),
    rows=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_encode_rows_equals_the_per_row_encode(spec: str, shape, rows: int, dtype, seed: int) -> None:
    _agree(spec, _stack(shape, rows, seed, dtype), seed)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spec", ["randk(0.01)", "sign", "fp16", "bf16", "ternary", "ternary(chunk=4099)"])
@pytest.mark.parametrize("n", [16384, 32769, 300001])
def test_long_rows(spec: str, n: int, threads: int) -> None:
    """Rows past a reduction's parallel grain (32768) and past ternary's group size, on one and two threads:
    sign's per-row mean is the one ``encode`` takes (a stacked mean differs there on two threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _agree(spec, _stack((n,), 3, n), 5)
    finally:
        torch.set_num_threads(before)


def test_a_non_contiguous_stack() -> None:
    x = _stack((30, 40), 4, 3).transpose(1, 2)
    for spec in ("randk(0.3)", "sign", "fp16", "bf16", "ternary(chunk=7)"):
        _agree(spec, x, 9)


@pytest.mark.parametrize("spec", ["randk(0.3)", "ternary(chunk=5)", "randk(0.4) | ternary"])
def test_rows_sharing_a_generator_draw_row_after_row(spec: str) -> None:
    body = get_codec(spec)
    x = _stack((7, 9), 4, 11)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = [_bytes(body.encode(x[i], g1)) for i in range(4)]
    assert [_bytes(e) for e in body.encode_rows(x, [g2] * 4)] == want
    assert torch.equal(g1.get_state(), g2.get_state())


def test_fp16_range_is_checked_per_row() -> None:
    """A row beyond ±65504 raises encode's error; a row holding NaN is in range, as ``encode`` sees it, even
    beside a huge value (a max over the whole stack would be NaN and let the bad row through)."""
    codec = get_codec("fp16")
    x = torch.zeros(3, 10)
    x[1, 4] = 7e4
    with pytest.raises(CodecError, match="float16 range"):
        codec.encode_rows(x, [torch.Generator() for _ in range(3)])
    x[1, 5] = float("nan")  # NaN and 7e4 in one row: encode lets it through (max is NaN)
    x[2, 0] = -7e4
    with pytest.raises(CodecError, match="float16 range"):  # row 2 still raises
        codec.encode_rows(x, [torch.Generator() for _ in range(3)])
    x[2, 0] = 1.0
    _agree("fp16", x, 0)


def test_ternary_non_finite_rows_go_one_by_one() -> None:
    """A non-finite value makes its group of rows take ``encode`` itself (before any draw), the bytes the same."""
    x = _stack((50,), 4, 2)
    x[2, 7] = float("inf")
    x[3, 1] = float("nan")
    _agree("ternary(chunk=8)", x, 1, decode=False)  # a non-finite scale: the receiver refuses it
    _agree("ternary", x, 1, decode=False)
    long = _stack((300001,), 3, 2)  # one row a group: the first group stacked, the second one by one
    long[1, 5] = float("inf")
    _agree("ternary", long, 1, decode=False)


def test_pack_trits_rows() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1, 4, 5, 6, 11, 100):
        t = torch.randint(0, 3, (4, n), generator=g, dtype=torch.uint8).numpy()
        assert [r.tobytes() for r in pack_trits_rows(t)] == [pack_trits(r) for r in t]


# -- the stacked path is the one taken ---------------------------------------------------------------------
ENCODES = {"randk(0.05)": RandK, "sign": Sign, "ternary": Ternary, "fp16": FP16, "bf16": BF16}


@pytest.mark.filterwarnings("ignore:codec 'ternary\\(chunk=0\\)' is not a contraction")
@pytest.mark.parametrize("spec", sorted(ENCODES))
@pytest.mark.parametrize("feedback", [True, False])
def test_compress_many_never_encodes_a_row_alone(
    monkeypatch: pytest.MonkeyPatch, spec: str, feedback: bool
) -> None:
    """compress_many's payloads and residuals are the per-device loop's, without one per-row ``encode``
    (fails before: the default ``encode_rows`` called it once a row)."""
    g = torch.Generator().manual_seed(1)
    stacks = [
        {"w": torch.randn(6, 16, 8, generator=g) * 0.1, "b": torch.randn(6, 16, generator=g)}
        for _ in range(2)
    ]
    loop = [Compressor(spec, error_feedback=feedback, seed=s) for s in range(6)]
    want = [
        [c.compress(Delta({k: v[i] for k, v in s.items()}), base_version=r) for i, c in enumerate(loop)]
        for r, s in enumerate(stacks)
    ]

    def refuse(*args: object) -> object:
        raise AssertionError("per-row encode called")

    cls = ENCODES[spec]
    monkeypatch.setattr(cls, "encode", refuse)
    if cls in (FP16, BF16):
        monkeypatch.setattr(_Cast, "encode", refuse)
    many = [Compressor(spec, error_feedback=feedback, seed=s) for s in range(6)]
    for r, s in enumerate(stacks):
        assert compress_many(many, s, base_version=r) == want[r]
    for a, b in zip(loop, many, strict=True):
        assert a.state_dict().keys() == b.state_dict().keys()
        if feedback:
            assert all(torch.equal(a.state.residual[k], b.state.residual[k]) for k in ("w", "b"))


@pytest.mark.filterwarnings("ignore:codec 'ternary\\(chunk=0\\)' is not a contraction")
@pytest.mark.parametrize("spec", sorted(ENCODES))
def test_batched_run_encodes_on_the_stack(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    """A 2-round, 5-client batched run calls ``encode`` only for the wire session's template (once a tensor),
    not once a device a round (fails before), and its bytes and final weights are the per-row path's."""
    cfg = RunConfig(clients=5, rounds=2, engine="batched", codec=spec)
    calls: list[str] = []
    cls = ENCODES[spec]
    per_row = cls.encode

    def counted(*args: object) -> object:
        calls.append(spec)
        return per_row(*args)

    with monkeypatch.context() as m:
        m.setattr(cls, "encode", counted)
        stacked = run_simulation(cfg)
    assert len(calls) <= len(stacked.final_state), len(calls)
    monkeypatch.setattr(cls, "encode_rows", Codec.encode_rows)
    loop = run_simulation(cfg)
    assert [r.uplink_bytes for r in stacked.rounds] == [r.uplink_bytes for r in loop.rounds]
    assert _digest(stacked.final_state) == _digest(loop.final_state)
