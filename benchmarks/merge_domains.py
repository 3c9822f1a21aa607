"""Multi-domain merge: five digits domains, each fine-tuned from one base CNN, merged into one model.

Issue #5 acceptance 1. Domains (``deltaplane.data.domains``): original, rotated 90°, inverted, Gaussian noise,
shifted. Two settings for the base (the simulator's ``DigitsCNN``), each expert being the base fine-tuned on its
domain: (A) a *specialist* base trained on the original digits only — the experts for rotated and inverted digits
must move far from it; (B) a *generalist* base trained on a mix of all five domains, the setting the merging papers
study (fine-tunes of one broadly pre-trained model). Every method merges the five experts into one model; we report per-domain test
accuracy and the normalized accuracy (merged ÷ the domain's own fine-tuned expert), averaged over domains.
Method hyperparameters (λ, density) are picked on a validation split carved from the training images, never on
the test images. The mixture of experts keeps all five experts behind a router trained on the same split.

Run: ``.venv/bin/python benchmarks/merge_domains.py [specialist] [generalist]`` (both by default).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record, table
from deltaplane.data.digits import load_digits, train_test_split
from deltaplane.data.domains import apply_domain
from deltaplane.merging import MixtureOfExperts, diagonal_fisher, merge, slerp
from deltaplane.sim.model import build_model

DOMAINS = ["identity", "rotate90", "invert", "noise", "shift"]
LABELS = {
    "identity": "original",
    "rotate90": "rotated",
    "invert": "inverted",
    "noise": "noisy",
    "shift": "shifted",
}
SEED = 0


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for s in range(0, x.shape[0], 64):
            idx = order[s : s + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def acc(model: nn.Module, state: dict | None, x: torch.Tensor, y: torch.Tensor) -> float:
    if state is not None:
        model.load_state_dict(state)
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def load_domains() -> dict:
    train_all, test = train_test_split(load_digits(), seed=SEED)
    n_val = len(train_all) // 5
    perm = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(1))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    data = {}
    for i, d in enumerate(DOMAINS):
        xs = apply_domain(d, train_all.x, seed=10 + i)
        data[d] = {
            "train": (xs[tr_idx], train_all.y[tr_idx]),
            "val": (xs[val_idx], train_all.y[val_idx]),
            "test": (apply_domain(d, test.x, seed=100 + i), test.y),
        }
    return data


def run_setting(data: dict, generalist: bool) -> tuple[list[list[str]], tuple[str, float], float]:
    t0 = time.perf_counter()
    model = build_model(SEED)
    if generalist:
        xb = torch.cat([data[d]["train"][0] for d in DOMAINS])
        yb = torch.cat([data[d]["train"][1] for d in DOMAINS])
        train(model, xb, yb, epochs=10, lr=3e-3, seed=0)
    else:
        train(model, *data["identity"]["train"], epochs=30, lr=3e-3, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = []
    for i, d in enumerate(DOMAINS):
        model.load_state_dict(base)
        train(model, *data[d]["train"], epochs=15, lr=1e-3, seed=100 + i)
        experts.append({k: v.clone() for k, v in model.state_dict().items()})
    expert_acc = {d: acc(model, experts[i], *data[d]["test"]) for i, d in enumerate(DOMAINS)}
    print("experts", expert_acc, f"{time.perf_counter() - t0:.0f}s", flush=True)

    def evaluate(state: dict, split: str = "test") -> dict[str, float]:
        return {d: acc(model, state, *data[d][split]) for d in DOMAINS}

    def pick(method: str, grid: list[dict], base_state: dict | None = base) -> tuple[dict, dict]:
        """The grid point with the best summed accuracy on the validation split (never the test split)."""
        best = None
        for params in grid:
            state = merge(method, base_state, experts, **params)
            score = sum(evaluate(state, "val").values())
            if best is None or score > best[0]:
                best = (score, params, state)
        assert best is not None
        return best[1], best[2]

    lambdas = [0.3, 0.5, 1.0]
    rows: list[tuple[str, str, dict[str, float]]] = [("base (no merge)", "", evaluate(base))]
    results: list[tuple[str, str, dict]] = []
    p, s = pick("linear", [{}])
    results.append(("linear", "equal weights", s))
    p, s = pick("task_arithmetic", [{"lambda": lam} for lam in lambdas])
    results.append(("task_arithmetic", f"λ={p['lambda']}", s))
    p, s = pick("ties", [{"density": d, "lambda": lam} for d in [0.2, 0.6] for lam in [0.5, 1.0]])
    results.append(("ties", f"density={p['density']}, λ={p['lambda']}", s))
    p, s = pick("dare_linear", [{"density": 0.5, "lambda": lam, "seed": 0} for lam in lambdas])
    results.append(("dare_linear", f"density={p['density']}, λ={p['lambda']}", s))
    p, s = pick("dare_ties", [{"density": 0.5, "lambda": lam, "seed": 0} for lam in lambdas])
    results.append(("dare_ties", f"density={p['density']}, λ={p['lambda']}", s))
    p, s = pick("breadcrumbs", [{"density": 0.6, "gamma": 0.01, "lambda": lam} for lam in lambdas])
    results.append(("breadcrumbs", f"density={p['density']}, γ=0.01, λ={p['lambda']}", s))
    p, s = pick("model_stock", [{}])
    results.append(("model_stock", "", s))
    # SLERP interpolates two models; five are folded in as a spherical running mean (t = 1/(i+1))
    folded = {k: v.clone() for k, v in experts[0].items()}
    for i, e in enumerate(experts[1:], start=2):
        folded = {
            k: slerp(1 / i, folded[k].float(), e[k].float()).to(v.dtype) if v.is_floating_point() else v
            for k, v in e.items()
        }
    results.append(("slerp", "running mean, t=1/(i+1)", folded))
    fishers = []
    for i, d in enumerate(DOMAINS):
        model.load_state_dict(experts[i])
        fishers.append(diagonal_fisher(model, data[d]["train"][0][:200]))
    p, s = pick("fisher", [{"fishers": fishers}], base_state=None)
    results.append(("fisher", "diagonal Fisher, 200 train images per domain", s))
    for name, note, state in results:
        rows.append((name, note, evaluate(state)))
        print(name, note, rows[-1][2], flush=True)

    # mixture of experts: router on the input pixels, trained on the validation split's domain labels
    moe_norm = 0.0
    xv = torch.cat([data[d]["val"][0] for d in DOMAINS])
    dv = torch.cat([torch.full((data[d]["val"][0].shape[0],), i) for i, d in enumerate(DOMAINS)])
    for k in (1, 2):
        moe = MixtureOfExperts.from_states(build_model(SEED), experts, top_k=k, in_features=64, hidden=64)
        moe.fit_router(xv, expert_labels=dv, epochs=100, lr=5e-3, seed=0)
        accs = {d: acc(moe, None, *data[d]["test"]) for d in DOMAINS}
        rows.append((f"MoE top-{k}", "router: 64→64→5 MLP on pixels", accs))
        moe_norm = max(moe_norm, sum(accs[d] / expert_acc[d] for d in DOMAINS) / len(DOMAINS))
        print("moe", k, accs, flush=True)

    out_rows = [["fine-tuned experts (reference)", "each on its own domain"]
                + [f"{expert_acc[d]:.3f}" for d in DOMAINS]
                + [f"{sum(expert_acc.values()) / 5:.3f}", "1.000"]]  # fmt: skip
    best_merge = ("", 0.0)
    for name, note, accs in rows:
        norm = sum(accs[d] / expert_acc[d] for d in DOMAINS) / len(DOMAINS)
        out_rows.append(
            [name, note]
            + [f"{accs[d]:.3f}" for d in DOMAINS]
            + [f"{sum(accs.values()) / 5:.3f}", f"{norm:.3f}"]
        )
        if not name.startswith(("MoE", "base")) and norm > best_merge[1]:
            best_merge = (name, norm)
    return out_rows, best_merge, moe_norm


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    data = load_domains()
    headers = ["method", "settings"] + [LABELS[d] for d in DOMAINS] + ["mean acc", "normalized"]
    intro = (
        "Five domains of the digits test set (360 images each): "
        + ", ".join(LABELS[d] for d in DOMAINS)
        + ". Experts: the base fine-tuned 15 epochs (Adam 1e-3) on each domain. Each method's hyperparameters "
        "are chosen on a validation split (20% of the training images), never on the test images. Normalized = "
        "mean over domains of (merged accuracy ÷ the domain expert's accuracy). SLERP merges two models; the "
        "five experts are folded in as a spherical running mean."
    )
    settings = {
        "specialist": (False, "A. Specialist base (trained 30 epochs on the original digits only)"),
        "generalist": (True, "B. Generalist base (trained 10 epochs on a mix of all five domains)"),
    }
    chosen = [a for a in sys.argv[1:] if a in settings] or list(settings)
    for key in chosen:
        t0 = time.perf_counter()
        generalist, title = settings[key]
        rows, best, moe_norm = run_setting(data, generalist)
        body = (
            intro
            + "\n\n"
            + table(headers, rows)
            + f"\n\nBest merge: **{best[0]}, {best[1]:.3f}** normalized "
            f"(target ≥ 0.95: {'met' if best[1] >= 0.95 else 'MISSED'}). Mixture of experts: **{moe_norm:.3f}** "
            f"(target ≥ 0.99: {'met' if moe_norm >= 0.99 else 'MISSED'}). Run time {time.perf_counter() - t0:.0f} s."
        )
        if key == "specialist":
            base_norm = next(r[-1] for r in rows if str(r[0]).startswith("base"))
            body += (
                "\n\nWhy merging fails here: a base that has only seen upright digits gives experts whose task "
                "vectors each rewrite the features for their own domain (rotated and inverted move far from the "
                "base), so the vectors conflict and any average, trim or sign election keeps a compromise that "
                f"fits no shifted domain — the best merge stays at {best[1]:.2f} normalized, against {base_norm} for "
                "the unmerged base. "
                f"What works instead is keeping the experts apart behind a router: the mixture of experts reaches "
                f"{moe_norm:.3f}; merging works from a generalist base (setting B)."
            )
        print(body, flush=True)
        record(f"merge-domains-{key}", f"Merging five digits domains into one model — {title}", body)


if __name__ == "__main__":
    main()
