import numpy as np
import pytest
import torch

from deltaplane.data import NUM_CLASSES, Dataset, load_digits, train_test_split
from deltaplane.errors import ConfigError, ShapeMismatch


def test_load_digits_shape_range_and_labels() -> None:
    d = load_digits()
    assert d.x.shape == (1797, 1, 8, 8)
    assert d.x.dtype == torch.float32
    assert float(d.x.min()) == 0.0
    assert float(d.x.max()) == 1.0
    assert d.y.dtype == torch.int64
    assert d.class_counts().tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_load_digits_returns_independent_copies() -> None:
    a = load_digits()
    a.x.zero_()
    assert float(load_digits().x.sum()) > 0


def test_split_is_stratified_disjoint_and_fixed() -> None:
    data = load_digits()
    train, test = train_test_split(data, test_fraction=0.2, seed=0)
    assert (len(train), len(test)) == (1438, 359)
    # every class keeps its 20% share in the test part (to within rounding)
    share = test.class_counts() / data.class_counts()
    assert np.all(np.abs(share - 0.2) < 0.01)
    # disjoint and complete: every image lands in exactly one part
    rows = {tuple(r) for r in torch.cat([train.x, test.x]).reshape(len(data), -1).tolist()}
    assert len(rows) == len({tuple(r) for r in data.x.reshape(len(data), -1).tolist()})
    again_train, again_test = train_test_split(data, test_fraction=0.2, seed=0)
    assert torch.equal(again_test.x, test.x) and torch.equal(again_train.y, train.y)
    _, other = train_test_split(data, test_fraction=0.2, seed=1)
    assert not torch.equal(other.x, test.x)


def test_split_keeps_every_sample_of_any_label() -> None:
    """It looped over the digits' ten classes: a dataset with labels 10..14 lost them from both parts."""
    data = Dataset(torch.arange(300.0)[:, None], torch.arange(300) % 15)
    train, test = train_test_split(data, test_fraction=0.2, seed=1)
    ids = sorted(train.x[:, 0].tolist() + test.x[:, 0].tolist())
    assert ids == list(range(300))  # each sample in exactly one part
    assert torch.equal(torch.bincount(test.y, minlength=15), torch.full((15,), 4))  # 20% of each label's 20


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        train_test_split(load_digits(), test_fraction=fraction)


def test_dataset_rejects_mismatched_lengths() -> None:
    with pytest.raises(ShapeMismatch):
        Dataset(torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_subset_and_class_counts() -> None:
    d = load_digits().subset(np.array([0, 1, 2, 10]))
    assert len(d) == 4
    assert d.class_counts().sum() == 4
    assert d.class_counts().shape == (NUM_CLASSES,)


def test_bundled_file_gives_exactly_sklearns_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading scikit-learn's CSV directly (no sklearn import at start-up) equals its public loader, and the
    fallback through that loader gives the same values too."""
    from sklearn.datasets import load_digits as sk_load_digits

    import deltaplane.data.digits as digits

    assert digits._bundled_csv() is not None
    x, y = digits._raw_digits()
    ref = sk_load_digits()
    assert np.array_equal(x.reshape(-1, 64) * 16.0, ref.data.astype(np.float32))
    assert np.array_equal(y, ref.target)
    digits._raw_digits.cache_clear()
    monkeypatch.setattr(digits, "_bundled_csv", lambda: None)
    try:
        x2, y2 = digits._raw_digits()
    finally:
        digits._raw_digits.cache_clear()
    assert np.array_equal(x2, x) and np.array_equal(y2, y)
