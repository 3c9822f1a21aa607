"""The simulator with the trust features on: DP, server optimizers, attacks, defences, SecAgg, FedProx."""

import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation import epsilon_for
from deltaplane.sim import RunConfig, run_simulation
from deltaplane.sim.client import make_clients
from deltaplane.sim.model import build_model

TINY = RunConfig(clients=6, rounds=3, local_epochs=1, lr=0.1)


def test_dp_run_reports_epsilon_every_round_and_stops_at_the_budget() -> None:
    cfg = TINY.replace(dp_noise=1.0, clip="1.0", sample_fraction=0.5, dp_delta=1e-3)
    res = run_simulation(cfg)
    eps = [r.epsilon for r in res.rounds]
    for rnd, e in enumerate(eps, start=1):
        assert e == pytest.approx(
            epsilon_for(noise_multiplier=1.0, sampling_rate=0.5, steps=rnd, delta=1e-3), rel=1e-9
        )
    # with a fixed clip under DP the exact clipped fraction is a statistic of private updates: not released
    assert all(r.clipped_fraction is None for r in res.rounds)
    budget = (eps[1] + eps[2]) / 2  # room for two rounds, not three
    # the run stops before the round that would exceed the budget and keeps the two rounds it did
    stopped = run_simulation(cfg.replace(epsilon_budget=budget))
    assert len(stopped.rounds) == 2 and stopped.rounds[-1].epsilon == pytest.approx(eps[1])
    assert stopped.stopped is not None and "privacy budget exhausted at round 3" in stopped.stopped
    assert stopped.to_dict()["stopped"] == stopped.stopped
    # not even one round fits: nothing to report, the error says why
    with pytest.raises(dp.PrivacyBudgetExceeded, match="round 1"):
        run_simulation(cfg.replace(epsilon_budget=eps[0] / 2))


def test_local_dp_reports_the_worst_device_epsilon() -> None:
    from deltaplane.aggregation import local_epsilon

    res = run_simulation(TINY.replace(local_dp_noise=2.0, clip="1.0", dp_delta=1e-3))
    # every device takes part in every round (sample_fraction 1): ε of r releases at multiplier z/2
    for rnd, r in enumerate(res.rounds, start=1):
        assert r.epsilon == pytest.approx(local_epsilon(noise_multiplier=2.0, rounds=rnd, delta=1e-3))
    with pytest.raises(dp.ConfigError, match="numeric clip"):
        RunConfig.from_mapping({"local_dp_noise": 1.0})


def test_one_bad_client_is_rejected_and_the_round_goes_on() -> None:
    # a third of the clients send Inf (Gaussian noise with an overflowing std): refused, logged, round continues
    res = run_simulation(TINY.replace(attack="gaussian:0.34:std=1e39"))
    assert [r.rejected for r in res.rounds] == [2, 2, 2]
    assert res.final.test_accuracy > 0.2
    assert all(torch.isfinite(v).all() for v in res.final_state.values())


def test_backdoor_is_measured() -> None:
    cfg = TINY.replace(clients=10, rounds=4, lr=0.2)
    clean = run_simulation(
        cfg.replace(attack="backdoor:0.3:boost=0.001")
    )  # attacker's update made negligible
    attacked = run_simulation(cfg.replace(attack="backdoor:0.3:boost=5"))
    assert 0.0 <= clean.final.backdoor_success < 0.3
    assert attacked.final.backdoor_success > clean.final.backdoor_success + 0.4
    assert run_simulation(TINY).final.backdoor_success is None


def test_fedadam_first_step_is_lr_times_sign() -> None:
    from deltaplane.sim.seeding import Stream, derive_seed

    res = run_simulation(TINY.replace(rounds=1, aggregator="fedadam", server_opt_lr=0.01))
    init = build_model(derive_seed(TINY.seed, Stream.MODEL_INIT)).state_dict()
    # m = 0.1Δ, v = 0.01Δ² + τ²  →  step = lr·0.1Δ/(√v + τ) ≈ lr·sign(Δ) wherever |Δ| ≫ τ
    step = torch.cat([(res.final_state[k] - init[k]).abs().flatten() for k in init])
    assert 0.005 < step.max().item() <= 0.01 + 1e-6  # no coordinate moves more than lr; the large ones ≈ lr


def test_robust_rules_run_in_the_simulator() -> None:
    plain = run_simulation(TINY)
    for opts in (
        {"defense": "median"},
        {"defense": "multi_krum:1"},
        {"defense": "fltrust", "root_samples": 50},
    ):
        res = run_simulation(TINY.replace(**opts))
        assert all(torch.isfinite(v).all() for v in res.final_state.values()), opts
        assert not torch.equal(res.final_state["fc2.weight"], plain.final_state["fc2.weight"]), opts


def test_secagg_run_matches_plain_fedavg_closely() -> None:
    plain = run_simulation(TINY)
    secure = run_simulation(TINY.replace(secagg=True))
    for k, v in plain.final_state.items():
        assert torch.allclose(secure.final_state[k], v, atol=2e-3), k
    # 6 clients × masked 20-bit values in a 23-bit ring, plus keys and shares
    assert secure.final.uplink_bytes > 6 * plain.num_params * 23 // 8


def test_fedprox_keeps_the_client_closer_to_the_global_model() -> None:
    cfg = TINY.replace(local_epochs=1)
    from deltaplane.data.digits import load_digits, train_test_split

    train, _ = train_test_split(load_digits())
    client = make_clients(cfg, train)[0]
    model = build_model(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    norms = {}
    for mu in (0.0, 1.0):
        g = torch.Generator().manual_seed(0)
        norms[mu] = client.local_update(model, state, cfg.replace(prox_mu=mu), g, lr=0.1).norm()
    assert norms[1.0] < 0.8 * norms[0.0]


@pytest.mark.parametrize(
    ("opts", "match"),
    [({"secagg": True, "defense": "median"}, "secagg hides individual updates"),
     ({"secagg": True, "dp_noise": 1.0, "clip": "1", "clients": 2, "secagg_min_contributors": 3},
      "exceeds the 2 clients"),
     ({"dp_noise": 1.0}, "needs a clip"), ({"attack": "backdoor"}, "malicious fraction"),
     ({"clip": "-2"}, "clip must be a positive")],
)  # fmt: skip
def test_bad_combinations_are_config_errors(opts, match) -> None:
    with pytest.raises(dp.ConfigError, match=match):
        RunConfig.from_mapping(opts)
