"""Round-trip error bounds and exact byte counts for every codec of the first set."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltaplane as dp
from deltaplane.codecs import Encoded, decode_tree, encode_delta
from deltaplane.codecs.wire import finalize


def _roundtrip(spec: str, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, Encoded]:
    codec = dp.get_codec(spec)
    e = finalize(codec.encode(x, torch.Generator().manual_seed(seed)))
    return decode_tree(e), e


X = torch.randn(3000, generator=torch.Generator().manual_seed(0)) * 0.1


def test_identity_is_exact_and_raw() -> None:
    y, e = _roundtrip("identity", X)
    assert torch.equal(y, X)
    assert e.nbytes() == 4 * X.numel()


@pytest.mark.parametrize(("spec", "rel"), [("fp16", 2**-11), ("bf16", 2**-8)])
def test_half_precision_bounds(spec: str, rel: float) -> None:
    y, e = _roundtrip(spec, X)
    assert e.nbytes() == 2 * X.numel()
    assert float(((y - X).abs() / X.abs()).max()) <= rel


def test_fp16_refuses_overflow() -> None:
    with pytest.raises(dp.CodecError, match="float16 range"):
        _roundtrip("fp16", torch.tensor([1e6]))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("stochastic", [False, True])
def test_quant_error_bound_and_bytes(bits: int, stochastic: bool) -> None:
    chunk = 256
    y, e = _roundtrip(f"quant(bits={bits}, stochastic={str(stochastic).lower()}, chunk={chunk})", X)
    n = X.numel()
    assert e.nbytes() == math.ceil(n * bits / 8) + 4 * math.ceil(n / chunk)
    scales = torch.nn.functional.pad(X, (0, (-n) % chunk)).view(-1, chunk).abs().amax(1)
    per_value = scales.repeat_interleave(chunk)[:n]
    err = (y - X).abs()
    if bits == 1:
        bound = 2 * per_value  # sign and scale only
    else:
        step = per_value / (2 ** (bits - 1) - 1)
        bound = step if stochastic else step / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all())


def test_quant_keeps_zero_exact_and_zero_chunks() -> None:
    x = torch.zeros(1000)
    x[10] = 1.0
    y, _ = _roundtrip("quant(bits=4, chunk=100)", x)
    assert torch.equal(y, x)


def test_quant_stochastic_is_unbiased() -> None:
    # mean of N independent encodes: each has per-value std <= step/2, so the mean's error is
    # below 5 * step / (2 * sqrt(N)) with overwhelming probability (5 sigma)
    x = torch.randn(500, generator=torch.Generator().manual_seed(1))
    n = 400
    codec = dp.get_codec("quant(bits=2, stochastic=true, chunk=500)")
    g = torch.Generator().manual_seed(3)
    mean = sum(decode_tree(finalize(codec.encode(x, g))) for _ in range(n)) / n
    step = float(x.abs().max())  # bits=2: one level each side, step = scale
    assert float((mean - x).abs().max()) < 5 * step / (2 * math.sqrt(n))
    det = decode_tree(finalize(dp.get_codec("quant(bits=2)").encode(x, g)))
    assert float((det - x).abs().mean()) > 3 * float((mean - x).abs().mean())  # rounding alone is biased


def test_quant_one_bit_stochastic_unbiased() -> None:
    x = torch.tensor([0.5, -0.25, 1.0, 0.0])
    codec = dp.get_codec("quant(bits=1, stochastic=true, chunk=4)")
    g = torch.Generator().manual_seed(0)
    n = 4000
    mean = sum(decode_tree(finalize(codec.encode(x, g))) for _ in range(n)) / n
    assert torch.allclose(mean, x, atol=5 / math.sqrt(n))


def test_topk_keeps_largest() -> None:
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 4.0, 0.3])
    y, e = _roundtrip("topk(0.375)", x)  # k = 3
    assert y.tolist() == [0, -5.0, 0, 3.0, 0, 0, 4.0, 0]
    assert e.meta["ix"] in ("varint", "bitmap")


@given(
    n=st.integers(1, 5000),
    ratio=st.floats(0.0005, 1.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_topk_property(n: int, ratio: float, seed: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    y, e = _roundtrip(f"topk({ratio})", x)
    k = min(n, max(1, math.ceil(ratio * n)))
    kept = y != 0
    assert int(kept.sum()) == k
    assert torch.equal(y[kept], x[kept])
    if k < n:
        assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())
    assert e.nbytes() <= 4 * k + min(5 * k, math.ceil(n / 8))


def test_pipeline_topk_then_quant() -> None:
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    y, e = _roundtrip("topk(0.01) | quant(bits=8)", x)
    k = math.ceil(0.01 * x.numel())
    assert y.shape == x.shape
    assert int((y != 0).sum()) <= k
    assert isinstance(e.fields["values"], Encoded)
    assert e.fields["values"].codec.startswith("quant(")
    assert e.fields["values"].nbytes() == k + 4  # one byte a value, one scale
    top = torch.topk(x.abs().reshape(-1), k).values.min()
    mask = x.abs() >= top
    assert float((y[mask] - x[mask]).abs().max()) <= float(x.abs().max()) / 254 + 1e-6


def test_encode_delta_keeps_integer_buffers_raw() -> None:
    d = dp.Delta({"w": torch.randn(10), "count": torch.tensor([5, 6])})
    trees = encode_delta(d, dp.get_codec("quant(bits=2)"), torch.Generator())
    assert trees["count"][1].codec == "identity" and trees["count"][0] == torch.int64
