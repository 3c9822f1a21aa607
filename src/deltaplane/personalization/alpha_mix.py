"""α-mix: the device keeps a personal delta and serves ``global + α·personal`` with α picked on its own data.

Each round, after the new global model arrives, the device continues training its personal model
(``global + personal_delta``) for a few local epochs, stores the new ``personal_delta = trained − global`` and
chooses α from a grid by accuracy on its local validation split (ties broken by validation cross-entropy). α = 0
(the plain global model) is always a candidate, so the choice moves away from the global model only when local
validation says the personal delta helps. This is the adaptive interpolation of APFL (Deng et al. 2020, "Adaptive Personalized
Federated Learning", https://arxiv.org/abs/2003.13461) done in weight space, with α selected rather than learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deltaplane.delta import Delta, StateDict
from deltaplane.errors import ConfigError
from deltaplane.personalization.base import Personalizer, PersonalState
from deltaplane.personalization.training import as_xy, train_sgd

__all__ = ["AlphaMix", "choose_alpha"]

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def choose_alpha(
    model: nn.Module,
    global_state: StateDict,
    personal_delta: Delta,
    val: Any,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> tuple[float, dict[float, float]]:
    """The α in ``alphas`` whose ``global + α·personal`` is most accurate on ``val``.

    A device's validation split is small (a dozen examples), so accuracies often tie; ties are broken by the
    lower validation cross-entropy, which still moves with α, and a remaining tie goes to the smaller α.

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
    return min(keys, key=keys.__getitem__), scores


class AlphaMix(Personalizer):
    """Personal delta fine-tuned locally each round; the device serves ``global + α·personal``.

    Args:
        epochs: local epochs of personal fine-tuning per round.
        lr: fine-tuning learning rate.
        batch_size: fine-tuning mini-batch size.
        alphas: candidate mixing weights; must include 0 so the device can always fall back to global.
    """

    name = "alpha_mix"

    def __init__(
        self,
        *,
        epochs: int = 2,
        lr: float = 0.05,
        batch_size: int = 32,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
    ) -> None:
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1. Found {epochs}")
        if lr <= 0:
            raise ConfigError(f"lr must be positive. Found {lr}")
        if 0.0 not in alphas or any(a < 0 for a in alphas):
            raise ConfigError(f"alphas must be non-negative and include 0.0. Found {list(alphas)}")
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.alphas = tuple(alphas)

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
        start = (
            state.personal_delta.apply(global_state)
            if state.personal_delta is not None
            else dict(global_state)
        )
        trained = train_sgd(
            model,
            start,
            train,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            generator=generator,
        )
        state.personal_delta = Delta.between(global_state, trained)
        state.alpha, scores = choose_alpha(model, global_state, state.personal_delta, val, self.alphas)
        state.history.append({"alpha": state.alpha, "val_accuracy": scores})

    def personal_state(self, global_state: StateDict, state: PersonalState) -> dict:
        if state.personal_delta is None or state.alpha == 0:
            return dict(global_state)
        return state.personal_delta.apply(global_state, scale=state.alpha)
