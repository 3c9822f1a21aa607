"""Partial personalization: some layers never leave the device.

- :class:`FedPer` — Arivazhagan et al. 2019, "Federated Learning with Personalization Layers",
  https://arxiv.org/abs/1912.00818: the base layers are federated, the head (last layers) is personal.
- :class:`FedBN` — Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
  Normalization", https://arxiv.org/abs/2102.07623: every batch-norm layer (affine weights and running
  statistics) stays local, which absorbs per-device feature shift.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from deltaplane.errors import ConfigError
from deltaplane.personalization.base import Personalizer

__all__ = ["FedBN", "FedPer"]


def _leaves_something_shared(model: nn.Module, keys: frozenset[str], what: str) -> frozenset[str]:
    """``keys``, unless they cover every floating-point tensor of ``model``: then nothing would be federated
    (every upload empty), which is local training under another name; it crashed the server's mean."""
    if all(k in keys for k, v in model.state_dict().items() if v.is_floating_point()):
        raise ConfigError(
            f"{what} keeps every tensor of the model on the device, so nothing would be federated; "
            "keep fewer layers local"
        )
    return keys


class FedPer(Personalizer):
    """Keep the layers whose names start with one of ``head`` (e.g. ``("fc2",)``) on the device."""

    name = "fedper"

    def __init__(self, *, head: Sequence[str] = ("fc2",)) -> None:
        if isinstance(head, str) or not head or not all(isinstance(h, str) and h for h in head):
            raise ConfigError(f"head must be a non-empty list of layer-name prefixes. Found {head!r}")
        self.head = tuple(head)

    def local_keys(self, model: nn.Module) -> frozenset[str]:
        keys = frozenset(
            k for k in model.state_dict() if any(k == h or k.startswith(h + ".") for h in self.head)
        )
        if not keys:
            raise ConfigError(f"FedPer head {list(self.head)} matches no tensor of the model")
        return _leaves_something_shared(model, keys, f"FedPer head {list(self.head)}")


NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class FedBN(Personalizer):
    """Keep every batch-norm layer (weights, biases, running statistics) on the device.

    A model without batch-norm layers has nothing to keep local, and FedBN is then plain FedAvg; that is
    refused with :class:`ConfigError` rather than run silently.
    """

    name = "fedbn"

    def local_keys(self, model: nn.Module) -> frozenset[str]:
        keys = set()
        for mname, module in model.named_modules():
            if isinstance(module, NORM_TYPES):
                keys |= {f"{mname}.{k}" if mname else k for k in module.state_dict()}
        if not keys:
            raise ConfigError("FedBN needs a model with batch-norm layers; this model has none")
        return _leaves_something_shared(model, frozenset(keys), "FedBN")
