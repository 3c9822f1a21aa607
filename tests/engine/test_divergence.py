"""A diverging run says so in the round it diverges, on every driver; a healthy run says nothing."""

from __future__ import annotations

import math
import warnings

import pytest

from deltaplane.apps.runner import run_federation
from deltaplane.engine import RunConfig
from deltaplane.errors import InvalidUpdate


def _divergence_warnings(cfg: RunConfig) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_federation(cfg)
    assert len(result.rounds) == cfg.rounds  # a warning, not a stop: the run's figures are as they were
    return [str(w.message) for w in caught if w.category.__name__ == "DivergenceWarning"]


@pytest.mark.parametrize(
    ("driver", "lr"),
    [
        ({}, 0.05),
        ({"engine": "batched"}, 0.05),
        ({"transport": "http"}, 0.05),
        ({"engine": "population"}, 0.2),
    ],
    ids=["sequential", "batched", "http", "population"],
)
def test_a_run_whose_loss_rises_above_the_initial_is_called_diverged_in_round_one(
    diverging_task, driver, lr
) -> None:
    """Round 1's accuracy does not tell a diverged model from a slow start (the population engine's at the
    default lr 0.2: 0.52, about chance, with a test loss 10²⁰ times the untrained model's); its loss does. The
    warning names the round, the loss against the initial one, and the fix (a smaller lr)."""
    cfg = RunConfig(task=diverging_task, clients=2, rounds=1, lr=lr, codec="identity", **driver)
    said = _divergence_warnings(cfg)
    assert len(said) == 1
    assert said[0].startswith("round 1: the global model's test loss rose to ")
    assert "× the initial model's" in said[0] and f"Try a smaller learning rate (now {lr:g}" in said[0]


def test_a_healthy_run_gives_no_divergence_warning(diverging_task) -> None:
    cfg = RunConfig(
        task=diverging_task, task_options={"scale": 1.0}, clients=2, rounds=3, lr=0.05, codec="identity"
    )
    assert _divergence_warnings(cfg) == []


def test_the_watch_measures_the_tasks_loss_independently(diverging_task) -> None:
    """The watch's initial loss is the task's loss of the untrained model on the test set, as plain torch gives."""
    import torch

    from deltaplane.engine import make_task
    from deltaplane.engine.divergence import DivergenceWatch
    from deltaplane.engine.seeding import Stream, derive_seed

    cfg = RunConfig(task=diverging_task, clients=2)
    task = make_task(cfg)
    model = task.build_model(derive_seed(cfg.seed, Stream.MODEL_INIT))
    with torch.no_grad():
        d = model(task.test.x)
        expected = float(((d[:, 1] - d[:, 0] - (2 * task.test.y - 1).float()) ** 2).mean())
    watch = DivergenceWatch(task, model.state_dict(), config=cfg)
    assert math.isclose(watch.initial, expected, rel_tol=1e-6)
    nan = {k: v * float("nan") for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"round 4: the global model's test loss is nan: training diverged"):
        watch.check(4, nan)
    assert watch.check(5, nan) is None  # once a run


def test_under_dp_the_warning_also_names_the_noise(diverging_task) -> None:
    """Noise large against the weights raises the loss as an lr too large does: the advice names both."""
    from deltaplane.engine import make_task
    from deltaplane.engine.divergence import DivergenceWatch

    cfg = RunConfig(task=diverging_task, clients=2, clip=1.0, dp_noise=1.0)
    task = make_task(cfg)
    model = task.build_model(0)
    watch = DivergenceWatch(task, model.state_dict(), config=cfg)
    with pytest.warns(UserWarning, match=r"Try a smaller learning rate .*; or the DP noise is large"):
        watch.check(1, {k: v * 1e3 for k, v in model.state_dict().items()})


@pytest.mark.parametrize(
    "driver",
    [{}, {"engine": "batched"}, {"engine": "batched", "threads": 2}],
    ids=["sequential", "batched", "batched-worker-scoring"],
)
def test_the_simulator_judges_the_loss_its_scoring_computed_without_a_forward_pass_of_its_own(
    diverging_task, driver, watch_passes
) -> None:
    """The simulator scores the global model on the test set every round anyway (with threads=2 in its forked
    worker, off the critical path); the watch judges the loss of those logits. Its own forward pass runs once,
    for the initial model, not once a round (that cost ~20% of a default round), and the warning still names
    the round that diverged, once."""

    # round 2's updates hold NaN and are refused: with threads=2 round 1 is scored in the worker while round 2
    # trains, and reported (and judged) as the run stops
    cfg = RunConfig(task=diverging_task, clients=2, rounds=2, lr=0.05, codec="identity", **driver)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(InvalidUpdate, match="round 2"):
        warnings.simplefilter("always")
        run_federation(cfg)
    said = [str(w.message) for w in caught if w.category.__name__ == "DivergenceWarning"]
    assert len(watch_passes) == 1  # the initial model's loss only
    assert len(said) == 1 and said[0].startswith("round 1: the global model's test loss rose to ")


@pytest.mark.parametrize(
    ("driver", "lr"),
    [({"transport": "http"}, 0.05), ({"engine": "population"}, 0.2)],
    ids=["http", "population"],
)
def test_drivers_that_score_each_round_hand_the_watch_their_loss(
    diverging_task, driver, lr, watch_passes
) -> None:
    """The HTTP simulation (round_scores) and the population engine (accuracy_and_loss) score the global model
    on the test set every round anyway: the watch judges the loss of those logits, its own forward pass runs
    once (the initial model), and the warning still names round 1, once."""

    cfg = RunConfig(task=diverging_task, clients=2, rounds=1, lr=lr, codec="identity", **driver)
    said = _divergence_warnings(cfg)
    assert len(watch_passes) == 1  # the initial model's loss only (and round 1's before)
    assert len(said) == 1 and said[0].startswith("round 1: the global model's test loss rose to ")


@pytest.mark.parametrize(
    "driver", [{"transport": "http"}, {"engine": "population"}], ids=["http", "population"]
)
def test_the_scores_the_watch_shares_are_the_plain_accuracy_bit_for_bit(diverging_task, driver) -> None:
    """Handing the watch the scoring's loss changes no figure: the last round's test accuracy is exactly what
    engine.accuracy (the scoring before) gives for the final state, and no loss is recorded."""
    from deltaplane.engine import accuracy, make_task
    from deltaplane.engine.metrics import TEST_LOSS

    cfg = RunConfig(
        task=diverging_task,
        task_options={"scale": 1.0},
        clients=2,
        rounds=2,
        lr=0.05,
        codec="identity",
        **driver,
    )
    result = run_federation(cfg)
    task = make_task(cfg)
    model = task.build_model(0)
    model.load_state_dict(result.final_state)
    assert result.rounds[-1].test_accuracy == accuracy(model, task.test)
    assert all(TEST_LOSS not in r.to_dict() for r in result.rounds)


def test_take_refuses_scores_without_a_loss(diverging_task) -> None:
    """A driver that scored its round without the task's loss is told how to score it (a typed error)."""
    from deltaplane.engine import make_task
    from deltaplane.engine.divergence import DivergenceWatch
    from deltaplane.engine.metrics import TEST_LOSS
    from deltaplane.errors import ConfigError

    cfg = RunConfig(task=diverging_task, clients=2)
    task = make_task(cfg)
    watch = DivergenceWatch(task, task.build_model(0).state_dict(), config=cfg, samples=None)
    with pytest.raises(ConfigError, match=r"loss=task.loss"):
        watch.take(1, {"test_accuracy": 0.5})
    assert watch.take(1, {"test_accuracy": 0.5, TEST_LOSS: watch.initial}) == {"test_accuracy": 0.5}
