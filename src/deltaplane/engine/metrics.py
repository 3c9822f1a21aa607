"""How a round is scored: one set of functions for every driver, so their figures are computed alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.data.dataset import Dataset
from deltaplane.engine.task import Loss
from deltaplane.errors import ConfigError

__all__ = [
    "TEST_LOSS",
    "accuracy",
    "accuracy_and_loss",
    "class_accuracy_stacked",
    "evaluate_clients",
    "label_mix_accuracy",
    "logits",
    "round_scores",
    "score_round",
]


#: The key under which :func:`score_round`, :func:`round_scores` and :func:`accuracy_and_loss` (given a ``loss``) return the task's loss of the global model on the
#: test set, from the logits its test accuracy is computed from: for a driver's divergence watch
#: (:meth:`~deltaplane.engine.divergence.DivergenceWatch.check_loss`), which would otherwise run a forward pass
#: of its own. No round metric: the driver takes it out of the scores before it records them.
TEST_LOSS = "watched_test_loss"

#: :func:`logits` cuts a scoring batch into at most this many stacked copies of the model, of at least
#: :data:`_SCORE_ROWS` samples each
_SCORE_COPIES, _SCORE_ROWS = 4, 16


@torch.no_grad()
def logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` for scoring: a model with ``forward_stacked`` (DigitsCNN) runs it on stacked copies of
    itself, which gives the same logits up to float rounding about 2.5× faster on CPU (channels-last
    convolutions).

    The samples are cut into up to four equal parts, one per copy (the last padded with zero samples, whose
    logits are dropped): oneDNN runs DigitsCNN's second convolution about twice as fast as four groups of
    90 samples as one convolution of 359 (8 input channels per group either way), so scoring the digits test
    set took 0.70 instead of 1.05 ms (one thread; the logits came out bit for bit the same)."""
    stacked = getattr(model, "forward_stacked", None)
    if callable(stacked):
        n = x.shape[0]
        k = max(1, min(_SCORE_COPIES, n // _SCORE_ROWS))
        rows = -(-n // k)
        if rows * k > n:
            x = torch.cat([x, x.new_zeros(rows * k - n, *x.shape[1:])])
        # real copies, not an expand()ed view: a model's forward_stacked may view() its stacked weights
        params = {name: p.detach().expand(k, *p.shape).contiguous() for name, p in model.named_parameters()}
        return stacked(params, x.reshape(k, rows, *x.shape[1:])).flatten(0, 1)[:n]
    return model(x)


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset) -> float:
    """Share of ``data`` that ``model`` classifies correctly (0.0 for an empty set)."""
    if len(data) == 0:
        return 0.0
    model.eval()
    return _share_right(logits(model, data.x), data.y)


def _share_right(out: Tensor, y: Tensor) -> float:
    """The share of rows of logits ``out`` whose best class is ``y``'s."""
    return float((out.argmax(dim=1) == y).float().mean())


@torch.no_grad()
def evaluate_clients(model: nn.Module, clients: Sequence[Any]) -> list[float]:
    """Accuracy of ``model`` on each device's held-out data (a client's ``holdout``, or a :class:`Dataset`),
    in one forward pass over all of them.

    Each device would score only its own data; the simulator scores them all every round, and one batched
    pass costs about what a single device's pass costs. Every driver calls this, so their per-client figures
    stay identical.
    """
    holdouts = [getattr(c, "holdout", c) for c in clients]
    sizes = [len(h) for h in holdouts]
    if not any(sizes):
        return [0.0] * len(holdouts)
    model.eval()
    x = torch.cat([h.x for h in holdouts])
    y = torch.cat([h.y for h in holdouts])
    correct = (logits(model, x).argmax(dim=1) == y).float()
    return [float(part.mean()) if len(part) else 0.0 for part in correct.split(sizes)]


#: the per-client fields of :func:`round_scores`
_CLIENT_FIELDS = (
    "client_accuracy_mean",
    "client_accuracy_min",
    "client_accuracy_p10",
    "client_accuracy_median",
    "client_accuracy_p90",
    "client_accuracy_max",
)


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, data: Dataset, loss: Loss) -> dict[str, float]:
    """:func:`accuracy` (the same bits) under ``test_accuracy`` and, under :data:`TEST_LOSS`, ``loss`` of the
    same logits (NaN for an empty set): one forward pass for a driver that scores the global model on its test
    set anyway and hands its divergence watch the loss."""
    if len(data) == 0:
        return {"test_accuracy": 0.0, TEST_LOSS: float("nan")}
    model.eval()
    out = logits(model, data.x)
    return {
        "test_accuracy": _share_right(out, data.y),
        TEST_LOSS: float(loss(out, data.y)),
    }


def round_scores(
    model: nn.Module, test: Dataset, client_acc: list[float], *, loss: Loss | None = None
) -> dict[str, float]:
    """The accuracy fields of a round's metrics: ``model`` on the test set, and the mean, worst, quantiles
    (10%, median, 90%) and best of the per-client accuracies (:func:`evaluate_clients`); with ``loss`` (the
    task's), also the test loss under :data:`TEST_LOSS`, from the same logits.

    With no client accuracies (a driver that scores the round's sampled devices, in a Poisson-sampled round
    that sampled nobody) the client figures are NaN: there is no device to score, and no value would be
    honest (a report writes NaN as null)."""
    tested = (
        {"test_accuracy": accuracy(model, test)} if loss is None else accuracy_and_loss(model, test, loss)
    )
    if not client_acc:
        nan = float("nan")
        return tested | dict.fromkeys(_CLIENT_FIELDS, nan)
    return tested | {
        "client_accuracy_mean": float(np.mean(client_acc)),
        "client_accuracy_min": float(np.min(client_acc)),
        # the spread across devices, not only its mean and worst (the dashboard draws p10-p90 as a band)
        "client_accuracy_p10": float(np.quantile(client_acc, 0.1)),
        "client_accuracy_median": float(np.median(client_acc)),
        "client_accuracy_p90": float(np.quantile(client_acc, 0.9)),
        "client_accuracy_max": float(np.max(client_acc)),
    }


def score_round(
    model: nn.Module,
    state: dict[str, Tensor],
    test: Dataset,
    clients: Sequence[Any],
    *,
    loss: Loss | None = None,
) -> dict[str, float]:
    """:func:`round_scores` of the global model ``state`` (loaded into ``model``), with every device's held-out
    data scored by :func:`evaluate_clients`: for a driver that needs the per-device accuracies for nothing
    else (the in-process simulator; its forked worker, :mod:`deltaplane.sim.worker_scoring`). With ``loss``,
    also the test loss under :data:`TEST_LOSS` (for the driver's divergence watch, not a metric)."""
    model.load_state_dict(state)
    return round_scores(model, test, evaluate_clients(model, clients), loss=loss)


@torch.no_grad()
def class_accuracy(
    model: nn.Module, state: Mapping[str, Tensor], test: Dataset, num_classes: int
) -> np.ndarray:
    """Per-class accuracy of ``state`` on ``test`` (0 for a class it lacks): what :func:`label_mix_accuracy`
    weights, computed once where many devices' label mixes score one model."""
    model.load_state_dict(state)
    model.eval()
    return _per_class(model(test.x).argmax(1), test.y, num_classes)


def _per_class(pred: Tensor, y: Tensor, num_classes: int) -> np.ndarray:
    """Per-class accuracy of predictions ``pred`` on labels ``y`` (0 for a class ``y`` lacks).

    Counted with two ``bincount`` calls instead of a masked mean per class (ten boolean masks and ten
    synchronising ``float()`` calls, 0.4 ms a model: a personalized run scores 21 models a round). The same
    bits: a float32 mean of ``k`` ones among ``n`` values is the float32 quotient ``k / n`` (the sum of ones
    is exact), which is what is computed here, then widened to float64 as ``float()`` widened it."""
    y = y.reshape(-1)
    pred = pred.reshape(-1)
    ours = (y >= 0) & (y < num_classes)  # a label outside the classes scored counts for none of them
    seen = torch.bincount(y[ours], minlength=num_classes)
    right = torch.bincount(y[ours & (pred == y)], minlength=num_classes)
    return (right.float() / seen.clamp(min=1).float()).double().numpy()


#: :func:`class_accuracy_stacked` scores at most this many (model, sample) rows in one stacked pass by default
_STACKED_SCORE_SAMPLES = 4096


@torch.no_grad()
def class_accuracy_stacked(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    test: Dataset,
    num_classes: int,
    *,
    copies: int | None = None,
) -> list[np.ndarray]:
    """:func:`class_accuracy` of each of ``states`` with the model's ``forward_stacked``: ``copies`` models
    (the last pass the rest) on the test set in one pass (the batched engine scores its devices' personal models so). The same
    per-class accuracies as one model at a time up to the float rounding of the stacked pass, which could only
    tip a prediction whose two best logits tie to within it.

    ``copies=None`` takes as many models a pass as keep it within :data:`_STACKED_SCORE_SAMPLES` (model,
    sample) rows, and spreads the models evenly over the passes: 20 DigitsCNN models on the 359-sample test
    set took 1.3-1.6× as long in passes of 16 and 4 (a pass of 16: 5,744 rows, 23 MB of activations after
    the second convolution) as in two passes of 10 (one thread; each model's logits bit for bit the same
    either way: a copy's computation does not depend on the others stacked beside it).

    Raises:
        ConfigError: the model has no ``forward_stacked``.
    """
    forward = getattr(model, "forward_stacked", None)
    if not callable(forward):
        raise ConfigError(f"model {type(model).__name__} has no forward_stacked to score models stacked")
    model.eval()
    names = [k for k, _ in model.named_parameters()]
    if copies is None:
        most = max(1, _STACKED_SCORE_SAMPLES // max(1, len(test)))
        passes = -(-len(states) // most)
        copies = max(1, -(-len(states) // max(1, passes)))  # as few passes as fit, evenly filled
    if copies < 1:
        raise ConfigError(f"copies must be at least 1. Found {copies}")
    out: list[np.ndarray] = []
    for first in range(0, len(states), copies):
        part = states[first : first + copies]
        params = {k: torch.stack([s[k].detach() for s in part]) for k in names}
        pred = forward(params, test.x.expand(len(part), *test.x.shape)).argmax(-1)  # (K, N)
        out.extend(_per_class(row, test.y, num_classes) for row in pred)
    return out


def label_mix(per_class: np.ndarray, train: Dataset, num_classes: int) -> float:
    """``per_class`` accuracies weighted by the class shares of a device's training data ``train``."""
    shares = train.class_counts(num_classes)[:num_classes] / max(1, len(train))
    return float(shares @ per_class)


def label_mix_accuracy(
    model: nn.Module, state: dict[str, Tensor], test: Dataset, train: Dataset, num_classes: int
) -> float:
    """Accuracy of ``state`` on a device's own label mix: per-class accuracy on the global test set weighted by
    the class shares of its training data ``train``. Scores a device on what it will see, with the whole test
    set rather than the dozen samples it holds out (which personalization already uses to choose α)."""
    return label_mix(class_accuracy(model, state, test, num_classes), train, num_classes)
