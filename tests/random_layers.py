"""Shared checks for the training loops that seed their random layers (:func:`deltaplane.seeding.seeded_random_layers`).

Each loop's test builds a small model with dropout, trains it twice from one seed with the global generator in
two different states, in this process and in a fresh one (another ``PYTHONHASHSEED``), and checks that the
weights agree, that the caller's global state comes back unchanged, and that another seed draws other masks.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

SRC = Path(__file__).resolve().parents[1] / "src"


def dropout_mlp(inputs: int = 16, classes: int = 4) -> nn.Module:
    """A small classifier whose hidden layer has dropout, with weights fixed by seed 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, classes))


def toy_data(n: int = 48, inputs: int = 16, classes: int = 4) -> tuple[Tensor, Tensor]:
    """``n`` random inputs and labels, the same every call."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, inputs, generator=g), torch.randint(0, classes, (n,), generator=g)


def weights_hash(state: Mapping[str, Tensor] | nn.Module) -> str:
    """SHA-256 of the tensors' names and bytes: equal exactly when every weight is equal bit for bit."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def check_seeded(train: Callable[[int], Mapping[str, Tensor] | nn.Module]) -> str:
    """``train(seed)`` gives the same weights whatever the global generator's state, leaves that state as it
    was, and another seed gives other weights; returns the weights' hash for seed 0."""
    torch.manual_seed(1)
    first = weights_hash(train(0))
    torch.manual_seed(2)  # another global state: a process that drew other numbers before
    torch.rand(1000)
    before = torch.get_rng_state()
    again = weights_hash(train(0))
    assert torch.equal(torch.get_rng_state(), before), "the caller's global generator was changed"
    assert again == first, "the same seed trained other weights"
    assert weights_hash(train(1)) != first, "another seed trained the same weights"
    return first


def hash_in_fresh_process(code: str, src: Path = SRC) -> str:
    """The last line ``code`` prints, run by a fresh interpreter with ``src`` first on the path, another hash
    seed and a global generator drawn from first (``code`` may call this module's helpers as ``rl.name``)."""
    prelude = (
        "import sys, torch\n"
        f"sys.path[:0] = [{str(src)!r}, {str(Path(__file__).parent)!r}]\n"
        "torch.manual_seed(123); torch.rand(77)\n"
        "import random_layers as rl\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4321", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", prelude + code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return out.stdout.strip().splitlines()[-1]


def plain_sgd(
    model: nn.Module, x: Tensor, y: Tensor, *, seed: int, epochs: int = 2, batch_size: int = 8
) -> nn.Module:
    """The reference loop: SGD (lr 0.1, momentum 0.9) on cross-entropy over ``torch.randperm`` batch orders
    drawn from ``Generator().manual_seed(seed)``, with nothing else touching any generator."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for first in range(0, len(y), batch_size):
            idx = order[first : first + batch_size]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model
