"""Poisoning attacks are a client-step stage of the engine (:mod:`deltaplane.engine.attacks`); re-exported."""

from deltaplane.engine import attacks as _attacks
from deltaplane.engine.attacks import *  # noqa: F403 (the engine module's public names, all of them)

__all__ = list(_attacks.__all__)
