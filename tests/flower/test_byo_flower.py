"""docs/byo.md's task, defined in a user file, through the Flower driver: bit for bit the sequential run."""

from __future__ import annotations

import torch
from flwr.app import Context, RecordDict

from deltaplane.engine import RunConfig, build_clients, make_task
from deltaplane.flower import task_client_app, task_server_app
from deltaplane.sim import run_simulation


def test_users_task_on_flower_equals_the_sequential_driver(byo_task, loopback_grid) -> None:
    cfg = RunConfig(task=byo_task, clients=4, rounds=3, alpha=1.0, codec="topk(0.1) | quant(bits=8)", lr=0.1)
    expected = run_simulation(cfg)
    rounds, finals = [], {}
    server = task_server_app(
        cfg, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: finals.update(st)
    )
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server(grid=loopback_grid(task_client_app(cfg), cfg.clients), context=context)
    assert [(r.test_accuracy, r.uplink_bytes) for r in rounds] == [
        (r.test_accuracy, r.uplink_bytes) for r in expected.rounds
    ]
    for k, v in expected.final_state.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)


def test_devices_larger_than_the_default_example_bound_are_taken_on_flower(big_task, loopback_grid) -> None:
    """The strategy bounds the example count a node claims (100,000 by default, as the service); the task's
    own partitions are known to ``task_server_app``, so a device holding more (here ~120,000 training samples
    each) is taken as in process, not refused."""
    cfg = RunConfig(task=big_task, clients=2, rounds=1, alpha=100.0, batch_size=8192, local_epochs=1)
    expected = run_simulation(cfg)
    assert min(c.num_samples for c in build_clients(cfg, make_task(cfg))) > 100_000
    rounds, finals = [], {}
    server = task_server_app(
        cfg, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: finals.update(st)
    )
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server(grid=loopback_grid(task_client_app(cfg), cfg.clients), context=context)
    assert [r.rejected for r in rounds] == [0]
    for k, v in expected.final_state.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)


def test_a_tied_weight_travels_once_on_flower_as_in_process(tied_task, loopback_grid) -> None:
    """A tied parameter under central DP on Flower: one tensor in each node's update, noised once, both names
    equal after every round, and the sequential driver's model bit for bit."""
    cfg = RunConfig(
        task=tied_task, clients=4, rounds=2, alpha=1.0, codec="identity", lr=0.05, clip=1.0, dp_noise=0.5
    )
    expected = run_simulation(cfg)
    finals: dict = {}
    server = task_server_app(cfg, on_done=lambda s, st: finals.update(st))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server(grid=loopback_grid(task_client_app(cfg), cfg.clients), context=context)
    assert torch.equal(finals["hidden.weight"], finals["again.weight"])
    for k, v in expected.final_state.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)


def test_a_diverging_run_is_called_so_on_flower(diverging_task, loopback_grid, watch_passes) -> None:
    """The divergence warning of the in-process drivers (tests/engine/test_divergence.py), on Flower: judged on
    the loss of the round's own scoring (round_scores), the watch's own forward pass run once (the initial
    model's), not once more a round."""
    import warnings

    cfg = RunConfig(task=diverging_task, clients=2, rounds=1, codec="identity", lr=0.05)
    server = task_server_app(cfg)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server(grid=loopback_grid(task_client_app(cfg), cfg.clients), context=context)
    said = [str(w.message) for w in caught if w.category.__name__ == "DivergenceWarning"]
    assert len(said) == 1 and said[0].startswith("round 1: the global model's test loss rose to ")
    assert len(watch_passes) == 1
