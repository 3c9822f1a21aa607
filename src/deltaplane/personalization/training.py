"""Local training and evaluation on plain torch modules and ``(x, y)`` data, shared by the personalizers.

Data is anything with ``.x`` / ``.y`` tensors (the simulator's ``Dataset``) or an ``(x, y)`` tuple; randomness
comes only from the ``torch.Generator`` passed in (the batch order, and through its seed the masks of dropout and
any other random layer: :func:`~deltaplane.seeding.seeded_random_layers`), so a device's personalization is
reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from deltaplane.errors import ConfigError
from deltaplane.seeding import seeded_random_layers

__all__ = ["PERSONAL_MOMENTUM", "accuracy", "as_xy", "check_training_options", "train_sgd"]

#: the momentum of the personalizers' SGD (α-mix's fine-tuning, Ditto's ``v_k``), one place for the loop and the
#: batched engine's stacked training
PERSONAL_MOMENTUM = 0.9


def check_training_options(*, epochs: int, lr: float, batch_size: int, min_epochs: int = 1) -> None:
    """Refuse training options no run can use: a NaN or infinite learning rate passed ``lr <= 0`` and trained
    the personal model to NaN; a non-integer or non-positive batch size or epoch count.

    Raises:
        ConfigError: naming the option.
    """
    for name, value, least in (("epochs", epochs, min_epochs), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not (isinstance(value, int) and value >= least):
            raise ConfigError(f"{name} must be an integer >= {least}. Found {value!r}")
    if isinstance(lr, bool) or not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite positive number. Found {lr!r}")


def as_xy(data: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a dataset object with ``.x``/``.y`` or from a 2-tuple.

    Arrays that are not tensors (NumPy's, from scikit-learn's loaders) are converted, float64 inputs to torch's
    default float dtype (a model's weights are float32; NumPy's float64 default would fail in the first layer)
    and integer labels to int64 as ``cross_entropy`` wants them; before, a NumPy pair failed deep in the model
    with ``linear(): argument 'input' must be Tensor``.

    Raises:
        ConfigError: neither form, or not one label per example.
    """
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = data[0], data[1]
    else:
        raise ConfigError(
            f"data must have .x and .y tensors or be an (x, y) pair. Found {type(data).__name__}"
        )
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
        if x.dtype == torch.float64:
            x = x.to(torch.get_default_dtype())
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
        if not y.dtype.is_floating_point and y.dtype != torch.bool:
            y = y.long()
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"data must hold one label per example: x has shape {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    return x, y


def train_sgd(
    model: nn.Module,
    start: Mapping[str, Tensor],
    data: Any,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    momentum: float = PERSONAL_MOMENTUM,
    generator: torch.Generator,
    prox_center: Mapping[str, Tensor] | None = None,
    prox_lambda: float = 0.0,
) -> dict[str, Tensor]:
    """Load ``start`` into ``model``, run SGD on cross-entropy and return the trained state dict (a copy).

    With ``prox_center`` the loss gets Ditto's proximal term ``λ/2 ‖θ − θ_center‖²`` over the parameters.
    ``generator`` decides the batch order and, through its initial seed, the masks of dropout and any other
    random layer (:func:`~deltaplane.seeding.seeded_random_layers`: torch's global generator is seeded in a
    fork and the caller's state comes back unchanged), so the result depends on the generator alone.
    """
    check_training_options(epochs=epochs, lr=lr, batch_size=batch_size, min_epochs=0)
    if not (isinstance(prox_lambda, int | float) and math.isfinite(prox_lambda) and prox_lambda >= 0):
        raise ConfigError(f"prox_lambda must be a finite non-negative number. Found {prox_lambda!r}")
    x, y = as_xy(data)
    with seeded_random_layers(generator):
        model.load_state_dict(dict(start))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        center = {k: v.detach() for k, v in (prox_center or {}).items()}
        named = [(k, p) for k, p in model.named_parameters() if k in center]
        n = x.shape[0]
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for s in range(0, n, batch_size):
                idx = order[s : s + batch_size]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                if prox_lambda > 0 and named:
                    loss = loss + 0.5 * prox_lambda * sum((p - center[k]).pow(2).sum() for k, p in named)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def accuracy(model: nn.Module, state: Mapping[str, Tensor] | None, data: Any) -> float:
    """Accuracy of ``model`` (with ``state`` loaded, if given) on ``data``; 0.0 for empty data."""
    x, y = as_xy(data)
    if x.shape[0] == 0:
        return 0.0
    if state is not None:
        model.load_state_dict(dict(state))
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())
