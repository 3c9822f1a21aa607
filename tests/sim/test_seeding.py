import pytest
import torch

from deltaplane.sim.seeding import Stream, derive_seed, numpy_rng, torch_generator


def test_streams_are_distinct_even_with_zero_keys() -> None:
    seeds = {
        derive_seed(0, Stream.PARTITION),
        derive_seed(0, Stream.PARTITION, 0),
        derive_seed(0, Stream.PARTITION, 0, 0),
        derive_seed(0, Stream.HOLDOUT, 0),
        derive_seed(1, Stream.PARTITION),
        derive_seed(0, Stream.LOCAL_TRAINING, 1, 0),
        derive_seed(0, Stream.LOCAL_TRAINING, 0, 1),
    }
    assert len(seeds) == 7
    assert all(0 <= s < 2**63 for s in seeds)


def test_derived_generators_repeat() -> None:
    assert derive_seed(5, Stream.MODEL_INIT) == derive_seed(5, Stream.MODEL_INIT)
    a = torch.rand(3, generator=torch_generator(1, Stream.LOCAL_TRAINING, 2, 3))
    b = torch.rand(3, generator=torch_generator(1, Stream.LOCAL_TRAINING, 2, 3))
    assert torch.equal(a, b)
    assert numpy_rng(1, Stream.HOLDOUT).integers(1 << 30) == numpy_rng(1, Stream.HOLDOUT).integers(1 << 30)
    with pytest.raises(ValueError):
        derive_seed(-1, Stream.PARTITION)
