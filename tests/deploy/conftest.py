"""Small models and data shared by the deploy tests (generic torch modules; trained in a second or two)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

# Tiny models: one intra-op thread is fastest (thread wake-ups dominate), and `make test` already runs 2 workers.
torch.set_num_threads(1)


class SmallCNN(nn.Module):
    """conv 1→8 → ReLU → conv 8→16 → ReLU → maxpool → fc 256→64 → ReLU → fc 64→10 (8×8 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(256, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    p = np.random.default_rng(0).permutation(len(y))
    return x[p[:1400]], y[p[:1400]], x[p[1400:]], y[p[1400:]]


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 0.05, masks=None
) -> nn.Module:
    from deltaplane.deploy import masked_finetune

    return masked_finetune(
        model, torch.from_numpy(x), torch.from_numpy(y), epochs=epochs, lr=lr, seed=0, masks=masks
    )


@pytest.fixture(scope="session")
def trained_cnn(digits) -> SmallCNN:
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    return train(SmallCNN(), xtr, ytr, epochs=15)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


# --import-mode=importlib: test modules cannot import this file, so helpers are handed out as fixtures.
@pytest.fixture(scope="session")
def helpers():
    class H:
        cnn = SmallCNN
        fit = staticmethod(train)
        acc = staticmethod(accuracy)

    return H


@pytest.fixture()
def app():
    """The `deploy` command on its own Typer app, for CliRunner (tests of the CLI's deploy)."""
    import typer

    from deltaplane.commands.deploy import register

    a = typer.Typer()
    register(a)

    @a.command("noop")
    def _noop() -> None:  # a second command so typer keeps `deploy` as a subcommand
        pass

    return a
