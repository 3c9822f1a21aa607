"""Acceptance (issue #14, DP): the ε deltaplane reports is never below what its mechanism, as run, spends.

For each setting, fixed and adaptive clipping:

1. **Sampling actually used.** Draw 4,000 rounds with :func:`deltaplane.aggregation.sampling.sample_round` as the
   simulator does under central DP and measure the inclusion rate q̂, the variance of the round size against the
   Binomial(N, q) of Poisson sampling, and the share of empty rounds.
2. **Reported ε.** Build the run's aggregator from a :class:`~deltaplane.sim.RunConfig` (``build_aggregator``: the
   accountant's q, ``expected_clients``, the adaptive clip's count noise) and run T rounds over the sampled
   participants; read ``measurements["epsilon"]`` after the last round.
3. **Independent ε.** On neighbouring datasets (one client added, with an update norm under, at and far over
   the clip), measure how far the released values move in units of the noise actually added to them: the
   aggregate (same seed, so the shift is exact; the noise std is read off 100,000 coordinates no client touched)
   and the next round's clip (the post-processed noisy count; its noise std over 20,000 draws). The worst
   neighbour's joint shift ``s`` makes the round one Gaussian mechanism of multiplier ``1/s``, which
   dp-accounting's RDP accountant composes T times with Poisson sampling at the measured rate q̂ — deltaplane's
   accountant is not used.

The measured noise stds carry a sampling error (≈0.5% on the count's, 0.2% on the sum's), and q̂ its own, so the
table gives the mechanism's ε at the point estimates and at ±2 standard errors of the multiplier and of q̂; the
target is met when no reported ε lies below that range.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

import deltaplane as dp
from deltaplane.aggregation.sampling import sample_round
from deltaplane.sim import RunConfig

# (clients N, sample_fraction, z, rounds T, δ); the first is the audit's case
SETTINGS = [
    (20, 0.2, 1.0, 100, 1e-5),
    (100, 0.1, 1.1, 200, 1e-5),
    (1000, 0.01, 0.8, 500, 1e-5),
    (10, 1.0, 2.0, 50, 1e-3),
]
CLIPS = ["adaptive", "0.1"]
SAMPLE_ROUNDS = 4_000
COUNT_DRAWS = 20_000
DIM = 100_000
BASE = (
    0.05,
    0.2,
    0.03,
)  # round-1 update norms of the clients already there (the adaptive clip starts at 0.1)
NEIGHBOURS = (0.0999, 0.1, 0.5)  # the added client: under, at and far over the clip


def _config(n: int, f: float, z: float, delta: float, clip: str) -> RunConfig:
    return RunConfig(clients=n, sample_fraction=f, dp_noise=z, clip=clip, dp_delta=delta)


def measure_sampling(n: int, f: float) -> tuple[float, float, float]:
    """(q̂, round-size variance / (N q̂ (1 − q̂)), share of empty rounds) over SAMPLE_ROUNDS rounds."""
    sizes = np.array(
        [
            len(sample_round(n, f, np.random.default_rng([11, r]), central_dp=True))
            for r in range(SAMPLE_ROUNDS)
        ]
    )
    q = sizes.mean() / n
    ratio = sizes.var() / (n * q * (1 - q)) if 0 < q < 1 else float("nan")
    return float(q), float(ratio), float((sizes == 0).mean())


def reported_epsilon(cfg: RunConfig, rounds: int) -> float:
    """Run the config's chain for ``rounds`` rounds over Poisson-sampled clients; ε it reports at the end."""
    agg = cfg.build_aggregator(seed=0)
    agg.find(dp.DPFedAvg).set_layout({"w": torch.zeros(4)})
    g = torch.Generator().manual_seed(0)
    for r in range(rounds):
        agg.reset()
        for _ in sample_round(
            cfg.clients, cfg.sample_fraction, np.random.default_rng([12, r]), central_dp=True
        ):
            agg.add(dp.Delta({"w": 0.1 * torch.randn(4, generator=g)}), 1.0)
        agg.result()
    return agg.measurements["epsilon"]


def _round(cfg: RunConfig, norms, seed: int, dim: int) -> tuple[torch.Tensor, float]:
    """One round of the config's DP aggregator: (released aggregate, log of the next clip)."""
    agg = cfg.build_aggregator(seed=seed)
    for n in norms:
        w = torch.zeros(dim)
        w[0] = n
        agg.add(dp.Delta({"w": w}), 1.0)
    out = agg.result()["w"].double()
    return out, math.log(agg.find(dp.DPFedAvg).clipper.estimator.value)


def measure_sensitivity(cfg: RunConfig) -> tuple[float, float, float, float]:
    """(worst joint shift s, its relative standard error, worst sum shift, worst count shift), shifts in units
    of each release's own measured noise std, over the neighbouring datasets."""
    out, log_clip = _round(cfg, BASE, 0, DIM)
    sum_std = float(out[1:].std())
    chain = cfg.build_aggregator(seed=1)
    est = chain.find(dp.DPFedAvg).clipper.estimator
    first = est.value
    logs = []
    for _ in range(COUNT_DRAWS if est.adaptive else 100):
        chain.reset()
        if est.adaptive:
            est.state.value = first
        for n in BASE:
            chain.add(dp.Delta({"w": torch.tensor([n])}), 1.0)
        chain.result()
        logs.append(math.log(est.value))
    clip_std = float(np.std(logs))
    worst, worst_sum, worst_count, se = 0.0, 0.0, 0.0, 0.0
    for x in NEIGHBOURS:
        out2, log_clip2 = _round(cfg, (*BASE, x), 0, DIM)  # same seed: same noise, one client more
        s_sum = abs(float(out2[0] - out[0])) / sum_std
        s_count = abs(log_clip2 - log_clip) / clip_std if clip_std > 0 else 0.0
        s = math.hypot(s_sum, s_count)
        if s > worst:
            worst, worst_sum, worst_count = s, s_sum, s_count
            # relative standard error of s from the two std estimates (≈ 1/√(2n) each)
            se = (
                math.hypot(s_sum**2 / math.sqrt(2 * (DIM - 1)), s_count**2 / math.sqrt(2 * COUNT_DRAWS))
                / s**2
            )
    return worst, se, worst_sum, worst_count


def independent_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    acc.compose(event, rounds)
    return float(acc.get_epsilon(delta))


def main() -> None:
    from _record import record, table

    torch.set_num_threads(1)
    logging.getLogger("absl").setLevel(logging.ERROR)
    rows, ok = [], True
    for n, f, z, rounds, delta in SETTINGS:
        q_hat, var_ratio, empty = measure_sampling(n, f)
        for clip in CLIPS:
            t0 = time.perf_counter()
            cfg = _config(n, f, z, delta, clip)
            q = cfg.build_aggregator().find(dp.DPFedAvg).accountant.sampling_rate
            ours = reported_epsilon(cfg, rounds)
            s, se, s_sum, s_count = measure_sensitivity(cfg)
            sigma_b = getattr(
                cfg.build_aggregator().find(dp.DPFedAvg).clipper.estimator, "count_noise_std", 0
            )
            se_q = math.sqrt(q_hat * (1 - q_hat) / (n * SAMPLE_ROUNDS))  # standard error of q̂
            spent = independent_epsilon(1 / s, q_hat, rounds, delta)
            spent_lo = independent_epsilon(1 / (s * (1 - 2 * se)), q_hat - 2 * se_q, rounds, delta)
            spent_hi = independent_epsilon(1 / (s * (1 + 2 * se)), min(1.0, q_hat + 2 * se_q), rounds, delta)
            ok &= ours >= spent_lo
            rows.append(
                [
                    f"N={n}, m={cfg.clients_per_round()}, z={z:g}, T={rounds}, δ={delta:g}",
                    "adaptive" if clip == "adaptive" else f"fixed {clip}",
                    f"{q:g} / {q_hat:.4f}",
                    f"{var_ratio:.3f}" if not math.isnan(var_ratio) else "— (q=1)",
                    f"{empty:.3f}",
                    f"{1 / s_sum:.4f}",
                    f"{s_count * sigma_b:.3f}" if clip == "adaptive" else "—",
                    f"{1 / s:.4f}",
                    f"{ours:.3f}",
                    f"{spent:.3f} ({spent_lo:.3f}–{spent_hi:.3f})",
                    f"{ours / spent:.4f}",
                ]
            )
            print(rows[-1], f"{time.perf_counter() - t0:.1f}s", flush=True)
    body = (
        table(
            [
                "setting",
                "clip",
                "q accountant / q̂ sampler",
                "round-size var / Binomial",
                "empty rounds",
                "sum: measured multiplier",
                "count: moves by (clients)",
                "joint multiplier (measured)",
                "ε reported",
                "ε spent (dp-accounting, measured mechanism; ±2 s.e.)",
                "reported / spent",
            ],
            rows,
        )
        + f"\n\nTarget: the reported ε is never below the mechanism's — **{'PASS' if ok else 'MISS'}**. "
        "The sampler is Poisson at the accountant's rate (round sizes vary as Binomial(N, q); empty rounds occur "
        "and still release noise). One client moves the adaptive clip's released count by ½ (the centred count "
        "Σ(bᵢ − ½)), so the sum's multiplier z_Δ and the count's 2σ_b combine to exactly z. Before this fix the "
        "count was uncentred (it moved by 1): the same audit of the first setting measured ε ≈ 26.9 spent for "
        "16.08 reported (`tests/aggregation/test_dp_neighbours.py` run on the previous code). The spent ε is "
        "known to the precision of the measured noise stds: the range is the mechanism's ε at ±2 standard errors "
        "of its measured multiplier and sampling rate, and PASS means no reported ε lies below its range (a 'reported / spent' "
        "within a fraction of a percent of 1 is that measurement error: the accounting is exact, not loose)."
    )
    record("dp-audit", "Differential privacy: reported ε vs the mechanism as run (issue #14)", body)


if __name__ == "__main__":
    main()
