"""_reset_router seeds a layer's own reset_parameters through deltaplane.seeding: which generators it touches.

There is no GPU here: torch.cuda is replaced by tests/test_seeding.py's stand-ins, which record what is
forked and what the CUDA generators are seeded with.
"""

from __future__ import annotations

import pytest
import torch
from tests.test_seeding import _spy
from torch import nn

from deltaplane.merging.moe import _reset_router


class _Router(nn.Module):
    """Layers of every kind _reset_router handles: linear, ones with their own (random) reset_parameters, and a
    bare parameter (initialised as a linear layer's)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.conv = nn.Conv1d(1, 2, 3)  # kaiming_uniform_ from the global generator
        self.embed = nn.Embedding(7, 3)  # normal_ from the global generator
        self.scale = nn.Parameter(torch.full((4, 2), 9.0))


def _drawn_seeds(seed: int, layers: int) -> list[int]:
    """The seeds _reset_router draws from ``Generator(seed)`` for its ``layers`` self-resetting layers (one each,
    before any linear weight)."""
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(2**62, (1,), generator=g)) for _ in range(layers)]


def test_with_cuda_in_use_every_cuda_generator_is_forked_and_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once CUDA is initialized, each layer's reset forks every CUDA device's generator (restored after it) and
    seeds them all with the layer's seed. Before, torch.manual_seed seeded every CUDA device while only the
    devices of the layer's parameters were forked (none for a CPU router): the caller's CUDA generators were
    left changed."""
    forks, seeds = _spy(monkeypatch, initialized=True, count=2)
    _reset_router(_Router(), torch.Generator().manual_seed(5))
    assert forks == [([0, 1], "cuda")] * 3  # norm, conv, embed
    assert seeds == _drawn_seeds(5, 3)


def test_before_cuda_starts_no_seed_is_queued_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU router on a machine whose CUDA is not started: nothing of CUDA is read or seeded. Before,
    torch.manual_seed queued the seed for CUDA's start (torch.cuda.manual_seed_all), so a later CUDA user
    began from the router's last seed."""
    forks, seeds = _spy(monkeypatch, initialized=False, count=2)
    _reset_router(_Router(), torch.Generator().manual_seed(5))
    assert forks == [([], "cuda")] * 3
    assert seeds == []


def test_a_cpu_routers_initial_weights_are_bit_for_bit_as_before() -> None:
    """On the CPU the weights are those of torch.manual_seed(seed drawn from g) then reset_parameters, as before
    the change (an independent rewrite of that rule), g ends in the same state, and the caller's global CPU
    generator comes back exactly."""
    torch.manual_seed(3)
    ours, ref = _Router(), _Router()  # built from the global generator: before its state is taken
    before = torch.get_rng_state()
    g = torch.Generator().manual_seed(5)
    _reset_router(ours, g)
    assert torch.equal(torch.get_rng_state(), before)

    rg = torch.Generator().manual_seed(5)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for layer in (ref.norm, ref.conv, ref.embed):  # modules() order
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=rg)))
            layer.reset_parameters()
        # parameters() order (a module's own first), the reset ones done: uniform in ±1/√fan_in, biases zero
        for p in (ref.scale, ref.fc.weight, ref.fc.bias):
            bound = 1 / p.shape[-1] ** 0.5
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=rg) if p.dim() > 1 else 0 * p)
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(g.get_state(), rg.get_state())
    assert ours.norm.weight.eq(1).all() and ours.scale.abs().max() <= 0.5**0.5  # reset, not left at 9
