"""Stochastic codecs are unbiased: the mean of many independent encodes converges to the input.

Each decoded coordinate is a bounded random variable (it takes values in an interval of width ``R``: one
quantization step for stochastic rounding, the scale for TernGrad, ``|x|/p`` for unbiased rand-k). Hoeffding's
inequality bounds the deviation of the mean of ``N`` independent encodes: ``P(|mean - E| >= t) <=
2 exp(-2 N t² / R²)``. With ``t = R sqrt(ln(2 d / δ) / (2 N))`` a union bound over the ``d`` coordinates puts
the chance that *any* coordinate exceeds ``t`` below ``δ = 1e-6`` if the codec is unbiased (``E = x``). Each
test also checks that a biased counterpart fails the same bound, so the bound has the power to catch bias.
"""

import math

import torch

import deltaplane as dp
from deltaplane.codecs import decode_tree
from deltaplane.codecs.wire import finalize

DELTA = 1e-6


def _mean_of_encodes(spec: str, x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    codec = dp.get_codec(spec)
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(n):
        total += decode_tree(finalize(codec.encode(x, g))).double()
    return (total / n).float()


def _hoeffding(width: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return width * math.sqrt(math.log(2 * d / DELTA) / (2 * n))


X = torch.randn(200, generator=torch.Generator().manual_seed(11))


def test_qsgd_norm_scaled_stochastic_quant_is_unbiased() -> None:
    n, bits = 1500, 2
    mean = _mean_of_encodes(f"quant(bits={bits}, stochastic=true, chunk=50, scale=norm)", X, n)
    norms = torch.cat([c.norm().reshape(1) for c in X.split(50)]).repeat_interleave(50)
    step = norms / (2 ** (bits - 1) - 1)  # each coordinate lands on one of two grid points a step apart
    assert bool(((mean - X).abs() <= _hoeffding(step, n, X.numel())).all())
    det = decode_tree(finalize(dp.get_codec(f"quant(bits={bits}, chunk=50, scale=norm)").encode(X, None)))
    assert not bool(((det - X).abs() <= _hoeffding(step, n, X.numel())).all())


def test_max_scaled_stochastic_quant_is_unbiased() -> None:
    n, bits = 1000, 3
    mean = _mean_of_encodes(f"quant(bits={bits}, stochastic=true, chunk=40)", X, n)
    maxes = torch.cat([c.abs().max().reshape(1) for c in X.split(40)]).repeat_interleave(40)
    step = maxes / (2 ** (bits - 1) - 1)
    assert bool(((mean - X).abs() <= _hoeffding(step, n, X.numel())).all())


def test_ternary_is_unbiased() -> None:
    n = 2000
    mean = _mean_of_encodes("ternary", X, n)
    width = X.abs().max().expand(X.numel())  # values in {0, s·sign(x)}
    assert bool(((mean - X).abs() <= _hoeffding(width, n, X.numel())).all())
    sign = decode_tree(finalize(dp.get_codec("sign").encode(X, None)))  # sign is biased
    assert not bool(((sign - X).abs() <= _hoeffding(width, n, X.numel())).all())


def test_unbiased_randk_is_unbiased_and_plain_randk_is_not() -> None:
    n, ratio = 1500, 0.25
    mean = _mean_of_encodes(f"randk({ratio}, unbiased=true)", X, n)
    width = X.abs() / ratio  # values in {0, x / p}
    assert bool(((mean - X).abs() <= _hoeffding(width, n, X.numel())).all())
    plain = _mean_of_encodes(f"randk({ratio})", X, 200)  # E = p·x
    assert torch.allclose(plain, ratio * X, atol=float(_hoeffding(X.abs().max(), 200, X.numel())))


def test_one_bit_stochastic_quant_is_unbiased() -> None:
    n = 2000
    mean = _mean_of_encodes("quant(bits=1, stochastic=true, chunk=200)", X, n)
    width = 2 * X.abs().max().expand(X.numel())  # values in {-s, +s}
    assert bool(((mean - X).abs() <= _hoeffding(width, n, X.numel())).all())
