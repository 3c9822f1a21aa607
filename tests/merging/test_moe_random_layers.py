"""fit_router is a pure function of the data and its seed when the router has dropout."""

from __future__ import annotations

import contextlib

import torch
from tests import random_layers as rl
from torch import nn

import deltaplane.merging.moe as moe_module
from deltaplane.merging import MixtureOfExperts

_FIT = (
    "from torch import nn\n"
    "from deltaplane.merging import MixtureOfExperts\n"
    "x, y = rl.toy_data(inputs=4, classes=2)\n"
    "with torch.random.fork_rng(devices=[]):\n"
    "    torch.manual_seed(0)\n"
    "    router = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))\n"
    "    moe = MixtureOfExperts([nn.Linear(4, 2), nn.Linear(4, 2)], router=router)\n"
    "moe.fit_router(x, y, epochs=3, lr=0.05, batch_size=8, seed=0)\n"
    "print(rl.weights_hash(moe.router))\n"
)


def _fit(seed: int, dropout: float = 0.5) -> nn.Module:
    x, y = rl.toy_data(inputs=4, classes=2)
    with torch.random.fork_rng(devices=[]):  # the experts' and router's initial weights (the router is reset)
        torch.manual_seed(0)
        router = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))
        moe = MixtureOfExperts([nn.Linear(4, 2), nn.Linear(4, 2)], router=router)
    moe.fit_router(x, y, epochs=3, lr=0.05, batch_size=8, seed=seed)
    return moe.router


def test_a_routers_dropout_follows_the_seed_not_the_global_generator() -> None:
    """Before: the router's dropout drew from torch's global generator, so one seed fitted another router
    whenever anything else had drawn from it, and in another process. Now the masks follow the seed and the
    caller's global state is left as it was."""
    here = rl.check_seeded(_fit)
    assert rl.hash_in_fresh_process(_FIT) == here


def test_a_router_without_random_layers_fits_as_without_the_seeded_fork(monkeypatch) -> None:
    """The fork only reads the seed's generator: without random layers the router comes out as the loop
    without the fork (the code before) fits it, bit for bit."""
    seeded = rl.weights_hash(_fit(0, dropout=0.0))
    monkeypatch.setattr(moe_module, "seeded_random_layers", lambda g: contextlib.nullcontext())
    assert rl.weights_hash(_fit(0, dropout=0.0)) == seeded
