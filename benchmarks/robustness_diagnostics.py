"""Why defences fail on the default federation: per-round diagnostics of the engine's own uploads.

Runs ``deltaplane run``'s federation (the engine through :func:`deltaplane.apps.runner.run_federation`) with a
20% backdoor and records, for every round, the *decoded* updates the server step receives (a recorder around
:meth:`ServerStep.receive_delta`; nothing else changes). For each round it prints the L2 norms of malicious and
honest updates, their cosine to the honest mean, the share of non-zero coordinates, how many malicious updates
multi-Krum (f = 4) would keep, the largest cosine of
each client's summed history to another's (FoolsGold's signal), how often trimmed mean's surviving coordinates are all zero, and the share of the
round's mass FLTrust's trust gives the attackers (with ``--defense fltrust``, whose reference is read off the
server). At the end it ranks the clients by three per-client suspicion scores summed over the run (history
max-cosine, cosine to the leave-one-out mean, norm over the round's median) and prints the attackers' ranks.
Usage::

    python benchmarks/robustness_diagnostics.py --codec identity --rounds 80
    python benchmarks/robustness_diagnostics.py --defense fltrust  # deltaplane run's default codec
"""

from __future__ import annotations

import argparse
import statistics

import torch

from deltaplane.aggregation import FLTrust
from deltaplane.apps.runner import run_federation
from deltaplane.engine import server as server_mod
from deltaplane.engine.attacks import choose_malicious
from deltaplane.engine.config import RunConfig
from deltaplane.engine.seeding import Stream, numpy_rng
from robustness import DEFAULT_CODEC, DEFAULT_DGC


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codec", default=DEFAULT_CODEC)
    ap.add_argument("--defense", default="none")
    ap.add_argument("--attack", default="backdoor:0.2")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument(
        "--save", help="write every round's decoded updates and global model to this .pt file "
        "(for offline detection studies: benchmarks/robustness_detect.py)"
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    dgc = DEFAULT_DGC if args.codec == DEFAULT_CODEC else {}  # as `deltaplane run` applies them
    cfg = RunConfig(
        rounds=args.rounds, codec=args.codec, attack=args.attack, defense=args.defense,
        seed=args.seed, engine="batched", **dgc,
    )  # fmt: skip
    malicious = {str(i) for i in choose_malicious(cfg.clients, 0.2, numpy_rng(cfg.seed, Stream.ATTACK))}
    seen: dict[str, torch.Tensor] = {}
    refs: list[torch.Tensor | None] = []
    original = server_mod.ServerStep.receive_delta
    original_open = server_mod.ServerStep.open

    layout: list[tuple[str, int]] = []
    saved: dict[str, list[torch.Tensor]] = {"updates": [], "models": []}

    def recording(self, client_id, delta, weight):
        seen[client_id] = delta.flatten().double()
        if not layout:
            layout.extend((k, v.numel()) for k, v in delta.items() if v.is_floating_point())
        return original(self, client_id, delta, weight)

    rows: list[dict[str, float]] = []

    def keep(seen):
        if args.save:
            saved["updates"].append(torch.stack([seen[i] for i in sorted(seen, key=int)]).float())

    def opening(self, rnd, **kw):
        if seen:
            rows.append(summarize(seen, malicious, refs[-1] if refs else None))
            keep(seen)
            seen.clear()
        if args.save:  # the global model the round's updates start from
            saved["models"].append(torch.cat([v.reshape(-1).float() for v in self.state.values()]))
        original_open(self, rnd, **kw)
        ft = self.aggregator.find(FLTrust)
        refs.append(ft._ref_flat if isinstance(ft, FLTrust) else None)

    server_mod.ServerStep.receive_delta = recording
    server_mod.ServerStep.open = opening
    result = run_federation(cfg)
    rows.append(summarize(seen, malicious, refs[-1] if refs else None))
    keep(seen)
    if args.save:
        torch.save(
            {
                "updates": torch.stack(saved["updates"]),  # (rounds, clients, d), clients in id order
                "models": torch.stack(saved["models"][: len(saved["updates"])]),  # (rounds, d)
                "layout": layout,
                "malicious": sorted(int(i) for i in malicious),
                "config": cfg.model_dump(),
                "final": {"accuracy": result.final.test_accuracy, "backdoor": result.final.backdoor_success},
            },
            args.save,
        )
    print(
        f"# {cfg.attack}, defense {cfg.defense}, codec {cfg.codec}, seed {cfg.seed}, malicious {sorted(malicious)}"
    )
    print(
        f"# final accuracy {result.final.test_accuracy:.4f}, backdoor success {result.final.backdoor_success}"
    )
    keys = list(rows[0])
    print("round | " + " | ".join(keys))
    for i, r in enumerate(rows, 1):
        if i == 1 or i % args.every == 0 or i == len(rows):
            print(f"{i} | " + " | ".join(f"{r[k]:.3g}" for k in keys))
    print("mean | " + " | ".join(f"{statistics.fmean(r[k] for r in rows):.3g}" for k in keys))
    separability(malicious)


LOO_COS: dict[str, float] = {}
NORM_RATIO: dict[str, float] = {}


def separability(malicious: set[str]) -> None:
    """Could any per-client signal single the attackers out? Rank all clients by three suspicion scores
    (0 = most suspicious) and print the attackers' ranks: a rule built on that score can drop exactly the
    attackers only when their ranks are 0..k−1."""
    ids = sorted(HISTORY, key=int)
    h = torch.stack([HISTORY[i] for i in ids])
    hu = h / h.norm(dim=1, keepdim=True).clamp_min(1e-30)
    hcs = hu @ hu.T
    hcs.fill_diagonal_(-1.0)
    scores = {
        "history max-cos (FoolsGold's signal; high = suspicious)": hcs.max(dim=1).values,
        "mean cos to the leave-one-out mean (low = suspicious)": -torch.tensor([LOO_COS[i] for i in ids]),
        "mean norm / round median (high = suspicious)": torch.tensor([NORM_RATIO[i] for i in ids]),
    }
    for name, sc in scores.items():
        rank = sc.argsort(descending=True).argsort()
        bad = sorted(int(rank[k]) for k, i in enumerate(ids) if i in malicious)
        print(f"# attackers' ranks of {len(ids)} by {name}: {bad}")


HISTORY: dict[str, torch.Tensor] = {}


def summarize(
    seen: dict[str, torch.Tensor], malicious: set[str], ref: torch.Tensor | None
) -> dict[str, float]:
    ids = sorted(seen, key=int)
    x = torch.stack([seen[i] for i in ids])
    bad = torch.tensor([i in malicious for i in ids])
    for i in ids:  # FoolsGold's view: each client's summed updates
        HISTORY[i] = HISTORY[i] + seen[i] if i in HISTORY else seen[i].clone()
    h = torch.stack([HISTORY[i] for i in ids])
    hu = h / h.norm(dim=1, keepdim=True).clamp_min(1e-30)
    hcs = hu @ hu.T
    hcs.fill_diagonal_(-1.0)
    hmax = hcs.max(dim=1).values
    norms = x.norm(dim=1)
    loo = x.sum(0, keepdim=True) - x
    loo_cos = (x * loo).sum(1) / (norms * loo.norm(dim=1)).clamp_min(1e-30)
    med = norms.median().clamp_min(1e-30)
    for k, i in enumerate(ids):  # running sums over rounds, divided by the round count at the end
        LOO_COS[i] = LOO_COS.get(i, 0.0) + float(loo_cos[k])
        NORM_RATIO[i] = NORM_RATIO.get(i, 0.0) + float(norms[k] / med)
    honest_mean = x[~bad].mean(0)
    cos = (x @ honest_mean) / (norms * honest_mean.norm()).clamp_min(1e-30)
    # multi-Krum (f = 4, m = n - f) selection, as aggregation.Krum computes it
    n, f = len(ids), 4
    sq = (x * x).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    dist.fill_diagonal_(float("inf"))
    scores = dist.sort(dim=1).values[:, : n - f - 2].sum(1)
    kept = scores.argsort()[: n - f]
    # trimmed mean beta = 0.2: a coordinate whose middle values are all zero gets no update
    k = int(0.2 * n)
    mid = x.sort(dim=0).values[k : n - k]
    out = {
        "norm_mal": float(norms[bad].mean()),
        "norm_hon": float(norms[~bad].mean()),
        "cos_mal": float(cos[bad].mean()),
        "cos_hon": float(cos[~bad].mean()),
        "nonzero": float((x != 0).double().mean()),
        "krum_kept_mal": float(bad[kept].sum()),
        "tm_zero_coords": float((mid == 0).all(0).double().mean()),
        "hist_maxcos_mal": float(hmax[bad].mean()),
        "hist_maxcos_hon": float(hmax[~bad].mean()),
        "hist_maxcos_hon_max": float(hmax[~bad].max()),
        "hist_maxcos_mal_min": float(hmax[bad].min()),
    }
    if ref is not None:
        ts = ((x @ ref) / (norms * ref.norm()).clamp_min(1e-30)).clamp_min(0)
        out["fltrust_mal_share"] = float(ts[bad].sum() / ts.sum().clamp_min(1e-30))
    return out


if __name__ == "__main__":
    main()
