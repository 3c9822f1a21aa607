"""Independent, reproducible random streams for every part of a run, derived from one seed.

Drawing everything from one generator would make results depend on call order: sampling one more client
would change every later client's batches. Instead each consumer gets its own stream keyed by what it is for
and where it is (``derive_seed(seed, Stream.TRAIN, round, client)``), so streams never overlap and adding a
consumer leaves the others unchanged.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

__all__ = ["Stream", "derive_seed", "numpy_rng", "torch_generator"]


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
    #: dropout and other random layers during local training (torch's global generator, seeded per update)
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
