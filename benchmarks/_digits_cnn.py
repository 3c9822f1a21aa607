"""A small CNN on sklearn digits with FedAvg rounds: the 'typical round-to-round update' for ops benchmarks.

Kept here (not in the library) until the simulator's model and data land on main; the ops benchmarks only
need realistic weights and updates, not the simulator's features.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, 16, 4, 4)
        x = torch.relu(self.conv2(x))  # (B, 32, 4, 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def data(seed: int = 0) -> dict[str, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    g = torch.Generator().manual_seed(seed + 1)
    ood = (x[1400:] + 0.3 * torch.randn(x[1400:].shape, generator=g)).clamp(0, 1)  # noisy sensor = OOD
    return {"xtr": x[:1400], "ytr": y[:1400], "xte": x[1400:], "yte": y[1400:], "xood": ood}


def evaluator(d: dict[str, torch.Tensor]):
    def evaluate(state: dict[str, torch.Tensor]) -> dict[str, float]:
        m = SmallCNN()
        m.load_state_dict(state)
        m.eval()
        with torch.no_grad():
            acc = float((m(d["xte"]).argmax(1) == d["yte"]).float().mean())
            ood = float((m(d["xood"]).argmax(1) == d["yte"]).float().mean())
        return {"accuracy": acc, "ood_accuracy": ood}

    return evaluate


def local_train(state, x, y, *, epochs: int = 1, lr: float = 0.05, seed: int = 0) -> dict[str, torch.Tensor]:
    m = SmallCNN()
    m.load_state_dict(state)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def shards(d: dict[str, torch.Tensor], clients: int, seed: int = 0) -> list[np.ndarray]:
    """Non-IID split: Dirichlet(0.5) label proportions per client."""
    rng = np.random.default_rng(seed)
    y = d["ytr"].numpy()
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([0.5] * clients)) * len(idx)).astype(int)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    return [np.array(p) for p in parts]


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(
        seed
    )  # nn.Module init uses the global generator; seeded here, once, for reproducibility
    return {k: v.detach().clone() for k, v in SmallCNN().state_dict().items()}
