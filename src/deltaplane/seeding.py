"""Independent, reproducible random streams for every part of a run, derived from one seed.

Drawing everything from one generator would make results depend on call order: sampling one more client
would change every later client's batches. Instead each consumer gets its own stream keyed by what it is for
and where it is (``derive_seed(seed, Stream.TRAIN, round, client)``), so streams never overlap and adding a
consumer leaves the others unchanged.

It sits below every package that trains (engine, personalization, adapters, merging, deploy), so they all
seed their random layers the same way (:func:`seeded_random_layers`); :mod:`deltaplane.engine.seeding` and
:mod:`deltaplane.sim.seeding` re-export it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from enum import IntEnum

import numpy as np
import torch

__all__ = [
    "Stream",
    "derive_seed",
    "numpy_rng",
    "seeded_global_generators",
    "seeded_random_layers",
    "torch_generator",
]


class Stream(IntEnum):
    """What a random stream is used for; part of its key."""

    PARTITION = 0
    HOLDOUT = 1
    MODEL_INIT = 2
    CLIENT_SAMPLING = 3
    LOCAL_TRAINING = 4
    UPLINK_CODEC = 5
    DOWNLINK_CODEC = 6
    ATTACK = 7
    ROOT_DATA = 8
    AGGREGATION = 9
    SECAGG = 10
    PERSONALIZATION = 11
    LOCAL_DP = 12
    DISTRIBUTED_DP = 13
    #: dropout and other random layers while training (torch's global generator, seeded per training run)
    RANDOM_LAYERS = 14


def derive_seed(seed: int, stream: Stream, *keys: int) -> int:
    """A 63-bit seed determined by ``(seed, stream, *keys)`` via NumPy's ``SeedSequence`` hashing.

    The entropy starts with the number of keys because ``SeedSequence`` ignores trailing zeros:
    ``[s, stream]`` and ``[s, stream, 0]`` would otherwise give the same stream (client 0 would share its
    stream with the whole-run one).
    """
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seed and keys must be non-negative. Found seed={seed}, keys={keys}")
    entropy = [len(keys), seed, int(stream), *keys]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))  # torch.Generator.manual_seed wants a value that fits in int64


def numpy_rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """A NumPy generator for the stream ``(seed, stream, *keys)``."""
    return np.random.default_rng(derive_seed(seed, stream, *keys))


def torch_generator(seed: int, stream: Stream, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the stream ``(seed, stream, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, *keys))


def _cuda_devices() -> list[int]:
    """The CUDA devices whose generators :func:`seeded_random_layers` forks and seeds: every visible one once
    CUDA is initialized in this process (a model on CUDA has initialized it), none before.

    Reading a CUDA generator's state initializes CUDA (``torch.cuda.get_rng_state`` calls ``_lazy_init``):
    forking them all in a CPU-only run would cost the CUDA start-up and GPU memory on a machine that has a GPU,
    and a process that the batched trainer forks afterwards could no longer use CUDA. In such a fork
    ``torch.cuda.is_initialized()`` is False, so the fork leaves CUDA alone.
    """
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _xpu_devices() -> list[int]:
    """The XPU devices whose generators :func:`seeded_random_layers` forks and seeds: as :func:`_cuda_devices`,
    every visible one once XPU is initialized (reading an XPU generator initializes XPU), none before."""
    return list(range(torch.xpu.device_count())) if torch.xpu.is_initialized() else []


def _mps_in_use() -> bool:
    """Whether :func:`seeded_random_layers` forks and seeds the MPS generator: when torch is built with MPS,
    outside a child forked after MPS was touched.

    MPS has no lazy start to wait for (torch has no ``torch.mps.is_initialized``): its one generator is a
    host-side object that exists whether or not a model is on MPS, and reading, seeding or restoring it starts
    no Metal device (``torch.manual_seed`` seeds it on every call). Asking ``torch.mps.is_available()`` would
    create the Metal device, so it is not asked: a torch built with MPS on a machine without one gets a
    generator seeded that nothing draws from. In a forked child MPS is not usable, and torch's own seeding
    leaves it alone there too (``torch.mps._is_in_bad_fork``).
    """
    return torch.backends.mps.is_built() and not torch.mps._is_in_bad_fork()


@contextmanager
def seeded_random_layers(generator: torch.Generator) -> Iterator[None]:
    """Within the block, torch's global CPU generator, and the CUDA, XPU and MPS ones once they are in use, are
    seeded from ``generator``; afterwards they are as they were.

    Dropout and other random layers draw from torch's *global* generator, which nothing seeds per device or
    per training run: a loop whose batch order comes from its own ``generator`` still trained another model
    whenever anything else had drawn from the global one first. Wrap the loop in this block and its masks
    follow the same seed: ``derive_seed(generator.initial_seed(), Stream.RANDOM_LAYERS)``. The generator is
    only read, not advanced, so the batch orders drawn from it (and so every model without random layers)
    stay bit for bit what they were; two generators of different seeds give different masks.

    A model on CUDA draws its masks from the CUDA generator of its device: when CUDA is initialized on entry
    (placing the model there initializes it), every visible CUDA device's generator is forked
    (``torch.random.fork_rng(devices=...)``) and seeded with the same seed, so a CUDA model's dropout is
    reproducible too (its masks are not the CPU's: CUDA's Philox generator draws other numbers from that
    seed) and the caller's CUDA generators come back unchanged. Before CUDA is initialized nothing of it is
    touched: reading a CUDA generator would initialize CUDA (:func:`_cuda_devices`), and seeding it then would
    only queue the seed for whatever first uses CUDA later (``torch.manual_seed`` does that, and seeded the
    CUDA generators without restoring them: the block used to change the caller's CUDA state). So move a model
    to CUDA before the block, as every loop here receives it; a body that initializes CUDA itself draws from
    CUDA's default seed. XPU is treated as CUDA: once initialized (:func:`_xpu_devices`), every XPU device's
    generator is forked and seeded, before that nothing of it is touched. MPS's one generator is forked and
    seeded whenever torch is built with MPS (:func:`_mps_in_use`: it can be read without starting the Metal
    device), so a model on MPS gets reproducible masks and the caller's MPS state comes back.

    Example:
        >>> g = torch.Generator().manual_seed(3)
        >>> with seeded_random_layers(g):
        ...     a = torch.nn.functional.dropout(torch.ones(8), 0.5)
        >>> with seeded_random_layers(g):
        ...     b = torch.nn.functional.dropout(torch.ones(8), 0.5)
        >>> bool(torch.equal(a, b))
        True
    """
    with seeded_global_generators(derive_seed(generator.initial_seed(), Stream.RANDOM_LAYERS)):
        yield


@contextmanager
def seeded_global_generators(seed: int) -> Iterator[None]:
    """Within the block, torch's global CPU generator, and every visible CUDA and XPU device's and the MPS one
    once they are in use, are seeded with ``seed``; afterwards they are as they were.

    The core of :func:`seeded_random_layers` (see there for which accelerators count as in use and why CUDA and
    XPU are left alone before they are initialized), for code that draws its seed itself: a layer's own
    ``reset_parameters`` drawing from the global generator (:mod:`deltaplane.merging.moe` re-initialising a
    router). On the CPU it is ``torch.manual_seed(seed)`` bit for bit, without ``torch.manual_seed``'s side
    effects on generators it does not restore (it seeds every CUDA and XPU device, or queues the seed for their
    start, and MPS).
    """
    cuda, xpu, mps = _cuda_devices(), _xpu_devices(), _mps_in_use()
    # exactly the generators it seeds: the CPU's (always forked, by the first fork), the initialized CUDA and
    # XPU devices' and the MPS one when in use; a fork_rng restores one device type
    with ExitStack() as forks:
        forks.enter_context(torch.random.fork_rng(devices=cuda, device_type="cuda"))
        if xpu:
            forks.enter_context(torch.random.fork_rng(devices=xpu, device_type="xpu"))
        if mps:  # torch.mps.get_rng_state ignores the index: there is one MPS generator
            forks.enter_context(torch.random.fork_rng(devices=[0], device_type="mps"))
        torch.default_generator.manual_seed(seed)
        if cuda:  # CUDA is initialized, so this seeds every device now (it would otherwise queue the seed)
            torch.cuda.manual_seed_all(seed)
        if xpu:  # likewise for XPU
            torch.xpu.manual_seed_all(seed)
        if mps:
            torch.mps.manual_seed(seed)
        yield
