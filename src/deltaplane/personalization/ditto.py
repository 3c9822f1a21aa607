"""Ditto: each device trains a personal model regularised toward the global one.

Li, Hu, Beirami & Smith 2021, "Ditto: Fair and Robust Federated Learning Through Personalization",
https://arxiv.org/abs/2012.04221, Algorithm 1: alongside the usual federated training of the global ``w``, device
``k`` keeps ``v_k`` and takes local steps on ``F_k(v_k) + λ/2 ‖v_k − w‖²``. λ trades personal fit (λ → 0, local
training) against the global model (λ → ∞).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deltaplane.delta import StateDict
from deltaplane.errors import ConfigError
from deltaplane.personalization.base import Personalizer, PersonalState, TrainMany
from deltaplane.personalization.training import PERSONAL_MOMENTUM, check_training_options, train_sgd

__all__ = ["Ditto"]


class Ditto(Personalizer):
    """Personal model ``v_k`` trained with the proximal term ``λ/2 ‖v_k − w_global‖²``.

    Args:
        lam: λ, the strength of the pull toward the global model.
        epochs: local epochs on ``v_k`` per round.
        lr: learning rate for ``v_k``.
        batch_size: mini-batch size.
    """

    name = "ditto"

    def __init__(self, *, lam: float = 0.1, epochs: int = 2, lr: float = 0.05, batch_size: int = 32) -> None:
        # λ = ∞ is the global model itself, and its gradient overflows: say so instead of training to NaN
        if isinstance(lam, bool) or not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"lam must be non-negative and finite. Found {lam!r}")
        check_training_options(epochs=epochs, lr=lr, batch_size=batch_size)
        self.lam = lam
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

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
        state.personal_model = train_sgd(
            model,
            self._start(global_state, state),
            train,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            momentum=PERSONAL_MOMENTUM,
            generator=generator,
            prox_center=global_state,
            prox_lambda=self.lam,
        )

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
        """Every device's ``v_k`` trained in one ``train_many`` call, each from its own ``v_k`` and pulled
        toward the new global model; one device after another without it."""
        if train_many is None:
            super().personalize_many(model, global_state, states, trains, vals, generators=generators)
            return
        trained = train_many(
            [self._start(global_state, s) for s in states],
            trains,
            generators,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=PERSONAL_MOMENTUM,
            prox_center=global_state,
            prox_lambda=self.lam,
            loss=nn.functional.cross_entropy,
        )
        for state, weights in zip(states, trained, strict=True):
            state.personal_model = weights

    @staticmethod
    def _start(global_state: StateDict, state: PersonalState) -> StateDict:
        """Where ``v_k``'s training starts: the device's own ``v_k``, or the global model the first time."""
        return state.personal_model if state.personal_model is not None else dict(global_state)

    def personal_state(self, global_state: StateDict, state: PersonalState) -> dict:
        return dict(state.personal_model) if state.personal_model is not None else dict(global_state)
