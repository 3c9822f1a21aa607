"""A labelled dataset as two tensors: what every task, partition and local training loop passes around."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deltaplane.errors import ShapeMismatch, TaskError

__all__ = ["Dataset"]


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (first axis: samples; digits: ``(N, 1, 8, 8)`` float32 in [0, 1]) and integer labels ``y``
    of shape ``(N,)``, both torch tensors.

    Raises:
        TaskError: ``x`` or ``y`` is not a tensor (a numpy array from scikit-learn, a list of strings), or ``y``
            is not one label per sample; the message says how to convert.
        ShapeMismatch: ``x`` and ``y`` hold different numbers of samples.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        # Checked here, where the user's data enters: otherwise a numpy array or a column of labels fails deep
        # inside torch in round 1. O(1), so the engine's own subsets cost nothing more.
        for name, value in (("x", self.x), ("y", self.y)):
            if not isinstance(value, Tensor):
                raise TaskError(
                    f"Dataset {name} must be a torch.Tensor, not {type(value).__module__}.{type(value).__name__}; "
                    f"convert it with torch.as_tensor({name}) (class labels as integers: map strings to 0..C-1 first)"
                )
        if self.x.dim() == 0:
            raise TaskError("Dataset x must have a first axis of samples; got a 0-d tensor")
        if self.y.dim() != 1:
            raise TaskError(
                f"Dataset y must hold one class id per sample, shape (N,); got shape {list(self.y.shape)} "
                "(a column of labels: y.squeeze(1); one-hot labels: y.argmax(1))"
            )
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
