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


#: fractional parts to round: plain, a tie, near 1, and small ones (3·2⁻¹⁶ is below an 8-bit or 12-bit
#: dither's resolution: such a dither would never round it up)
FRACTIONS = (0.3, 0.5, 1 - 2**-10, 2**-12, 3 * 2**-16)


def _tolerance(bits: int) -> float:
    """The documented bound (quantize.Dither) on |P(round up) - f|: 2⁻¹⁷ (the 16-bit dither) + (2L + 2)·2⁻²².

    The second term is float32's rounding in computing ``q = x·L/scale + L`` and ``q + u``: four roundings of
    values up to ``2L + 1``, each within 2⁻²⁴ of it (2⁻¹⁸ for 4-bit codes, 2⁻¹⁴ for 8-bit ones).
    """
    levels = 2 ** (bits - 1) - 1 if bits > 1 else 1
    return 2**-17 + (2 * levels + 2) * 2**-22


def _round_up_counts(spec: str, bits: int, per: int) -> tuple[list[tuple[float, int]], int]:
    """[(exact fraction, number rounded up)] for ``n`` copies of a value at each of ``FRACTIONS``, and ``n``.

    Every chunk starts with the value that sets its scale so that ``q = x·L/scale + L`` is ``x + L`` (for
    ``bits=1``: ``P(+) = x + ½``); the others sit at ``q = j + f``. Whether one rounded up is read off its
    decoded value, so the count is independent of the codec's internals.
    """
    chunk = 4096
    big = float(2 ** (bits - 1) - 1) if bits > 1 else 0.5  # the scale: q = x + L, or P(+) = x + ½
    shift = -big  # x = f + j - L (bits >= 2, j = 1 so q = 1 + f), or f - ½ (bits = 1)
    j = 1.0 if bits > 1 else 0.0
    xs, fracs = [], []
    for f in FRACTIONS:
        x = torch.full((per,), f + j + shift, dtype=torch.float32)
        x[::chunk] = big
        xs.append(x)
        fracs.append(float(x[1].double()) - j - shift)  # the fraction float32 holds
    x = torch.cat(xs)
    got = decode_tree(finalize(dp.get_codec(spec).encode(x, torch.Generator().manual_seed(bits))))
    out = []
    for i, f in enumerate(fracs):
        keep = torch.ones(per, dtype=torch.bool)
        keep[::chunk] = False
        xi, gi = xs[i][keep], got[i * per : (i + 1) * per][keep]
        out.append((f, int((gi > xi).sum())))  # decoded above the input: rounded up
    return out, per - -(-per // chunk)


def _consistent(count: int, n: int, f: float, tol: float) -> bool:
    """Whether the exact (Clopper-Pearson) 1 - 1e-6 interval of P(round up) meets [f - tol, f + tol]."""
    from scipy.stats import binomtest

    ci = binomtest(count, n).proportion_ci(confidence_level=1 - DELTA)
    return ci.low <= f + tol and ci.high >= f - tol


def test_stochastic_rounding_rounds_up_with_the_fractional_part() -> None:
    # quant(bits, stochastic=true) rounds q up with probability f (its fractional part) to within the
    # documented tolerance: for each fraction, the number of ~2²⁰ copies that rounded up is checked with
    # scipy's exact binomial interval
    for bits in (1, 2, 4, 8):
        counts, n = _round_up_counts(f"quant(bits={bits}, stochastic=true, chunk=4096)", bits, 1 << 20)
        for f, count in counts:
            assert _consistent(count, n, f, _tolerance(bits)), (bits, f, count / n)
    # power: nearest rounding (deterministic: P = 0 or 1, half up at the tie) fails the same check, and so
    # does any rule that never rounds up a fraction of 3·2⁻¹⁶ (too fine for an 8-bit or 12-bit dither)
    counts, n = _round_up_counts("quant(bits=2, chunk=4096)", 2, 1 << 20)
    assert not any(_consistent(c, n, f, _tolerance(2)) for f, c in counts)
    assert not _consistent(0, n, FRACTIONS[-1], _tolerance(2))
