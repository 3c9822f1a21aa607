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
    monkeypatch.setattr(
        torch.xpu, "is_initialized", lambda: False
    )  # the same forks on a machine with XPU or MPS
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
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


def _fake_mps(monkeypatch: pytest.MonkeyPatch, *, built: bool) -> torch.Generator:
    """Stand in for torch's MPS generator with a CPU generator: torch.mps's rng functions read, set and seed it."""
    fake = torch.Generator().manual_seed(123)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: built)
    monkeypatch.setattr(torch.mps, "_is_in_bad_fork", lambda: False)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": fake.get_state())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": fake.set_state(state))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: fake.manual_seed(seed))
    return fake


def _fake_xpu(monkeypatch: pytest.MonkeyPatch, *, initialized: bool, count: int) -> list[torch.Generator]:
    """Stand in for ``count`` XPU devices' generators with CPU generators."""
    fakes = [torch.Generator().manual_seed(100 + i) for i in range(count)]
    monkeypatch.setattr(torch.xpu, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: count)
    monkeypatch.setattr(torch.xpu, "get_rng_state", lambda device="xpu": fakes[device].get_state())
    monkeypatch.setattr(
        torch.xpu, "set_rng_state", lambda state, device="xpu": fakes[device].set_state(state)
    )

    def manual_seed_all(seed: int) -> None:
        for fake in fakes:
            fake.manual_seed(seed)

    monkeypatch.setattr(torch.xpu, "manual_seed_all", manual_seed_all)
    return fakes


def test_a_model_on_mps_gets_seeded_masks_and_the_callers_mps_state_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With torch built with MPS, the MPS generator draws from the stream's seed within the block (a dropout
    model on MPS reproduces) and is as it was afterwards. Before, MPS was neither seeded nor restored: the block
    drew from wherever the caller's MPS generator stood."""
    fake = _fake_mps(monkeypatch, built=True)
    torch.rand(3, generator=fake)
    before = fake.get_state()
    with seeded_random_layers(torch.Generator().manual_seed(7)):
        inside = torch.rand(5, generator=fake)
    assert torch.equal(fake.get_state(), before)
    reference = torch.rand(5, generator=torch.Generator().manual_seed(derive_seed(7, Stream.RANDOM_LAYERS)))
    assert torch.equal(inside, reference)


def test_mps_is_left_alone_when_torch_is_built_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_mps(monkeypatch, built=False)
    monkeypatch.setattr(
        torch.mps, "get_rng_state", lambda device="mps": pytest.fail("read the MPS generator")
    )
    before = fake.get_state()
    with seeded_random_layers(torch.Generator().manual_seed(7)):
        pass
    assert torch.equal(fake.get_state(), before)


def test_initialized_xpu_devices_are_forked_and_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """As CUDA: once XPU is initialized every device's generator is seeded within the block and restored after.
    Before, XPU generators were neither seeded nor restored."""
    fakes = _fake_xpu(monkeypatch, initialized=True, count=2)
    for i, fake in enumerate(fakes):
        torch.rand(i + 1, generator=fake)
    before = [fake.get_state() for fake in fakes]
    with seeded_random_layers(torch.Generator().manual_seed(9)):
        inside = [torch.rand(4, generator=fake) for fake in fakes]
    assert all(torch.equal(f.get_state(), b) for f, b in zip(fakes, before, strict=True))
    reference = torch.rand(4, generator=torch.Generator().manual_seed(derive_seed(9, Stream.RANDOM_LAYERS)))
    assert all(torch.equal(x, reference) for x in inside)


def test_xpu_is_left_alone_before_it_is_initialized(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading an XPU generator would initialize XPU: nothing of it is read or seeded before."""
    _fake_xpu(monkeypatch, initialized=False, count=2)
    touched: list[str] = []
    monkeypatch.setattr(torch.xpu, "get_rng_state", lambda device="xpu": touched.append("read"))
    monkeypatch.setattr(torch.xpu, "manual_seed_all", lambda seed: touched.append("seed"))
    with seeded_random_layers(torch.Generator().manual_seed(9)):
        pass
    assert touched == []
