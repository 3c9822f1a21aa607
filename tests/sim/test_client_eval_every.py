"""``RunConfig.client_eval_every``: the devices' held-out data scored every N-th round and the last (0: never),
the test set every round, with the same meaning on every in-process driver; the HTTP service run refuses it."""

from __future__ import annotations

import math

import pytest
import torch

from deltaplane.engine.results import RoundMetrics
from deltaplane.errors import ConfigError, UnsupportedOption
from deltaplane.sim import RunConfig, run_simulation

BASE = RunConfig(clients=4, rounds=5, local_epochs=1, lr=0.1)

CLIENT_FIELDS = [f"client_accuracy_{k}" for k in ("mean", "min", "p10", "median", "p90", "max")]

#: every in-process driver: the sequential loop, the batched engine in one process, the batched engine with a
#: forked worker that scores the rounds (threads=2: deltaplane.sim.worker_scoring), the population runner
DRIVERS = {
    "sequential": {"engine": "sequential"},
    "batched": {"engine": "batched"},
    "batched-forked": {"engine": "batched", "threads": 2},
    "population": {"engine": "population"},
}


def _scored(r: RoundMetrics) -> bool:
    values = [getattr(r, f) for f in CLIENT_FIELDS]
    if all(math.isnan(v) for v in values):
        return False
    assert not any(math.isnan(v) for v in values), f"round {r.round}: some client fields scored, some not"
    return True


@pytest.mark.parametrize(
    ("every", "rounds", "scored"),
    [(1, 4, [1, 2, 3, 4]), (2, 5, [2, 4, 5]), (3, 6, [3, 6]), (7, 3, [3]), (0, 4, [])],
)
def test_which_rounds_score_the_devices(every, rounds, scored) -> None:
    cfg = RunConfig(rounds=rounds, client_eval_every=every)
    assert [r for r in range(1, rounds + 1) if cfg.scores_clients(r)] == scored


@pytest.mark.parametrize("bad", [-1, 1.5, True, "often"])
def test_a_bad_client_eval_every_is_refused_naming_the_field(bad) -> None:
    with pytest.raises(ConfigError, match="client_eval_every"):
        RunConfig(client_eval_every=bad)


def test_the_default_scores_every_round() -> None:
    assert RunConfig().client_eval_every == 1
    result = run_simulation(BASE)
    assert all(_scored(r) for r in result.rounds)


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_every_driver_scores_the_devices_on_the_named_rounds_only(driver) -> None:
    """The same run with the devices scored every round and every second one (and the last): the same models
    and test accuracies bit for bit, the client fields on rounds 2, 4 and 5 the very values of the default run,
    NaN on rounds 1 and 3; with 0 on no round."""
    cfg = BASE.replace(**DRIVERS[driver])
    every = run_simulation(cfg)
    second = run_simulation(cfg.replace(client_eval_every=2))
    never = run_simulation(cfg.replace(client_eval_every=0))
    assert [r.test_accuracy for r in second.rounds] == [r.test_accuracy for r in every.rounds]
    assert [r.test_accuracy for r in never.rounds] == [r.test_accuracy for r in every.rounds]
    assert all(torch.equal(second.final_state[k], every.final_state[k]) for k in every.final_state)
    assert [r.round for r in second.rounds if _scored(r)] == [2, 4, 5]
    assert not any(_scored(r) for r in never.rounds)
    for a, b in zip(every.rounds, second.rounds, strict=True):
        if b.round in (2, 4, 5):
            assert [getattr(a, f) for f in CLIENT_FIELDS] == [getattr(b, f) for f in CLIENT_FIELDS]
        # everything else a round reports is unchanged
        assert (a.clients, a.uplink_bytes, a.rejected, a.backdoor_success) == (
            b.clients,
            b.uplink_bytes,
            b.rejected,
            b.backdoor_success,
        )


def test_the_forked_worker_skips_the_devices_on_unscored_rounds(monkeypatch) -> None:
    """threads=2 scores in the forked worker (WorkerScoring): it is told per round whether to score the devices,
    so the worker's share of the work really shrinks, not only the figures."""
    from deltaplane.sim import worker_scoring

    asked: list[bool] = []
    submit = worker_scoring.WorkerScoring.submit

    def spy(self, state, *, clients=True):
        asked.append(clients)
        return submit(self, state, clients=clients)

    monkeypatch.setattr(worker_scoring.WorkerScoring, "submit", spy)
    result = run_simulation(BASE.replace(engine="batched", threads=2, client_eval_every=2))
    assert asked == [False, True, False, True]  # rounds 1-4 in the worker; the last is scored in this process
    assert [r.round for r in result.rounds if _scored(r)] == [2, 4, 5]


def test_a_personalized_run_keeps_its_personal_figures_every_round() -> None:
    """α-mix chooses α on each device's held-out data in its own step, not from the round's scores: the personal
    figures stay every round and the same, only the global model's held-out fields go."""
    cfg = BASE.replace(rounds=3, personalization="alpha_mix")
    every = run_simulation(cfg)
    never = run_simulation(cfg.replace(client_eval_every=0))
    keys = ("test_accuracy", "personal_accuracy_mean", "personal_accuracy_min", "client_mix_accuracy_mean")
    assert [[getattr(r, k) for k in keys] for r in never.rounds] == [
        [getattr(r, k) for k in keys] for r in every.rounds
    ]
    assert all(r.personal_accuracy_mean is not None for r in never.rounds)
    assert not any(_scored(r) for r in never.rounds)


def test_the_http_service_run_refuses_it_with_the_reason() -> None:
    from deltaplane.serve.federation import check_supported

    check_supported(RunConfig(transport="http"))  # the default runs
    with pytest.raises(UnsupportedOption, match="client_eval_every=0.*drift summary") as raised:
        check_supported(RunConfig(transport="http", client_eval_every=0))
    assert isinstance(raised.value, ConfigError)


def test_a_service_with_real_devices_refuses_it_with_the_reason() -> None:
    from deltaplane.serve.device_side import check_real_devices

    check_real_devices(RunConfig())  # the default runs
    with pytest.raises(UnsupportedOption, match="client_eval_every=3: the service scores no device"):
        check_real_devices(RunConfig(client_eval_every=3))


def test_the_yaml_config_sets_it_under_clients(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("clients:\n  count: 4\n  eval_every: 3\n")
    cfg = RunConfig.from_yaml(path)
    assert cfg.client_eval_every == 3
    assert cfg.to_sections()["clients"]["eval_every"] == 3
