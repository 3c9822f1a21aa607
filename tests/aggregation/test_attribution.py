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


def _rounds(rounds: int, *, restart_at: int | None = None, snapshot: bool = True):
    """A server step of the rule over ``rounds`` rounds of 6 clients, client 5 sending a backdoor step (a
    gradient step on digits, half of them triggered and labelled 0) and the others random updates; the step starts with a known trigger (a 2×2 square, label 0) so that scores, reputations and the shadow move
    from the first round. Returns the final weights and the rule's reputations."""
    import io

    import torch.nn.functional as F
    from torch.func import functional_call

    from deltaplane.delta import Delta
    from deltaplane.engine.attacks import add_trigger

    cfg = RunConfig(clients=6, defense="trigger_attribution(threshold=0.5, every=1000, steps=2)")
    task = make_task(cfg)
    init = {k: v.detach().clone() for k, v in task.build_model(0).state_dict().items()}

    def build() -> ServerStep:
        return ServerStep.for_run(cfg, task, init, base_id="m")

    step = build()
    rule = step.aggregator.find(BackdoorAttribution)
    assert isinstance(rule, BackdoorAttribution)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., -3:-1, -3:-1] = 1.0
    rule.state.mask, rule.state.pattern, rule.state.label = mask, torch.ones(1, 1, 8, 8), 0
    model, pool = task.build_model(0), task.train if task.train is not None else task.clients[0]
    # the attack's own recipe (engine.attacks.Backdoor): half the images triggered and labelled 0
    inputs = torch.cat([pool.x[:64], add_trigger(pool.x[64:128])])
    labels = torch.cat([pool.y[:64], torch.zeros(64, dtype=torch.long)])

    def backdoor_step(state) -> Delta:
        params = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in state.items()}
        loss = F.cross_entropy(functional_call(model, params, (inputs,)), labels)
        grads = torch.autograd.grad(loss, list(params.values()))
        return Delta({k: -0.5 * g for k, g in zip(params, grads, strict=True)})

    for rnd in range(1, rounds + 1):
        if rnd == restart_at:  # a new process: a fresh step, the weights from the registry, the saved state
            buf = io.BytesIO()
            torch.save(step.state_dict(), buf)
            state = step.state
            step = build()
            if snapshot:
                step.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
            step.open(rnd, version=rnd - 1, state=state)
        else:
            step.open(rnd)
        for c in range(5):
            g = torch.Generator().manual_seed(100 * rnd + c)
            step.receive_delta(
                str(c), Delta({k: 0.05 * torch.randn(v.shape, generator=g) for k, v in init.items()}), 10
            )
        step.receive_delta("5", backdoor_step(step.state), 10)
        step.close()
    rule = step.aggregator.find(BackdoorAttribution)
    return step.state, dict(rule.state.reputation), list(rule.excluded)


def test_a_restored_server_continues_the_reputations_and_the_shadow_bit_for_bit() -> None:
    straight, reputation, excluded = _rounds(4)
    restored, restored_reputation, _ = _rounds(4, restart_at=3)
    assert excluded  # the reputations moved far enough to keep updates out, so the snapshot has work to do
    assert all(torch.equal(straight[k], restored[k]) for k in straight)
    assert reputation == restored_reputation
    assert any(abs(v) > 1 for v in reputation.values())  # the state carried something
    # control: a restart that loses the snapshot forgets the trigger and the reputations, and drifts
    fresh, fresh_reputation, _ = _rounds(4, restart_at=3, snapshot=False)
    assert fresh_reputation != reputation
    assert not all(torch.equal(straight[k], fresh[k]) for k in straight)


@pytest.mark.parametrize("sticky", [False, True])
def test_sticky_keeps_the_infected_label_and_its_evidence(sticky: bool) -> None:
    rule = parse_defense(f"trigger_attribution(sticky={'true' if sticky else 'false'})")
    assert isinstance(rule, BackdoorAttribution) and rule.sticky is sticky
    st = rule.state
    m, p = torch.zeros(1, 8, 8), torch.ones(1, 8, 8)
    assert rule._adopt(0, 2.06, m, p)  # the backdoor's label found
    st.reputation, st.rounds_seen = {"attacker": -9.0}, {"attacker": 9}
    assert rule._adopt(0, 1.6, m, p)  # the same label again, weaker after unlearning: evidence kept
    assert st.reputation == {"attacker": -9.0}
    # a clean label's outlier, less anomalous than label 0 ever was
    assert rule._adopt(1, 1.85, m + 0.5, p) is not sticky
    if sticky:
        assert (st.label, st.anomaly, st.reputation) == (0, 2.06, {"attacker": -9.0})
    else:
        assert (st.label, st.anomaly, st.reputation) == (1, 1.85, {})
    # a label more anomalous than anything seen replaces the trigger either way
    assert rule._adopt(2, 3.0, m, p)
    assert (st.label, st.reputation) == (2, {})
    with pytest.raises(ConfigError, match="sticky must be true or false"):
        parse_defense("trigger_attribution(sticky=1)")
