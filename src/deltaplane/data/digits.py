"""The scikit-learn digits dataset as tensors, with a fixed, seeded, stratified train/test split.

1,797 grey-scale 8×8 images of the digits 0–9: small enough that a federated round over 20 clients takes a
fraction of a second on a laptop CPU, yet hard enough that a badly compressed update visibly costs accuracy.
The split is fixed by a seed so that every run, benchmark and test measures against the same test images.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
import torch

from deltaplane.data.dataset import Dataset
from deltaplane.errors import ConfigError

__all__ = ["NUM_CLASSES", "Dataset", "load_digits", "train_test_split"]

NUM_CLASSES = 10
_PIXEL_MAX = 16.0  # load_digits stores intensities as integers 0..16


def _bundled_csv() -> Path | None:
    """scikit-learn's own copy of the digits (``sklearn/datasets/data/digits.csv.gz``), found without importing
    scikit-learn: the import alone takes ~2 s (scipy, joblib...), most of a simulation's start-up."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


@cache
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    # Cached: the CSV is parsed once per process, and tests and benchmarks load the set many times.
    path = _bundled_csv()
    if path is not None:  # the file sklearn.datasets.load_digits parses, read the same way (np.loadtxt)
        data = np.loadtxt(path, delimiter=",")
        images, target = data[:, :-1], data[:, -1]
    else:  # a future scikit-learn may move its data: its public loader still works
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        images, target = bunch.data, bunch.target
    x = (images.astype(np.float32) / _PIXEL_MAX).reshape(-1, 1, 8, 8)
    return x, target.astype(np.int64)


def load_digits() -> Dataset:
    """All 1,797 digits, scaled to [0, 1], as a :class:`Dataset` of shape ``(1797, 1, 8, 8)``."""
    x, y = _raw_digits()
    return Dataset(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()))


def train_test_split(data: Dataset, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split ``data`` into (train, test), stratified by label: each class keeps its share in both parts.

    Deterministic given ``seed``; the test part is what global accuracy is reported on, so it must not move
    between runs that are compared with each other.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1). Found {test_fraction}")
    rng = np.random.default_rng(seed)
    labels = data.y.numpy()
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    # every label the data holds (ascending, so the digits get the draws they always had): a loop over the
    # digits' ten classes silently dropped the samples of any other label from both parts
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    # Sorted so the order of samples does not depend on class order; shuffling is the trainer's job.
    return data.subset(np.sort(np.concatenate(train_idx))), data.subset(np.sort(np.concatenate(test_idx)))
