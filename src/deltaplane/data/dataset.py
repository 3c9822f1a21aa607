"""A labelled dataset as two tensors: what every task, partition and local training loop passes around."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deltaplane.errors import ShapeMismatch

__all__ = ["Dataset"]


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (first axis: samples; digits: ``(N, 1, 8, 8)`` float32 in [0, 1]) and integer labels ``y``
    of shape ``(N,)``."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ShapeMismatch(f"dataset has {self.x.shape[0]} inputs but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray | Tensor | Sequence[int]) -> Dataset:
        """The samples at ``indices``, in that order."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Dataset(self.x[idx], self.y[idx])

    def class_counts(self, num_classes: int = 10) -> np.ndarray:
        """How many samples of each class, shape ``(num_classes,)`` (more if a label is larger)."""
        return np.bincount(self.y.numpy(), minlength=num_classes)
