"""docs/byo.md's task — a model and data in a user file, not in the package — through every driver."""

from __future__ import annotations

import re

import pytest
import torch

from deltaplane.apps.runner import run_federation
from deltaplane.engine import RunConfig
from deltaplane.errors import TaskError


def test_the_users_task_runs_identically_on_sequential_and_http_and_closely_batched(byo_task) -> None:
    cfg = RunConfig(task=byo_task, clients=4, rounds=3, alpha=1.0, codec="topk(0.1) | quant(bits=8)", lr=0.1)
    seq = run_federation(cfg)
    http = run_federation(cfg.replace(transport="http"))
    bat = run_federation(cfg.replace(engine="batched"))
    assert seq.final.test_accuracy > 0.85  # it learns (measured 0.97 on this split)
    assert [r.test_accuracy for r in http.rounds] == [r.test_accuracy for r in seq.rounds]
    assert all(torch.equal(http.final_state[k], v) for k, v in seq.final_state.items())
    # the vmap path equals the loop up to float32 rounding: within one of the 113 test patients
    for a, b in zip(seq.rounds, bat.rounds, strict=True):
        assert abs(a.test_accuracy - b.test_accuracy) <= 1 / 113
    worst = max(float((seq.final_state[k] - bat.final_state[k]).abs().max()) for k in seq.final_state)
    assert worst < 1e-4


def test_a_naturally_split_text_task_runs_batched_through_vmap() -> None:
    """The second built-in task (one device per stdlib module) on the batched engine's vmap path."""
    cfg = RunConfig(
        task="deltaplane.apps.charlm:make_task",
        task_options={"devices": 4, "per_device": 200},
        clients=4,
        rounds=2,
        local_epochs=1,
        codec="topk(0.05) | quant(bits=8)",
    )
    seq, bat = run_federation(cfg), run_federation(cfg.replace(engine="batched"))
    assert seq.final.test_accuracy > 0.1  # 97 symbols: chance is ~0.01; spaces alone are ~0.15
    assert abs(seq.final.test_accuracy - bat.final.test_accuracy) <= 2 / 400


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"devices": True}, "devices must be an integer. Found True"),
        ({"per_device": 2.5}, "per_device must be an integer. Found 2.5"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"devices": 1, "context": 10**6}, "context=1000000 is longer than argparse.py's test part"),
    ],
)
def test_the_text_tasks_options_are_checked_with_their_names(options, message) -> None:
    """charlm's options: True was taken as one device, 2.5 and -1 got numpy's wording, and a context longer
    than a module's text gave "the test set is empty", which did not point at the context."""
    from deltaplane.apps.charlm import make_task

    with pytest.raises(TaskError, match=re.escape(message)):
        make_task(**options)
