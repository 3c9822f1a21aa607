"""α-mix: the device keeps a personal delta and serves ``global + α·personal`` with α picked on its own data.

Each round, after the new global model arrives, the device continues training its personal model
(``global + personal_delta``) for a few local epochs, stores the new ``personal_delta = trained − global`` and
chooses α from a grid on its local validation split. α = 0 (the plain global model) is always a candidate, and the
choice is cautious because that split is tiny (a dozen examples): the device moves to the most accurate α only when
it is *strictly* more accurate than the global model; when validation accuracy cannot tell them apart, it takes
at most a small step, ``α ≤ tie_alpha_max`` (0.25), chosen by validation cross-entropy. On the simulator's default
federation (``benchmarks/personalization.py``) the plain arg-max over the grid gained +1.11 points on average but
left two clients 1.75 points worse; never moving on a tie gained only +0.24; the capped step gains +1.39 with no
client worse by more than 0.66 (cap 0.5: +1.49 but one client −1.18). The cap was chosen by that comparison. This is the adaptive interpolation of APFL (Deng et al. 2020, "Adaptive Personalized
Federated Learning", https://arxiv.org/abs/2003.13461) done in weight space, with α selected rather than learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deltaplane.delta import Delta, StateDict
from deltaplane.errors import ConfigError
from deltaplane.personalization.base import Personalizer, PersonalState, TrainMany
from deltaplane.personalization.training import PERSONAL_MOMENTUM, as_xy, check_training_options, train_sgd

__all__ = ["AlphaMix", "choose_alpha"]

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def choose_alpha(
    model: nn.Module,
    global_state: StateDict,
    personal_delta: Delta,
    val: Any,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    tie_alpha_max: float = 0.25,
) -> tuple[float, dict[float, float]]:
    """The α in ``alphas`` for serving ``global + α·personal``, chosen cautiously on ``val``.

    If some α is strictly more accurate on ``val`` than α = 0 (the global model), the most accurate one is taken
    (ties broken by lower validation cross-entropy, then smaller α). Otherwise the small validation split cannot
    tell the personal delta from noise, and the choice is limited to ``α ≤ tie_alpha_max`` with at least the global
    model's accuracy, by lowest cross-entropy (then smaller α); ``tie_alpha_max=0`` keeps the global model.

    Returns:
        ``(alpha, {alpha: validation accuracy})``.
    """
    x, y = as_xy(val)
    scores: dict[float, float] = {}
    keys: dict[float, tuple[float, float, float]] = {}
    with torch.no_grad():
        for a in sorted(alphas):
            model.load_state_dict(personal_delta.apply(global_state, scale=a))
            model.eval()
            logits = model(x)
            acc = float((logits.argmax(1) == y).float().mean()) if x.shape[0] else 0.0
            nll = float(nn.functional.cross_entropy(logits, y)) if x.shape[0] else 0.0
            scores[a] = acc
            keys[a] = (-acc, nll, a)
    acc0 = scores[0.0] if 0.0 in scores else max(scores.values())
    better = [a for a in keys if scores[a] > acc0]
    if better:
        return min(better, key=keys.__getitem__), scores
    small = [a for a in keys if a <= tie_alpha_max and scores[a] >= acc0] or [min(keys)]
    return min(small, key=lambda a: keys[a][1:]), scores


class AlphaMix(Personalizer):
    """Personal delta fine-tuned locally each round; the device serves ``global + α·personal``.

    Args:
        epochs: local epochs of personal fine-tuning per round.
        lr: fine-tuning learning rate.
        batch_size: fine-tuning mini-batch size.
        alphas: candidate mixing weights in [0, 1]; must include 0 so the device can always fall back to global.
        tie_alpha_max: the largest α taken when no candidate is strictly more accurate on local validation than
            the global model (see :func:`choose_alpha`).
    """

    name = "alpha_mix"

    def __init__(
        self,
        *,
        epochs: int = 2,
        lr: float = 0.05,
        batch_size: int = 32,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        tie_alpha_max: float = 0.25,
    ) -> None:
        check_training_options(epochs=epochs, lr=lr, batch_size=batch_size)
        # APFL's mix α·v + (1 − α)·w = w + α(v − w) interpolates for α in [0, 1]; α > 1 extrapolates past the
        # personal model (it was accepted), and a NaN α was never served but was scored
        if 0.0 not in alphas or not all(isinstance(a, int | float) and 0.0 <= a <= 1.0 for a in alphas):
            raise ConfigError(f"alphas must lie in [0, 1] and include 0.0. Found {list(alphas)}")
        if not 0 <= tie_alpha_max <= 1:
            raise ConfigError(f"tie_alpha_max must be in [0, 1]. Found {tie_alpha_max}")
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.alphas = tuple(alphas)
        self.tie_alpha_max = tie_alpha_max

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
        trained = train_sgd(
            model,
            self._start(global_state, state),
            train,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            momentum=PERSONAL_MOMENTUM,
            generator=generator,
        )
        self._choose(model, global_state, state, trained, val)

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
        """Every device's fine-tuning in one ``train_many`` call (each from its own ``global + personal``),
        then each one's α chosen on its own validation split; one device after another without it."""
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
            loss=nn.functional.cross_entropy,
        )
        for state, weights, val in zip(states, trained, vals, strict=True):
            self._choose(model, global_state, state, weights, val)

    @staticmethod
    def _start(global_state: StateDict, state: PersonalState) -> StateDict:
        """Where this round's fine-tuning starts: last round's personal delta on the new global model."""
        return (
            state.personal_delta.apply(global_state)
            if state.personal_delta is not None
            else dict(global_state)
        )

    def _choose(
        self, model: nn.Module, global_state: StateDict, state: PersonalState, trained: StateDict, val: Any
    ) -> None:
        """Keep ``trained − global`` as the personal delta and choose α on ``val``."""
        state.personal_delta = Delta.between(global_state, trained)
        state.alpha, scores = choose_alpha(
            model, global_state, state.personal_delta, val, self.alphas, tie_alpha_max=self.tie_alpha_max
        )
        state.history.append({"alpha": state.alpha, "val_accuracy": scores})

    def personal_state(self, global_state: StateDict, state: PersonalState) -> dict:
        if state.personal_delta is None or state.alpha == 0:
            return dict(global_state)
        return state.personal_delta.apply(global_state, scale=state.alpha)
