"""A text task: predict the next character of Python's own standard library, one device per module.

Like LEAF's Shakespeare (one device per speaking role), the data comes naturally split: each device holds
character windows of one stdlib module's source (``argparse.py``, ``csv.py``, ...), so devices differ in
vocabulary, style and size the way real keyboards do, and nothing has to be partitioned artificially. The data
ships with every Python install, so the task needs no download. The model is a character MLP (embedding of a
16-character context → hidden layer → logits over the 97-symbol vocabulary), a different kind of model and
input (integer tokens, no convolution, no ``forward_stacked``: the batched engine uses its ``vmap`` path).

``deltaplane run --task deltaplane.apps.charlm:make_task --clients 20`` federates it.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.data.dataset import Dataset
from deltaplane.engine.task import Task
from deltaplane.errors import TaskError

__all__ = ["MODULES", "VOCAB", "CharMLP", "make_task"]

#: The devices: stdlib modules present from Python 3.10 to 3.13, one per device, in this order.
MODULES = (
    "argparse", "ast", "calendar", "csv", "dataclasses", "datetime", "difflib", "enum", "fractions",
    "functools", "gettext", "heapq", "inspect", "ipaddress", "pathlib", "pickle", "random", "shutil",
    "statistics", "textwrap",
)  # fmt: skip
#: Printable ASCII (95 symbols) plus newline; index ``len(VOCAB)`` stands for any other character.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {c: i for i, c in enumerate(VOCAB)}


class CharMLP(nn.Module):
    """embedding(97, 16) of ``context`` characters → flatten → linear 256 → ReLU → linear → 97 logits."""

    def __init__(self, context: int = 16, dim: int = 16, hidden: int = 256) -> None:
        super().__init__()
        classes = len(VOCAB) + 1
        self.embed = nn.Embedding(classes, dim)
        self.fc1 = nn.Linear(context * dim, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).flatten(1)  # (B, context·dim)
        return self.fc2(torch.relu(self.fc1(h)))  # (B, classes)


def _encode(text: str) -> np.ndarray:
    other = len(VOCAB)
    return np.fromiter((_INDEX.get(c, other) for c in text), dtype=np.int64, count=len(text))


def _windows(codes: np.ndarray, starts: np.ndarray, context: int) -> Dataset:
    idx = starts[:, None] + np.arange(context)[None, :]
    return Dataset(torch.from_numpy(codes[idx]), torch.from_numpy(codes[starts + context]))


def make_task(
    *,
    devices: int = len(MODULES),
    per_device: int = 600,
    context: int = 16,
    test_per_device: int = 100,
    seed: int = 0,
) -> Task:
    """The task over the first ``devices`` modules of :data:`MODULES`.

    Each module's source is cut at 80%: device *i* trains on up to ``per_device`` windows drawn (seeded) from
    the first part, and ``test_per_device`` windows of the last part of every module form the global test set
    (text it never trained on, from every device's distribution).

    Raises:
        TaskError: a module is missing from this Python's standard library, or an option is out of range.
    """
    for name, value in (("devices", devices), ("per_device", per_device), ("context", context),
                        ("test_per_device", test_per_device), ("seed", seed)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int):  # True is not one device, 2.5 not a count
            raise TaskError(f"{name} must be an integer. Found {value!r}")
    if not 1 <= devices <= len(MODULES):
        raise TaskError(f"devices must be in [1, {len(MODULES)}]. Found {devices}")
    if per_device < 2 or test_per_device < 1 or context < 1:
        raise TaskError("per_device must be at least 2, test_per_device and context at least 1")
    if seed < 0:
        raise TaskError(f"seed must be a non-negative integer. Found {seed}")
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng(seed)
    train, tests = [], []
    for name in MODULES[:devices]:
        path = root / f"{name}.py"
        try:
            codes = _encode(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TaskError(
                f"charlm needs the standard library's {path.name}: {exc.strerror or exc}"
            ) from None
        cut = int(0.8 * len(codes))
        first = np.arange(0, cut - context)
        last = np.arange(cut, len(codes) - context)
        if len(first) < 2 or len(last) < 1:  # a window longer than the module's training or test part
            raise TaskError(
                f"context={context} is longer than {path.name}'s test part ({len(codes) - cut} characters): "
                "choose a shorter context"
            )
        train.append(
            _windows(
                codes, np.sort(rng.choice(first, size=min(per_device, len(first)), replace=False)), context
            )
        )
        tests.append(
            _windows(
                codes, np.sort(rng.choice(last, size=min(test_per_device, len(last)), replace=False)), context
            )
        )
    test = Dataset(torch.cat([t.x for t in tests]), torch.cat([t.y for t in tests]))
    return Task(
        name="charlm",
        model=lambda: CharMLP(context=context),
        test=test,
        clients=train,
        num_classes=len(VOCAB) + 1,
        options={"devices": devices, "per_device": per_device, "context": context, "seed": seed},
    )
