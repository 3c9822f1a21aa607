"""A real, small task for gate tests: softmax regression on sklearn digits, clean and OOD (noisy) test sets."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits


@pytest.fixture(scope="session")
def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train, test = slice(0, 1200), slice(1200, None)
    rng = np.random.default_rng(1)
    ood = (x[test] + torch.tensor(rng.normal(0, 0.35, size=x[test].shape), dtype=torch.float32)).clamp(0, 1)
    return {"xtr": x[train], "ytr": y[train], "xte": x[test], "yte": y[test], "xood": ood}


def train_linear(d, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A nearest-centroid classifier written as a linear layer, fitted on ``n`` random training samples.

    Closed form (w_c = mean_c, b_c = -|mean_c|²/2) so tests stay fast on a loaded machine; few samples give a
    measurably weaker model.
    """
    idx = torch.randperm(len(d["xtr"]), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = d["xtr"][idx], d["ytr"][idx]
    means = torch.stack([x[y == c].mean(0) if (y == c).any() else torch.zeros(64) for c in range(10)])
    return {"fc.weight": means.clone(), "fc.bias": -0.5 * (means**2).sum(1)}


def make_evaluator(d):
    def accuracy(state, x):
        with torch.no_grad():
            return float(((x @ state["fc.weight"].T + state["fc.bias"]).argmax(1) == d["yte"]).float().mean())

    def evaluate(state):
        return {"accuracy": accuracy(state, d["xte"]), "ood_accuracy": accuracy(state, d["xood"])}

    return evaluate


@pytest.fixture(scope="session")
def train(digits):
    return lambda n, seed=0: train_linear(digits, n, seed)


@pytest.fixture(scope="session")
def evaluate(digits):
    return make_evaluator(digits)
