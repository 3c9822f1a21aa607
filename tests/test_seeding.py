"""deltaplane.seeding.seeded_random_layers: which of torch's global generators it forks and seeds."""

from __future__ import annotations

import contextlib

import pytest
import torch

import deltaplane.seeding as seeding
from deltaplane.seeding import Stream, derive_seed, seeded_random_layers


def _spy(monkeypatch: pytest.MonkeyPatch, *, initialized: bool, count: int) -> tuple[list, list]:
    """Pretend CUDA is (or is not) initialized with ``count`` devices; record what fork_rng is asked to fork
    (the CPU generator is still really forked) and what the CUDA generators are seeded with."""
    forks: list[tuple[list[int], str]] = []
    seeds: list[int] = []
    real = torch.random.fork_rng

    @contextlib.contextmanager
    def fork_rng(devices=None, enabled=True, device_type="cuda", **kwargs):
        forks.append((None if devices is None else list(devices), device_type))
        with real(devices=[]):
            yield

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeds.append)
    return forks, seeds


def test_a_cuda_model_gets_its_cuda_generators_forked_and_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA in use, every CUDA device's generator is forked (restored after the block) and seeded from the
    device's stream, so a CUDA model's dropout is reproducible and the caller's CUDA state comes back. Before,
    fork_rng(devices=[]) forked none of them while torch.manual_seed seeded them all: the block changed the
    caller's CUDA generators."""
    forks, seeds = _spy(monkeypatch, initialized=True, count=2)
    g = torch.Generator().manual_seed(11)
    with seeded_random_layers(g):
        pass
    assert forks == [([0, 1], "cuda")]
    assert seeds == [derive_seed(11, Stream.RANDOM_LAYERS)]


def test_cuda_is_left_alone_before_it_is_initialized(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU run on a machine with a GPU neither initializes CUDA (reading a CUDA generator would) nor queues a
    seed for whatever first uses CUDA later: torch.manual_seed did the latter, so a later CUDA user started
    from the last block's seed."""
    forks, seeds = _spy(monkeypatch, initialized=False, count=2)
    with seeded_random_layers(torch.Generator().manual_seed(11)):
        pass
    assert forks == [([], "cuda")]
    assert seeds == []


def test_the_cpu_generator_is_seeded_and_restored_bit_for_bit_as_before() -> None:
    """On the CPU, the masks are torch.manual_seed(derive_seed(...))'s, as before the CUDA change, and the
    caller's CPU state comes back exactly."""
    torch.manual_seed(4)
    torch.rand(100)
    before = torch.get_rng_state()
    g = torch.Generator().manual_seed(7)
    with seeded_random_layers(g):
        ours = torch.nn.functional.dropout(torch.ones(256), 0.5), torch.rand(5), torch.randn(5)
    assert torch.equal(torch.get_rng_state(), before)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(7, Stream.RANDOM_LAYERS))
        reference = torch.nn.functional.dropout(torch.ones(256), 0.5), torch.rand(5), torch.randn(5)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
    assert g.initial_seed() == 7 and torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())


def test_the_cuda_devices_are_read_only_once_cuda_is_initialized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert seeding._cuda_devices() == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert seeding._cuda_devices() == [0, 1, 2, 3]
