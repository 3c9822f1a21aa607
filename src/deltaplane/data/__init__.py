"""Bundled datasets for the default run and benchmarks: digits, non-IID partitions, domain shifts."""

from deltaplane.data.digits import NUM_CLASSES, Dataset, load_digits, train_test_split
from deltaplane.data.domains import DOMAINS, apply_domain, gaussian_noise, invert, rotate90, shift
from deltaplane.data.partition import dirichlet_partition, split_holdout

__all__ = [
    "DOMAINS",
    "NUM_CLASSES",
    "Dataset",
    "apply_domain",
    "dirichlet_partition",
    "gaussian_noise",
    "invert",
    "load_digits",
    "rotate90",
    "shift",
    "split_holdout",
    "train_test_split",
]
