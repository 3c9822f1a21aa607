"""The full codec suite: exact byte counts, round-trip error bounds and codec-specific invariants."""

import math

import numpy as np
import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import Encoded, decode_tree
from deltaplane.codecs.entropy import index_sizes
from deltaplane.codecs.sparsify import random_positions
from deltaplane.codecs.wire import finalize


def _roundtrip(spec: str, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, Encoded]:
    e = finalize(dp.get_codec(spec).encode(x, torch.Generator().manual_seed(seed)))
    return decode_tree(e), e


X = torch.randn(3001, generator=torch.Generator().manual_seed(0)) * 0.1
M = torch.randn(96, 80, generator=torch.Generator().manual_seed(1))


# -- quantizers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quant_norm_scaling_bytes_and_bound(bits: int) -> None:
    chunk = 256
    y, e = _roundtrip(f"quant(bits={bits}, chunk={chunk}, scale=norm)", X)
    n = X.numel()
    assert e.nbytes() == math.ceil(n * bits / 8) + 4 * math.ceil(n / chunk)
    norms = torch.cat([c.norm().reshape(1) for c in X.split(chunk)])
    per_value = norms.repeat_interleave(chunk)[:n]
    err = (y - X).abs()
    bound = 2 * per_value if bits == 1 else per_value / (2 ** (bits - 1) - 1) / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all())


def test_sign_is_mean_magnitude_times_sign() -> None:
    y, e = _roundtrip("sign", X)
    assert e.nbytes() == math.ceil(X.numel() / 8) + 4
    scale = X.abs().mean()
    assert torch.allclose(y, torch.where(X >= 0, scale, -scale))


def test_ternary_values_bytes_and_signs() -> None:
    y, e = _roundtrip("ternary", X)
    assert e.nbytes() == math.ceil(X.numel() / 5) + 4
    s = X.abs().max()
    assert set(torch.unique(y).tolist()) <= {-float(s), 0.0, float(s)}
    nz = y != 0
    assert bool((torch.sign(y[nz]) == torch.sign(X[nz])).all())
    y2, e2 = _roundtrip("ternary(chunk=100)", X)
    assert e2.nbytes() == math.ceil(X.numel() / 5) + 4 * math.ceil(X.numel() / 100)
    assert float((y2 - X).abs().max()) <= float(X.abs().max())


# -- sparsifiers -----------------------------------------------------------------------------------------
def test_topk_exact_selection_matches_a_full_sort() -> None:
    for seed, n, ratio in [(4, 200_000, 0.01), (5, 50_000, 0.05), (6, 9000, 0.1)]:
        x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        x[: n // 10] *= 5  # structured magnitudes: the strided sample sees a skewed picture
        y, _e = _roundtrip(f"topk({ratio})", x)
        k = math.ceil(ratio * n)
        top = torch.sort(x.abs(), descending=True).indices[:k]
        assert torch.equal(torch.nonzero(y).squeeze(1), top.sort().values)


def test_topk_approx_keeps_about_k_above_a_sampled_threshold() -> None:
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(4))
    y, e = _roundtrip("topk(0.01, approx=true)", x)
    kept = y != 0
    count = int(kept.sum())
    # threshold = 41st largest of a 4096-value sample: the kept count has a relative sd of ~1/sqrt(41) = 16%
    assert 0.7 * 2000 < count < 1.3 * 2000
    assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())  # still the largest ones
    assert torch.equal(y[kept], x[kept])
    assert e.nbytes() == 4 * count + len(e.fields["idx"])
    assert dp.get_codec("topk(0.01, approx=false)").spec == "topk(ratio=0.01)"


def test_randk_positions_from_the_seed_only() -> None:
    n, ratio = 50_000, 0.02
    y, e = _roundtrip(f"randk({ratio})", torch.arange(1.0, n + 1))
    idx = random_positions(int(e.meta["seed"]), n, ratio)
    assert e.nbytes() == 4 * len(idx)  # values only: no position bytes travel
    # Binomial(n, ratio): mean 1000, sd ~ 31; 6 sd either side
    assert abs(len(idx) - n * ratio) < 6 * math.sqrt(n * ratio * (1 - ratio))
    assert torch.equal(torch.nonzero(y).squeeze(1), torch.from_numpy(idx))
    assert torch.equal(y[idx], torch.from_numpy(idx + 1.0).float())
    yu, _ = _roundtrip(f"randk({ratio}, unbiased=true)", torch.arange(1.0, n + 1))
    assert torch.allclose(yu[idx], torch.from_numpy(idx + 1.0).float() / ratio)


def test_random_positions_are_a_fixed_function_of_the_seed() -> None:
    # pinned values: another implementation of the wire format must regenerate exactly these positions
    assert random_positions(12345, 64, 0.1).tolist() == random_positions(12345, 64, 0.1).tolist()
    assert random_positions(0, 10, 1.0).tolist() == list(range(10))
    a = random_positions(7, (1 << 20) + 5, 0.001)
    b = random_positions(7, 1 << 20, 0.001)
    assert np.array_equal(a[a < (1 << 20)], b)  # blocks do not change the sequence


def test_threshold_keeps_exactly_the_large_values() -> None:
    y, e = _roundtrip("threshold(tau=0.2)", X)
    keep = X.abs() >= 0.2
    assert torch.equal(y != 0, keep)
    assert torch.equal(y[keep], X[keep])
    idx = torch.nonzero(keep).squeeze(1).numpy()
    assert e.nbytes() == 4 * int(keep.sum()) + min(index_sizes(idx, X.numel()).values())


def test_stc_is_ternary_on_the_top_k_with_golomb_positions() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(5))
    y, e = _roundtrip("stc(0.01)", x)
    k = 1000
    top = torch.topk(x.abs(), k).indices.sort().values
    assert torch.equal(torch.nonzero(y).squeeze(1), top)
    mu = float(x.abs()[top].mean())
    assert torch.allclose(y[top], torch.sign(x[top]) * mu)
    assert e.meta["ix"] == "golomb"
    sizes = index_sizes(top.numpy(), x.numel())
    assert e.nbytes() == sizes["golomb"] + k // 8 + 4
    # geometric gaps have entropy ~ log2(1/p) + 1.44 bits; Rice coding stays within ~0.5 bit of it
    assert sizes["golomb"] * 8 <= k * (math.log2(100) + 2) + 8 + 16
    assert sizes["golomb"] < 0.85 * sizes["varint"]


# -- low rank --------------------------------------------------------------------------------------------
def test_powersgd_exact_on_low_rank_and_bytes() -> None:
    g = torch.Generator().manual_seed(6)
    low = torch.randn(96, 3, generator=g) @ torch.randn(3, 80, generator=g)
    y, e = _roundtrip("powersgd(rank=3)", low)
    assert e.nbytes() == 4 * 3 * (96 + 80)
    assert float((y - low).norm() / low.norm()) < 1e-5


def test_powersgd_warm_start_converges_to_svd() -> None:
    codec = dp.get_codec("powersgd(rank=4)")
    s = torch.linalg.svdvals(M)
    best = float(torch.sqrt((s[4:] ** 2).sum()) / M.norm())
    state: dict = {}
    g = torch.Generator().manual_seed(0)
    errs = []
    for _ in range(30):
        y = decode_tree(finalize(codec.encode_stateful(M, g, state)))
        errs.append(float((y - M).norm() / M.norm()))
    assert "q" in state and tuple(state["q"].shape) == (80, 4)
    assert errs[-1] <= 1.01 * best  # subspace iteration across rounds reaches the truncated SVD
    assert errs[-1] < errs[0]


def test_powersgd_fallback_for_vectors_and_small_tensors() -> None:
    y, e = _roundtrip("powersgd(rank=2, fallback='quant(bits=8)')", X)
    assert e.codec.startswith("quant(bits=8")
    assert float((y - X).abs().max()) <= float(X.abs().max()) / 127
    _, e = _roundtrip("powersgd(rank=2, min_size=100000)", M)
    assert e.codec == "fp16"
    _, e = _roundtrip("powersgd(rank=50)", torch.randn(60, 60))  # 50 * 120 >= 3600: no saving
    assert e.codec == "fp16"


def test_powersgd_factors_feed_the_next_stage() -> None:
    y, e = _roundtrip("powersgd(rank=4) | quant(bits=8, chunk=64)", M)
    assert e.fields["p"].codec.startswith("quant") and e.fields["q"].codec.startswith("quant")
    assert e.nbytes() == 4 * (96 + 80) + 4 * (math.ceil(4 * 96 / 64) + math.ceil(4 * 80 / 64))
    ref, _ = _roundtrip("powersgd(rank=4)", M)
    assert float((y - ref).norm() / ref.norm()) < 0.02


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quant(bits=4, scale=abs)", "scale must be 'max' or 'norm'"),
        ("ternary(chunk=-1)", "chunk"),
        ("topk(0.1, approx=1)", "approx must be true or false"),
        ("randk(0)", r"ratio must be in \(0, 1\]"),
        ("threshold(tau=-1)", "tau must be a positive"),
        ("stc(1.5)", "ratio"),
        ("powersgd(rank=0)", "rank must be an integer in 1..64"),
        ("powersgd(fallback='powersgd')", "fallback must be a plain codec"),
        ("powersgd(fallback='nope')", "bad fallback"),
        ("zstd(level=30)", "level must be an integer in 1..22"),
        ("zstd | quant(8)", "must be the last stage"),
        ("policy(rules='*: fp16') | quant(8)", "only be followed by a lossless stage"),
    ],
)
def test_bad_specs_say_what_to_fix(spec: str, message: str) -> None:
    with pytest.raises(dp.SpecError, match=message):
        dp.get_codec(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "quant(bits=4, stochastic=true, chunk=64, scale=norm)",
        "sign",
        "ternary(chunk=128)",
        "topk(ratio=0.01, approx=true)",
        "randk(ratio=0.1, unbiased=true)",
        "threshold(tau=0.5)",
        "stc(ratio=0.01)",
        "powersgd(rank=2, iters=2, min_size=0, fallback='quant(bits=8, stochastic=false, chunk=512, scale=max)')",
        "stc(ratio=0.01) | zstd(level=3)",
        "policy(rules=\"*.bias | numel<100: fp16; *: powersgd(rank=2, iters=1, min_size=4096, fallback='quant(bits=4, stochastic=false, chunk=512, scale=max)')\")",
    ],
)
def test_canonical_specs_round_trip(spec: str) -> None:
    c = dp.get_codec(spec)
    assert c.spec == spec
    assert dp.get_codec(repr(c)).spec == spec
