"""The named choices of a run's config sections: one registry per choice, readable without importing torch.

Each registry (:class:`Choices`) maps a name to a one-line summary and, where the name stands for code, the
import path of what implements it (loaded only when used, so ``deltaplane --help`` lists the names without
pulling in torch). The config (:class:`~deltaplane.engine.RunConfig`), the CLI's help texts and choices, and the
implementations' own tables (``deltaplane.aggregation.SERVER_OPTIMIZERS``,
``deltaplane.personalization.PERSONALIZERS``) all read these, so a name is listed in one place. An unknown
name is one line naming the known ones (:meth:`Choices.check`).

Choices with their own spec grammar keep their registries next to their code and give the same kind of
error: codecs (``deltaplane.codecs.available_codecs``), defences (``deltaplane.aggregation.DEFENSES``) and
attacks (``deltaplane.engine.attacks.ATTACKS``).

:data:`DEFAULT_ROUNDS`, :data:`DEFAULT_ALPHA`, :data:`DEFAULT_SEED` and :data:`DEFAULT_TASK` are here for the same reason: the config's
defaults, which help texts show without importing the config (and torch with it).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from deltaplane.errors import ConfigError

__all__ = [
    "AGGREGATORS",
    "DEFAULT_ALPHA",
    "DEFAULT_ROUNDS",
    "DEFAULT_SEED",
    "DEFAULT_TASK",
    "ENGINES",
    "PERSONALIZATIONS",
    "TASKS",
    "TRANSPORTS",
    "Choice",
    "Choices",
]

#: :class:`~deltaplane.engine.RunConfig`'s ``rounds`` when a config names none (YAML ``clients.rounds``); the
#: help of ``deltaplane run --rounds`` and ``fleet coordinate --rounds`` shows it
DEFAULT_ROUNDS = 120
#: ``RunConfig.alpha`` (the Dirichlet label skew) when a config names none; ``deltaplane run --alpha``'s help shows it
DEFAULT_ALPHA = 0.5
#: ``RunConfig.seed`` when a config names none; ``deltaplane run --seed``'s help shows it
DEFAULT_SEED = 0
#: The task a run federates unless told otherwise (the built-in ``digits``), as the import path a config holds
DEFAULT_TASK = "deltaplane.apps.digits:make_task"


@dataclass(frozen=True)
class Choice:
    """One registered name: what it means, and (``"module:attribute"``) what implements it, if anything."""

    summary: str
    target: str | None = None


class Choices(Mapping[str, Choice]):
    """A registry of the names one config choice accepts (``kind`` names the choice in messages)."""

    def __init__(self, kind: str, entries: Mapping[str, Choice]) -> None:
        self.kind = kind
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> Choice:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, name: Any) -> str:
        """``name`` if it is registered; else :class:`~deltaplane.errors.ConfigError` listing the known names."""
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        return name

    def load(self, name: str) -> Any:
        """What implements ``name`` (imported now), or None for a name without code of its own."""
        target = self._entries[self.check(name)].target
        if target is None:
            return None
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def names(self, *, sep: str = ", ") -> str:
        """The names in registration order, e.g. for a help text."""
        return sep.join(self._entries)


#: ``engine``: which driver runs the rounds (``--engine``, ``engine.name``).
ENGINES = Choices(
    "engine",
    {
        "sequential": Choice(
            "trains a round's clients one after another (bit for bit what HTTP and Flower compute)"
        ),
        "batched": Choice("trains a round's clients at once (equal up to float32 rounding)"),
        "population": Choice("builds sampled devices lazily from a fleet of `clients` (10,000+)"),
        "flower": Choice("runs on Flower's simulation engine (needs the 'flower' extra)"),
    },
)
#: ``transport``: how the messages travel (``--transport``, ``engine.transport``).
TRANSPORTS = Choices(
    "transport",
    {
        "inproc": Choice("messages are function calls"),
        "http": Choice("devices talk to a real local deltaplane serve over loopback"),
    },
)
#: ``aggregation.optimizer``: the server optimizer (``--aggregator``); FedAvg is server SGD with ``server_lr``.
AGGREGATORS = Choices(
    "aggregator",
    {
        "fedavg": Choice("FedAvg: the weighted mean, applied with server_lr (server SGD)"),
        "fedadam": Choice("FedAdam (Reddi et al. 2021)", "deltaplane.aggregation.fedopt:FedAdam"),
        "fedyogi": Choice("FedYogi (Reddi et al. 2021)", "deltaplane.aggregation.fedopt:FedYogi"),
        "fedadagrad": Choice("FedAdagrad (Reddi et al. 2021)", "deltaplane.aggregation.fedopt:FedAdagrad"),
        "fedavgm": Choice(
            "FedAvg with server momentum (Hsu et al. 2019)", "deltaplane.aggregation.fedopt:FedAvgM"
        ),
    },
)
#: ``personalization.method``: what each device keeps for itself (``--personalization``).
PERSONALIZATIONS = Choices(
    "personalization",
    {
        "none": Choice("every device uses the global model", "deltaplane.personalization.base:Personalizer"),
        "alpha_mix": Choice(
            "global + α·personal delta, α chosen on local validation",
            "deltaplane.personalization.alpha_mix:AlphaMix",
        ),
        "fedper": Choice("the head layers stay on the device", "deltaplane.personalization.partial:FedPer"),
        "fedbn": Choice("batch-norm layers stay on the device", "deltaplane.personalization.partial:FedBN"),
        "ditto": Choice("a proximally regularised personal model", "deltaplane.personalization.ditto:Ditto"),
    },
)
#: ``task.path``: the built-in tasks by short name (any ``package.module:factory`` import path works too).
TASKS = Choices(
    "task",
    {
        "digits": Choice("8×8 handwritten digits, a small CNN, non-IID clients", DEFAULT_TASK),
        "charlm": Choice(
            "next character of the standard library's own source, split by module",
            "deltaplane.apps.charlm:make_task",
        ),
        "docstrings": Choice(
            "federated LoRA on MiniLM over the standard library's docstrings",
            "deltaplane.apps.docstrings:make_task",
        ),
    },
)
