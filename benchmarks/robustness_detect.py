"""What separates the backdoor attackers on deltaplane's own federation? An offline study of recorded uploads.

Reads the ``.pt`` files that ``benchmarks/robustness_diagnostics.py --save`` writes (every round's decoded uploads
of an *undefended* engine run with 20% ``backdoor`` attackers, and the global model each round started from) and
scores candidate detectors on them, round by round, open-loop (what each rule would have kept of the updates the
undefended run produced; a closed-loop run changes the trajectory, so a promising detector must then be run on the
engine with ``benchmarks/robustness.py accept --best ...``). Detectors:

* ``flame``: this library's FLAME filter (HDBSCAN, ``min_cluster_size = n/2 + 1``, over cosine distances of the
  updates); ``flame_models``: the paper's (Nguyen et al. 2022, Algorithm 1: cosine distances of the local
  *models* ``Wᵢ = G + Δᵢ``); ``flame_<layer>``: over one layer's updates only (per-layer similarity).
* ``foolsgold``: the library's FoolsGold weights on the summed histories; ``foolsgold_fc2``: on the output
  layer's histories only (what the FoolsGold reference code keeps); ``foolsgold_centred``.
* ``deepsight_te``: DeepSight's threshold exceedings (Rieger et al. NDSS 2022, §V-B): per client, the output
  layer's NEUPs ``cₖ = Eₖ² / Σⱼ Eⱼ²`` with ``Eₖ`` the summed |update| of output neuron ``k`` (weights and bias)
  and the count of ``cₖ > max(0.01, 1/P) · maxⱼ cⱼ``; a client at or under half the round's median count is
  flagged (homogeneous training data). Computed on each round's update and on the history.
* ``multi_krum``: Krum's selection with ``f = 4``, ``m = n − f``.

For each detector: the attackers' share of the kept weight and the honest clients' mean weight, over all rounds
and over the last half; and, for per-client scores summed over the run, the AUC of attackers vs honest clients
(1.0: every attacker scores above every honest client). Usage::

    python benchmarks/robustness_diagnostics.py --seed 0 --save /tmp/rec_default_0.pt
    python benchmarks/robustness_detect.py /tmp/rec_default_0.pt /tmp/rec_identity_0.pt ...
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np
import torch

from deltaplane.aggregation.robust import FoolsGold


def _slices(layout: list[tuple[str, int]]) -> dict[str, slice]:
    out, i = {}, 0
    for name, n in layout:
        out[name] = slice(i, i + n)
        i += n
    return out


def _cols(sl: dict[str, slice], *names: str) -> torch.Tensor:
    return torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])


def hdbscan_keep(x: torch.Tensor) -> np.ndarray:
    """FLAME's filter: indices of the majority cluster of HDBSCAN over cosine distances of the rows of ``x``."""
    from sklearn.cluster import HDBSCAN

    n = x.shape[0]
    u = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    dist = (1.0 - u @ u.T).clamp_min(0.0).numpy()
    np.fill_diagonal(dist, 0.0)
    labels = HDBSCAN(
        min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed", allow_single_cluster=True, copy=True
    ).fit_predict(dist)
    found = labels[labels >= 0]
    return np.flatnonzero(labels == np.bincount(found).argmax()) if found.size else np.arange(n)


def neups_te(out_w: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
    """DeepSight's threshold exceedings per client from output-layer updates ``(n, P, h)`` and ``(n, P)``."""
    energy = out_w.abs().sum(dim=2) + out_b.abs()  # (n, P)
    c = energy**2 / (energy**2).sum(dim=1, keepdim=True).clamp_min(1e-30)
    p = c.shape[1]
    xi = max(0.01, 1.0 / p) * c.max(dim=1, keepdim=True).values
    return (c > xi).sum(dim=1).double()


def auc(score: torch.Tensor, bad: torch.Tensor) -> float:
    """P(an attacker scores above an honest client), ties counted half (Mann–Whitney)."""
    s_bad, s_hon = score[bad], score[~bad]
    gt = (s_bad[:, None] > s_hon[None, :]).double().mean()
    eq = (s_bad[:, None] == s_hon[None, :]).double().mean()
    return float(gt + 0.5 * eq)


#: detectors and per-client scores summarised by ``--record`` (column name → key printed by :func:`study`)
SUMMARY_DETECTORS = {
    "flame": "flame",
    "FLAME on models (paper)": "flame_models",
    "FLAME, conv2 only": "flame_conv2",
    "FLAME, fc1 only": "flame_fc1",
    "foolsgold": "foolsgold",
    "FoolsGold, output layer": "foolsgold_fc2",
    "DeepSight TE, history": "deepsight_te_history",
    "multi-Krum(4)": "multi_krum",
}
SUMMARY_SCORES = {
    "history max-cos, model (FoolsGold)": "history max-cos (whole model)",
    "history max-cos, output layer": "history max-cos (output layer)",
    "DeepSight threshold exceedings (low)": "-threshold exceedings of the history's NEUPs (summed over rounds)",
    "output layer, largest excess share over the median client, any class": (
        "output-layer largest excess energy share over the median client, any class"
    ),
    "output layer, share on class 0 (knows the target)": (
        "output-layer energy share on class 0, the target (summed over rounds)"
    ),
    "conv1 history vs the others' sum (low cos)": "-history cos to the others' sum, conv1.weight",
    "conv2 history vs the others' sum (low cos)": "-history cos to the others' sum, conv2.weight",
}
SUMMARY: list[tuple[str, dict[str, str], dict[str, str]]] = []


def study(path: str) -> None:
    rec = torch.load(path)
    ups, models = rec["updates"].double(), rec["models"].double()  # (R, n, d), (R, d)
    rounds, n, _ = ups.shape
    bad = torch.zeros(n, dtype=torch.bool)
    bad[rec["malicious"]] = True
    sl = _slices(rec["layout"])
    fc2 = _cols(sl, "fc2.weight", "fc2.bias")
    p, h = 10, sl["fc2.weight"].stop - sl["fc2.weight"].start

    def fc2_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, sl["fc2.weight"]].reshape(-1, p, h // p), x[:, sl["fc2.bias"]]

    detectors: dict[str, Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]] = {}

    def keep_to_w(keep: np.ndarray) -> torch.Tensor:
        w = torch.zeros(n, dtype=torch.float64)
        w[torch.as_tensor(keep)] = 1.0
        return w

    detectors["flame"] = lambda r, x, hist: keep_to_w(hdbscan_keep(x))
    detectors["flame_models"] = lambda r, x, hist: keep_to_w(hdbscan_keep(models[r][None, :] + x))
    for layer in ("conv2.weight", "fc1.weight", "fc2.weight"):
        detectors[f"flame_{layer.split('.')[0]}"] = lambda r, x, hist, s=sl[layer]: keep_to_w(
            hdbscan_keep(x[:, s])
        )

    def fg(h_: torch.Tensor, centred: bool = False) -> torch.Tensor:
        if centred:
            h_ = h_ - h_.mean(dim=0)
        return FoolsGold()._weights(h_)

    detectors["foolsgold"] = lambda r, x, hist: fg(hist)
    detectors["foolsgold_fc2"] = lambda r, x, hist: fg(hist[:, fc2])
    detectors["foolsgold_centred"] = lambda r, x, hist: fg(hist, centred=True)

    def deepsight(x: torch.Tensor) -> torch.Tensor:
        te = neups_te(*fc2_parts(x))
        return (te > te.median() / 2).double()  # flagged (weight 0): at or under half the median count

    detectors["deepsight_te_round"] = lambda r, x, hist: deepsight(x)
    detectors["deepsight_te_history"] = lambda r, x, hist: deepsight(hist)

    def krum(x: torch.Tensor, f: int = 4) -> torch.Tensor:
        sq = (x * x).sum(1)
        dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
        dist.fill_diagonal_(float("inf"))
        scores = dist.sort(dim=1).values[:, : n - f - 2].sum(1)
        return keep_to_w(scores.argsort()[: n - f].numpy())

    detectors["multi_krum"] = lambda r, x, hist: krum(x)

    share: dict[str, list[float]] = {k: [] for k in detectors}
    honest_w: dict[str, list[float]] = {k: [] for k in detectors}
    hist = torch.zeros_like(ups[0])
    te_hist_score = torch.zeros(n, dtype=torch.float64)
    c0_score = torch.zeros(n, dtype=torch.float64)
    excess_score = torch.zeros(n, dtype=torch.float64)
    loo_round: dict[str, torch.Tensor] = {k: torch.zeros(n, dtype=torch.float64) for k in sl}
    for r in range(rounds):
        x = ups[r]
        hist = hist + x
        for name, det in detectors.items():
            w = det(r, x, hist)
            share[name].append(float(w[bad].sum() / w.sum().clamp_min(1e-30)))
            honest_w[name].append(float(w[~bad].mean()))
        te_hist_score += -neups_te(*fc2_parts(hist))  # low TE = suspicious
        ow, ob = fc2_parts(hist)
        e = ow.abs().sum(dim=2) + ob.abs()
        share_k = e / e.sum(dim=1, keepdim=True).clamp_min(1e-30)
        c0_score += share_k[:, 0]  # energy on the backdoor's target class (a score that knows the target)
        # the same without knowing the target: a client's largest excess over the round's median share
        excess_score += (share_k - share_k.median(dim=0).values).max(dim=1).values
        for name, s in sl.items():  # per layer, this round's update against the others' sum
            xl = x[:, s]
            loo = xl.sum(0, keepdim=True) - xl
            loo_round[name] += -(xl * loo).sum(1) / (xl.norm(dim=1) * loo.norm(dim=1)).clamp_min(1e-30)
    half = rounds // 2
    final = rec.get("final", {})
    print(f"\n## {path}: {rec['config']['codec']}, seed {rec['config']['seed']}, attackers {rec['malicious']}, "
          f"undefended final {final}")  # fmt: skip
    print(
        "| detector | attackers' share of kept weight (all / last half) | honest mean weight (all / last half) |"
    )
    print("|---|---|---|")
    run = f"{'stc' if rec['config']['codec'] != 'identity' else 'identity'} {rec['config']['seed']}"
    kept = {
        name: f"{statistics.fmean(share[name]):.2f} / {statistics.fmean(honest_w[name]):.2f}"
        for name in share
    }
    for name in detectors:
        s, w = share[name], honest_w[name]
        print(f"| {name} | {statistics.fmean(s):.2f} / {statistics.fmean(s[half:]):.2f} | "
              f"{statistics.fmean(w):.2f} / {statistics.fmean(w[half:]):.2f} |")  # fmt: skip
    # per-client scores over the run (high = suspicious): AUC of attackers vs honest (0.5 = no signal)
    hu = hist / hist.norm(dim=1, keepdim=True).clamp_min(1e-30)
    hcs = hu @ hu.T
    hcs.fill_diagonal_(-1.0)
    hf = hist[:, fc2]
    hfu = hf / hf.norm(dim=1, keepdim=True).clamp_min(1e-30)
    fcs = hfu @ hfu.T
    fcs.fill_diagonal_(-1.0)
    scores = {
        "history max-cos (whole model)": hcs.max(dim=1).values,
        "history max-cos (output layer)": fcs.max(dim=1).values,
        "-threshold exceedings of the history's NEUPs (summed over rounds)": te_hist_score,
        "output-layer energy share on class 0, the target (summed over rounds)": c0_score,
        "output-layer largest excess energy share over the median client, any class": excess_score,
    }
    for name, s in loo_round.items():
        scores[f"-round cos to the others' sum (summed over rounds), {name}"] = s
    for name, s in sl.items():
        hl = hist[:, s]
        loo = hl.sum(0, keepdim=True) - hl
        cos = (hl * loo).sum(1) / (hl.norm(dim=1) * loo.norm(dim=1)).clamp_min(1e-30)
        scores[f"-history cos to the others' sum, {name}"] = -cos
    print("\n| per-client score over the run | AUC attackers vs honest |")
    print("|---|---|")
    aucs = {name: f"{auc(s, bad):.2f}" for name, s in scores.items()}
    for name in scores:
        print(f"| {name} | {aucs[name]} |")
    SUMMARY.append((run, kept, aucs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recordings", nargs="+")
    ap.add_argument("--record", action="store_true", help="write the summary into docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for path in args.recordings:
        study(path)
    if args.record:
        from _record import record, table

        rows1 = [[run, *(kept[k] for k in SUMMARY_DETECTORS.values())] for run, kept, _ in SUMMARY]
        rows2 = [[run, *(aucs[k] for k in SUMMARY_SCORES.values())] for run, _, aucs in SUMMARY]
        body = (
            "Six *undefended* engine runs (80 rounds, 20 clients, 20% `backdoor`, seeds 0–2, `stc(0.002)` with "
            "DGC as `deltaplane run` and `identity`), recorded with `python benchmarks/robustness_diagnostics.py "
            "--codec C --seed S --save rec_C_S.pt` and scored open-loop, round by round.\n\n"
            "Attackers' share of the kept weight (0.20: no better than keeping everyone) / honest clients' mean "
            "weight:\n\n"
            + table(["run (undefended)", *SUMMARY_DETECTORS], rows1)
            + "\n\nPer-client scores summed over the run, AUC of attackers against honest clients (1.0: every "
            "attacker more suspicious than every honest client; 0.5: no signal):\n\n"
            + table(["run (undefended)", *SUMMARY_SCORES], rows2)
        )
        print(body)
        record("robustness-detect", "Robust aggregation: what separates the attackers, offline (#21)", body)


if __name__ == "__main__":
    main()
