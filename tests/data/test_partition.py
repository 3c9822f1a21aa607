import numpy as np
import pytest

from deltaplane.data import dirichlet_partition, load_digits, split_holdout, train_test_split
from deltaplane.errors import ConfigError


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    train, _ = train_test_split(load_digits())
    return train.y.numpy()


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_partition_covers_every_sample_exactly_once(labels: np.ndarray) -> None:
    shards = dirichlet_partition(labels, 20, 0.5, _rng(), min_size=20)
    assert len(shards) == 20
    everything = np.concatenate(shards)
    assert len(everything) == len(labels) == 1438
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))
    assert min(len(s) for s in shards) >= 20


def test_small_alpha_gives_label_skew(labels: np.ndarray) -> None:
    def mean_top_class_share(alpha: float) -> float:
        shards = dirichlet_partition(labels, 20, alpha, _rng(1), min_size=10)
        return float(np.mean([np.bincount(labels[s]).max() / len(s) for s in shards]))

    skewed, near_iid = mean_top_class_share(0.1), mean_top_class_share(1000.0)
    # IID shards hold ~10% of each class; Dirichlet(0.1) shards are dominated by one or two classes
    assert near_iid < 0.25
    assert skewed > 0.5
    # and under skew many clients miss some classes entirely
    shards = dirichlet_partition(labels, 20, 0.5, _rng(1), min_size=10)
    assert np.mean([len(np.unique(labels[s])) for s in shards]) < 8


def test_partition_is_deterministic_given_rng(labels: np.ndarray) -> None:
    a = dirichlet_partition(labels, 10, 0.5, _rng(3))
    b = dirichlet_partition(labels, 10, 0.5, _rng(3))
    c = dirichlet_partition(labels, 10, 0.5, _rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(
    ("n_clients", "alpha", "min_size", "match"),
    [(0, 0.5, 1, "n_clients"), (5, 0.0, 1, "alpha"), (100, 0.5, 20, "cannot give")],
)
def test_partition_rejects_bad_arguments(
    labels: np.ndarray, n_clients: int, alpha: float, min_size: int, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        dirichlet_partition(labels, n_clients, alpha, _rng(), min_size=min_size)


def test_partition_gives_up_when_min_size_is_unreachable() -> None:
    # 2 classes, 3 clients, alpha tiny: each class goes whole to one client, so one client always gets none
    labels = np.repeat([0, 1], 10)
    with pytest.raises(ConfigError, match="no Dirichlet"):
        dirichlet_partition(labels, 3, 1e-6, _rng(), min_size=6)


def test_split_holdout_is_a_partition_of_the_shard() -> None:
    shard = np.arange(100, 150)
    train, held = split_holdout(shard, 0.2, _rng())
    assert (len(train), len(held)) == (40, 10)
    assert np.array_equal(np.sort(np.concatenate([train, held])), shard)
    tiny_train, tiny_held = split_holdout(np.array([7, 9]), 0.2, _rng())
    assert len(tiny_train) == len(tiny_held) == 1
    with pytest.raises(ConfigError):
        split_holdout(np.array([1]), 0.2, _rng())
