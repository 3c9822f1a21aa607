"""trigger_attribution (deltaplane.aggregation.attribution): the spec, the refusals, the server wiring."""

from __future__ import annotations

import pytest
import torch

from deltaplane.aggregation import parse_defense
from deltaplane.aggregation.attribution import BackdoorAttribution, check_task
from deltaplane.engine import RunConfig, ServerStep, make_task
from deltaplane.errors import ConfigError, IncompatibleDefense


def test_the_spec_builds_the_rule_with_its_parameters() -> None:
    rule = parse_defense("trigger_attribution(2.5, every=3, steps=10, lam=0.05)")
    assert isinstance(rule, BackdoorAttribution)
    assert (rule.threshold, rule.every, rule.steps, rule.lam) == (2.5, 3, 10, 0.05)
    with pytest.raises(ConfigError, match="every must be an integer"):
        parse_defense("trigger_attribution(every=1.5)")
    with pytest.raises(ConfigError, match="threshold must be positive"):
        parse_defense("trigger_attribution(threshold=-1)")


def test_token_id_inputs_are_refused_with_the_reason() -> None:
    with pytest.raises(IncompatibleDefense, match="token ids"):
        check_task(torch.randint(0, 100, (8, 16)), torch.randint(0, 100, (8,)))
    with pytest.raises(IncompatibleDefense, match="classification"):
        check_task(torch.rand(8, 4), torch.rand(8))


def test_a_server_for_a_token_task_refuses_before_the_first_round() -> None:
    cfg = RunConfig(
        task="deltaplane.apps.charlm:make_task",
        task_options={"devices": 4, "per_device": 50, "test_per_device": 10},
        clients=4,
        defense="trigger_attribution",
    )
    task = make_task(cfg)
    init = {k: v.detach().clone() for k, v in task.build_model(0).state_dict().items()}
    with pytest.raises(IncompatibleDefense, match="token ids"):
        ServerStep.for_run(cfg, task, init, base_id="m")


def test_a_server_without_a_task_cannot_hold_the_rule() -> None:
    from deltaplane.aggregation import build_aggregator
    from deltaplane.engine.server import MemoryPublisher

    task = make_task(RunConfig())
    init = task.build_model(0).state_dict()
    with pytest.raises(ConfigError, match="root dataset"):
        ServerStep(
            build_aggregator(defense="trigger_attribution"), MemoryPublisher(None, "m"), init, base_id="m"
        )  # type: ignore[arg-type]
