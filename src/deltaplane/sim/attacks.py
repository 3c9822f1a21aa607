"""Poisoning attacks are a client-step stage of the engine (:mod:`deltaplane.engine.attacks`); re-exported."""

from deltaplane.engine.attacks import (
    ATTACKS,
    Attack,
    Backdoor,
    BoundedBackdoor,
    DistributedBackdoor,
    GaussianNoise,
    LabelFlip,
    ModelReplacement,
    SignFlip,
    add_trigger,
    choose_malicious,
    malicious_count,
    parse_attack,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "Backdoor",
    "BoundedBackdoor",
    "DistributedBackdoor",
    "GaussianNoise",
    "LabelFlip",
    "ModelReplacement",
    "SignFlip",
    "add_trigger",
    "choose_malicious",
    "malicious_count",
    "parse_attack",
]
