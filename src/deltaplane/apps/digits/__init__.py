"""The default task: scikit-learn's 8×8 digits, partitioned non-IID across devices, and a small CNN.

``deltaplane run`` federates this task unless ``--task`` names another; :func:`make_task` is its factory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deltaplane.data.dataset import Dataset
from deltaplane.data.digits import NUM_CLASSES, load_digits, train_test_split
from deltaplane.data.domains import shift
from deltaplane.data.models import DigitsCNN
from deltaplane.engine.task import Task
from deltaplane.errors import TaskError

__all__ = ["MODELS", "SHIFTS", "DigitsMLP", "DigitsWideCNN", "make_task"]

#: The one-pixel translations ``train_shifts`` adds, in order: the 4 axis neighbours, then the 4 diagonals.
SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


class DigitsMLP(nn.Module):
    """64 → 32 → 10 (2,410 parameters): the small model of the DP and robustness benchmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class DigitsWideCNN(nn.Module):
    """DigitsCNN's shape, wider: conv 1→32 → conv 32→64 → maxpool 2 → fc 1024→1024 → fc 1024→10
    (1,078,666 parameters): the ≥1M-parameter model of the compression frontier (``benchmarks/codecs_accuracy.py``),
    where an update is 4.3 MB in fp32 and the per-payload framing no longer dominates a sparse payload."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)  # 320
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)  # 18,496
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 4 * 4, 1024)  # 1,049,600
        self.fc2 = nn.Linear(1024, NUM_CLASSES)  # 10,250

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))  # (B, 32, 8, 8)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 64, 4, 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # (B, 10)


MODELS = {"cnn": DigitsCNN, "mlp": DigitsMLP, "cnn_wide": DigitsWideCNN}


def make_task(
    *, test_fraction: float = 0.2, split_seed: int = 0, train_shifts: int = 0, model: str = "cnn"
) -> Task:
    """Digits as a :class:`~deltaplane.engine.Task`: :class:`~deltaplane.data.models.DigitsCNN` (or, with
    ``model="mlp"``, :class:`DigitsMLP`; ``model="cnn_wide"``, the 1.08M-parameter :class:`DigitsWideCNN`), the stratified train/test split (``test_fraction``, ``split_seed``),
    plus ``train_shifts`` one-pixel-shifted copies of every training image.

    Digits has 1,437 training images: enough for 20 clients, not for 1,000 with a holdout each. Shifted copies
    (a standard augmentation) give every client a few images of its own; the test set is untouched.
    """
    if model not in MODELS:
        raise TaskError(f"model must be one of {sorted(MODELS)}. Found {model!r}")
    if not 0 <= train_shifts <= len(SHIFTS):
        raise TaskError(f"train_shifts must be in [0, {len(SHIFTS)}]. Found {train_shifts}")
    train, test = train_test_split(load_digits(), test_fraction=test_fraction, seed=split_seed)
    if train_shifts:
        copies = [train.x] + [shift(train.x, dx, dy) for dx, dy in SHIFTS[:train_shifts]]
        train = Dataset(torch.cat(copies), train.y.repeat(len(copies)))
    return Task(
        name="digits",
        model=MODELS[model],
        train=train,
        test=test,
        num_classes=NUM_CLASSES,
        options={
            "test_fraction": test_fraction,
            "split_seed": split_seed,
            "train_shifts": train_shifts,
            "model": model,
        },
    )
