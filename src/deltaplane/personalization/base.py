"""The personalization protocol: what a device keeps, what it shares, and which model it finally uses.

A federated round with personalization, as the simulator drives it for each device::

    start = p.start_state(global_state, state)          # what local training starts from
    trained = <local training of the global objective>
    p.keep_local(trained, state)                        # tensors that never leave the device
    upload = p.shared(Delta.between(start, trained))    # what goes to the server (local keys removed)
    ...server aggregates and sends a new global...
    p.personalize(model, new_global, state, train, val, generator=g)   # per-device adaptation
    personal = p.personal_state(new_global, state)      # the model the device serves

Per-device learned state (personal delta and α, local layers, Ditto's personal model) lives in a
:class:`PersonalState` owned by the device, never in the personalizer, which holds only hyperparameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltaplane.delta import Delta, StateDict

__all__ = ["PersonalState", "Personalizer", "TrainMany"]

#: Trains many devices' personal models at once, as :func:`~deltaplane.personalization.train_sgd` trains each:
#: ``train_many(starts, datasets, generators, *, epochs, batch_size, lr, momentum, prox_center, prox_lambda,
#: loss)`` returns the trained parameters, one dict per device (the simulator's batched engine passes
#: ``BatchedTrainer.train_from``).
TrainMany = Callable[..., list[dict[str, Tensor]]]


@dataclass
class PersonalState:
    """Everything personal a device keeps between rounds.

    Attributes:
        local: tensors that are never aggregated (FedPer's head, FedBN's norm layers), by name.
        personal_delta: the device's own change on top of the global model (α-mix).
        alpha: the mixing weight chosen on local validation (α-mix): the device uses ``global + α·personal``.
        personal_model: Ditto's personal model ``v_k``.
        history: measurements per round (validation accuracies of the candidates, chosen α...).
    """

    local: dict[str, Tensor] = field(default_factory=dict)
    personal_delta: Delta | None = None
    alpha: float = 0.0
    personal_model: dict[str, Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Personalizer:
    """Base class: no personalization (every hook is the identity). Subclasses override what they change."""

    name = "none"

    def local_keys(self, model: nn.Module) -> frozenset[str]:
        """State-dict names that stay on the device and are never aggregated."""
        return frozenset()

    def start_state(self, global_state: StateDict, state: PersonalState) -> dict[str, Tensor]:
        """The state local training starts from: the global model with the device's local tensors."""
        return {**global_state, **state.local}

    def keep_local(self, trained: StateDict, state: PersonalState, model: nn.Module) -> None:
        """Store the device's local tensors from its freshly trained state."""
        keys = self.local_keys(model)
        state.local = {k: trained[k].detach().clone() for k in trained if k in keys}

    def shared(self, delta: Delta, model: nn.Module) -> Delta:
        """The part of ``delta`` sent to the server (local tensors removed)."""
        keys = self.local_keys(model)
        return Delta({k: v for k, v in delta.items() if k not in keys}) if keys else delta

    def personalize(
        self,
        model: nn.Module,
        global_state: StateDict,
        state: PersonalState,
        train: Any,
        val: Any,
        *,
        generator: torch.Generator,
    ) -> None:
        """Adapt the device's personal state to a new global model (α-mix fine-tunes, Ditto trains ``v_k``).

        FedPer and FedBN train their local layers in the round's local training (:meth:`keep_local`), so here
        they only check the model: :meth:`local_keys` refuses one without such layers. Called on its own
        (outside a federation) it returned silently and :meth:`personal_state` served the global model."""
        self.local_keys(model)

    def personalize_many(
        self,
        model: nn.Module,
        global_state: StateDict,
        states: Sequence[PersonalState],
        trains: Sequence[Any],
        vals: Sequence[Any],
        *,
        generators: Sequence[torch.Generator],
        train_many: TrainMany | None = None,
    ) -> None:
        """:meth:`personalize` for many devices; a personalizer that trains (α-mix, Ditto) trains them all in
        one ``train_many`` call where one is given, with the same result up to float rounding. This default
        adapts one device after another."""
        for state, train, val, g in zip(states, trains, vals, generators, strict=True):
            self.personalize(model, global_state, state, train, val, generator=g)

    def personal_state(self, global_state: StateDict, state: PersonalState) -> dict[str, Tensor]:
        """The model the device uses after this round."""
        return self.start_state(global_state, state)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"
