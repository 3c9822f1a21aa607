"""A compact federated training loop on digits used by the DP-accuracy and robustness benchmarks.

Why a loop here and not ``deltaplane.sim``: the simulator was still being written on main when these benchmarks
were needed; this loop uses the same library pieces the simulator wires in (``build_aggregator``, the attack
suite, ``secure_mean``) and the same data (scikit-learn digits, Dirichlet label skew). Deterministic given
``seed``: every random choice draws from a generator seeded by (seed, purpose, round, client).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import deltaplane as dp
from deltaplane.aggregation import build_aggregator
from deltaplane.aggregation.sampling import clients_per_round, sample_round
from deltaplane.sim.attacks import Attack, add_trigger, choose_malicious, parse_attack


def _gen(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    b = load_digits()
    x = torch.tensor(b.images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(b.target, dtype=torch.long)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = 360
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def dirichlet_partition(y: np.ndarray, n: int, alpha: float, rng: np.random.Generator, min_size: int = 5):
    while True:
        shards: list[list[int]] = [[] for _ in range(n)]
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n)) * len(idx)).astype(int)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.array(sorted(s)) for s in shards]


class MLP(nn.Module):
    """64 → 32 → 10 (2,410 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def local_train(model, state, x, y, *, epochs, lr, batch, gen, prox_mu=0.0) -> dp.Delta:
    start = {k: v.clone() for k, v in state.items()}
    model.load_state_dict(start)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if prox_mu:  # FedProx proximal term μ/2 ‖w − w_global‖² (Li et al. 2020)
                loss = loss + 0.5 * prox_mu * sum(
                    (p - start[k]).pow(2).sum() for k, p in model.named_parameters()
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return dp.Delta.between(start, model.state_dict())


@dataclass
class Result:
    accuracy: float
    backdoor: float
    epsilon: float
    rejected: int


def run(
    *,
    clients: int = 100,
    rounds: int = 30,
    alpha: float = 0.5,
    epochs: int = 2,
    lr: float = 0.1,
    batch: int = 16,
    aggregator: str = "fedavg",
    server_lr: float | None = None,
    dp_noise: float = 0.0,
    clip: float | str | None = None,
    sampling_rate: float = 1.0,
    dp_delta: float = 1e-3,
    defense: str | None = None,
    attack: str | None = None,
    secagg: bool = False,
    prox_mu: float = 0.0,
    seed: int = 0,
    backdoor_target: int = 0,
) -> Result:
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_data()
    rng = np.random.default_rng(seed)
    root_n = 100  # FLTrust's clean root set, held by the server (Cao et al. use 100 samples)
    root_idx = rng.choice(len(ytr), size=root_n, replace=False)
    rest = np.setdiff1d(np.arange(len(ytr)), root_idx)
    shards = [rest[s] for s in dirichlet_partition(ytr[rest].numpy(), clients, alpha, rng)]
    atk, frac = parse_attack(attack) if attack else (Attack(), 0.0)
    bad = choose_malicious(clients, frac, np.random.default_rng([seed, 1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    per_round = clients_per_round(clients, sampling_rate)
    agg = build_aggregator(
        aggregator=aggregator, lr=server_lr, defense=defense, clip=clip, dp_noise=dp_noise,
        expected_clients=per_round, sampling_rate=per_round / clients, dp_delta=dp_delta, seed=seed,
    )  # fmt: skip
    dp_agg = agg.find(dp.DPFedAvg)
    if dp_agg is not None:  # a round Poisson sampling leaves empty still releases noise of this layout
        dp_agg.set_layout(state)
    fltrust = agg.find(dp.FLTrust)
    rejected = 0
    for rnd in range(rounds):
        # Poisson under DP, as the accountant assumes; fixed-size otherwise (deltaplane.aggregation.sampling)
        chosen = sample_round(
            clients, sampling_rate, np.random.default_rng([seed, 2, rnd]), central_dp=dp_noise > 0
        )
        agg.reset()
        if fltrust is not None:
            ref = local_train(model, state, xtr[root_idx], ytr[root_idx], epochs=epochs, lr=lr, batch=batch,
                              gen=_gen(seed, 3, rnd))  # fmt: skip
            fltrust.set_reference(ref)
        deltas = []
        for cid in chosen:
            x, y = xtr[shards[cid]], ytr[shards[cid]]
            g = _gen(seed, 4, rnd, int(cid))
            if cid in bad:
                x, y = atk.poison_data(x, y, g)
            d = local_train(model, state, x, y, epochs=epochs, lr=lr, batch=batch, gen=g, prox_mu=prox_mu)
            if cid in bad:
                d = atk.poison_update(d, g)
            deltas.append((d, len(y)))
        if secagg:
            # clients clip to the ring range and quantize; the server only ever sees masked codes
            mean, _ = dp.aggregation.secagg.secure_mean([d for d, _ in deltas], bits=16, clip_range=1.0,
                                                         round_id=rnd, seed=seed * 1000 + rnd)  # fmt: skip
            update = mean
        else:
            for d, w in deltas:
                rejected += not agg.add(d, float(w))
            update = agg.result()
        state = update.apply(state)
        if not all(torch.isfinite(v).all() for v in state.values()):
            break
    model.load_state_dict(state)
    acc = accuracy(model, xte, yte)
    keep = yte != backdoor_target
    bd = accuracy(model, add_trigger(xte[keep]), torch.full_like(yte[keep], backdoor_target))
    eps = agg.measurements.get("epsilon", math.inf) if dp_noise > 0 else math.inf
    return Result(acc, bd, eps, rejected)
