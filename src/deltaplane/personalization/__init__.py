"""Personalization: each device keeps its own state and serves a model adapted to its data.

:class:`AlphaMix` (``global + α·personal delta``, α chosen on local validation), :class:`FedPer` (personal
head), :class:`FedBN` (local batch-norm), :class:`Ditto` (proximally regularised personal model). Each is a
:class:`Personalizer` (hyperparameters only) acting on a device-owned :class:`PersonalState`.
"""

from deltaplane.choices import PERSONALIZATIONS
from deltaplane.errors import ConfigError
from deltaplane.personalization.alpha_mix import AlphaMix, choose_alpha
from deltaplane.personalization.base import Personalizer, PersonalState, TrainMany
from deltaplane.personalization.ditto import Ditto
from deltaplane.personalization.partial import FedBN, FedPer
from deltaplane.personalization.training import accuracy, train_sgd

__all__ = [
    "PERSONALIZERS",
    "AlphaMix",
    "Ditto",
    "FedBN",
    "FedPer",
    "PersonalState",
    "Personalizer",
    "TrainMany",
    "accuracy",
    "choose_alpha",
    "get_personalizer",
    "train_sgd",
]

#: name -> class, from the one registry of names (:data:`deltaplane.choices.PERSONALIZATIONS`)
PERSONALIZERS: dict[str, type[Personalizer]] = {
    name: PERSONALIZATIONS.load(name) for name in PERSONALIZATIONS
}


def get_personalizer(name: str, **params: object) -> Personalizer:
    """Build a personalizer by name (``"alpha_mix"``, ``"fedper"``, ``"fedbn"``, ``"ditto"``, ``"none"``)."""
    if name not in PERSONALIZERS:
        raise ConfigError(f"unknown personalization '{name}'. Known: {', '.join(PERSONALIZERS)}")
    try:
        return PERSONALIZERS[name](**params)
    except TypeError as exc:
        raise ConfigError(f"personalization '{name}': {exc}") from None
