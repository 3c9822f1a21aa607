"""Personalization on the non-IID digits federation: per-client accuracy of the global vs the personal model.

Issue #5 acceptance 2. The federation is the simulator's default (20 clients, Dirichlet α = 0.5 label skew,
``DigitsCNN``, FedAvg). After every round each device personalizes: α-mix (personal delta, α chosen on the
device's held-out split), Ditto (λ-regularised personal model); FedPer trains with a personal head from the start
(its own federation). Per-client accuracy is measured on the device's own label mix — the accuracy of the model on
each class of the 360 global test images, weighted by the device's class shares — so a client is scored on what it
will see, with 360 test images rather than its dozen held-out ones (those choose α).

Run: ``.venv/bin/python benchmarks/personalization.py``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record, table
from deltaplane.aggregation import FedAvg
from deltaplane.data.digits import NUM_CLASSES, load_digits, train_test_split
from deltaplane.delta import Delta
from deltaplane.personalization import AlphaMix, Ditto, FedPer, Personalizer, PersonalState
from deltaplane.sim.client import make_clients
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import build_model
from deltaplane.sim.seeding import Stream, derive_seed, torch_generator

ROUNDS = 60


@torch.no_grad()
def per_class_accuracy(model: torch.nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model.load_state_dict(state)
    model.eval()
    pred = model(x).argmax(1)
    return np.array([float((pred[y == c] == c).float().mean()) for c in range(NUM_CLASSES)])


def federate(config: RunConfig, personalizers: dict[str, Personalizer], shared_with: Personalizer) -> dict:
    """FedAvg rounds; ``shared_with`` decides what is aggregated (FedPer keeps its head local), every
    personalizer in ``personalizers`` adapts each device after each round."""
    train, test = train_test_split(load_digits(), test_fraction=config.test_fraction, seed=config.split_seed)
    clients = make_clients(config, train)
    model = build_model(derive_seed(config.seed, Stream.MODEL_INIT))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    states = {name: [PersonalState() for _ in clients] for name in personalizers}
    train_states = [PersonalState() for _ in clients]  # FedPer's local head during federated training
    for rnd in range(1, config.rounds + 1):
        agg = FedAvg()
        for c in clients:
            gen = torch_generator(config.seed, Stream.LOCAL_TRAINING, rnd, c.cid)
            start = shared_with.start_state(global_state, train_states[c.cid])
            delta = c.local_update(model, start, config, gen, lr=config.client_lr(rnd))
            trained = delta.apply(start)
            shared_with.keep_local(trained, train_states[c.cid], model)
            agg.add(shared_with.shared(delta, model), weight=c.num_samples)
        update = agg.result()
        global_state = {**global_state, **Delta(dict(update)).apply({k: global_state[k] for k in update})}
        for name, p in personalizers.items():
            for c in clients:
                g = torch.Generator().manual_seed(
                    derive_seed(config.seed, Stream.LOCAL_TRAINING, 10_000 + rnd, c.cid)
                )
                p.personalize(model, global_state, states[name][c.cid], c.train, c.holdout, generator=g)
    out = {"clients": clients, "global": global_state, "model": model, "test": test, "personal": {}}
    for name, p in personalizers.items():
        out["personal"][name] = [p.personal_state(global_state, s) for s in states[name]]
    out["alpha"] = [s.alpha for s in states.get("alpha_mix", [])]
    out["fedper"] = [shared_with.personal_state(global_state, s) for s in train_states]
    return out


def client_scores(run: dict, states: list[dict]) -> np.ndarray:
    model, test = run["model"], run["test"]
    scores = []
    for c, st in zip(run["clients"], states, strict=True):
        share = c.train.class_counts() / len(c.train)
        scores.append(float(share @ per_class_accuracy(model, st, test.x, test.y)))
    return np.array(scores)


def main() -> None:
    t0 = time.perf_counter()
    config = RunConfig(rounds=ROUNDS)
    torch.set_num_threads(config.threads)
    personalizers = {"alpha_mix": AlphaMix(epochs=2, lr=0.05), "ditto": Ditto(lam=0.1, epochs=2, lr=0.05)}
    run = federate(config, personalizers, Personalizer())
    g = client_scores(run, [run["global"]] * len(run["clients"]))
    results = {name: client_scores(run, run["personal"][name]) for name in personalizers}
    fedper_run = federate(config, {}, FedPer(head=["fc2"]))
    g_fedper = client_scores(fedper_run, [fedper_run["global"]] * len(fedper_run["clients"]))
    results["fedper"] = client_scores(fedper_run, fedper_run["fedper"])
    rows = []
    summary: dict[str, np.ndarray] = {}
    for name, s in results.items():
        ref = g  # every method against what the device would get without personalization: the FedAvg model
        diff = s - ref
        summary[name] = diff
        rows.append([
            name, f"{ref.mean():.4f}", f"{s.mean():.4f}", f"{100 * diff.mean():+.2f}", f"{100 * diff.min():+.2f}",
            int((diff < -0.01).sum()), f"{s.min():.4f}",
        ])  # fmt: skip
        print(rows[-1])
    per_client = [
        [c.cid, len(c.train), f"{g[i]:.3f}", f"{results['alpha_mix'][i]:.3f}", f"{run['alpha'][i]:.2f}",
         f"{results['ditto'][i]:.3f}", f"{g_fedper[i]:.3f}", f"{results['fedper'][i]:.3f}"]
        for i, c in enumerate(run["clients"])
    ]  # fmt: skip
    am = summary["alpha_mix"]
    body = (
        f"Simulator default federation ({config.clients} clients, Dirichlet α = {config.alpha}, DigitsCNN, "
        f"FedAvg, {ROUNDS} rounds). Personalization runs on every device after every round. Per-client accuracy "
        "= the model's per-class accuracy on the 360 global test images weighted by the client's class shares. "
        "Every method is compared with the FedAvg global model (what a device gets without "
        "personalization); FedPer trains its own federation (personal heads), whose global model has an untrained "
        "head and is shown per client only as a reference.\n\n"
        + table(
            ["method", "global: mean client acc", "personalized: mean", "margin (points)",
             "worst client change (points)", "clients worse by > 1 point", "worst client acc"],
            rows,
        )
        + f"\n\nα-mix: mean margin **{100 * am.mean():+.2f} points**, worst client **{100 * am.min():+.2f}** "
        f"(target: margin > 0 and no client worse by more than 1 point: "
        f"{'met' if am.mean() > 0 and am.min() >= -0.01 else 'MISSED'}).\n\nPer client:\n\n"
        + table(["client", "train samples", "global", "α-mix", "α", "Ditto", "FedPer global", "FedPer"], per_client)
        + f"\n\nRun time {time.perf_counter() - t0:.0f} s."
    )  # fmt: skip
    print(body)
    record("personalization", "Personalization on the non-IID federation", body)


if __name__ == "__main__":
    main()
