"""delta_mod + DeltaStrategy + the digits apps, driven through Flower's real app code without Ray."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from deltaplane import Delta, decompress
from deltaplane.aggregation import CoordinateMedian, FedAvg
from deltaplane.errors import ConfigError, DecodeError, VersionMismatch
from deltaplane.flower import DeltaStrategy, delta_mod, digits_client_app, digits_server_app
from deltaplane.flower.records import CONTROL_KEY, DOWNLINK_KEY, UPLINK_KEY, control, state_to_arrays
from deltaplane.sim import RunConfig, run_simulation
from deltaplane.sim.simulation import BASE_ID


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 5), value), "b": torch.arange(3, dtype=torch.float32)}


def _context(partition: int = 0) -> Context:
    return Context(
        run_id=1, node_id=7, node_config={"partition-id": partition}, state=RecordDict(), run_config={}
    )


def _train_msg(content: RecordDict) -> Message:
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def _add_one(msg: Message, context: Context) -> Message:
    """A ClientApp train step that moves every weight by +1 (stands in for local SGD)."""
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    new = ArrayRecord({k: v + 1.0 for k, v in state.items()})
    return Message(RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)


def _node_holding_version_0(mod: Callable[..., Message]) -> Context:
    """A node's context after one round of ``mod`` from the full model ``("m", 0)``: it caches that version."""
    ctx = _context()
    mod(
        _train_msg(RecordDict({"arrays": state_to_arrays(_state(0.0)), CONTROL_KEY: control("m", 0, -1)})),
        ctx,
        _add_one,
    )
    return ctx


def test_mod_sends_payload_and_keeps_error_feedback_in_context_state():
    mod = delta_mod(codec="topk(0.5)", error_feedback=True, seed=3)
    ctx = _context()
    content = RecordDict({"arrays": state_to_arrays(_state(0.0)), CONTROL_KEY: control("m", 0, -1)})
    reply = mod(_train_msg(content), ctx, _add_one)

    assert "arrays" not in reply.content  # the weights never leave the device
    payload = reply.content.config_records[UPLINK_KEY]["payload"]
    delta = decompress(payload, expect_base=("m", 0))
    # top-50% (rounded up) of a +1 delta keeps ceil(half) of each tensor's entries
    assert int((delta["w"] != 0).sum()) == 10 and int((delta["b"] != 0).sum()) == 2
    assert reply.content.metric_records["metrics"]["num-examples"] == 10
    assert "deltaplane.compressor" in ctx.state.config_records  # residual lives in the node's Context

    # Round 2: the server sends the downlink chain; the node rebuilds version 1 and its residual is added.
    down = Delta({"w": torch.full((4, 5), 0.5), "b": torch.zeros(3)})
    from deltaplane import Compressor

    dl = Compressor("identity").compress(down, base_id="m", base_version=0)
    content2 = RecordDict({CONTROL_KEY: control("m", 1, 0), DOWNLINK_KEY: ConfigRecord({"payloads": [dl]})})
    seen = {}

    def capture(msg: Message, context: Context) -> Message:
        seen.update(msg.content.array_records["arrays"].to_torch_state_dict())
        return _add_one(msg, context)

    reply2 = mod(_train_msg(content2), ctx, capture)
    torch.testing.assert_close(seen["w"], torch.full((4, 5), 0.5))
    delta2 = decompress(reply2.content.config_records[UPLINK_KEY]["payload"], expect_base=("m", 1))
    # The entries held back in round 1 now carry this round's +1 plus their residual +1.
    held_back = delta["w"] == 0
    torch.testing.assert_close(delta2["w"][held_back], torch.full((10,), 2.0))


def test_mod_refuses_a_downlink_that_does_not_start_at_its_cached_model():
    mod = delta_mod(codec="identity")
    ctx = _node_holding_version_0(mod)
    stale = RecordDict(
        {CONTROL_KEY: control("m", 5, 3), DOWNLINK_KEY: ConfigRecord({"payloads": [b"x", b"y"]})}
    )
    with pytest.raises(VersionMismatch, match="full model"):
        mod(_train_msg(stale), ctx, _add_one)


def test_mod_refuses_a_downlink_whose_payloads_are_not_a_list():
    """The server's downlink ``payloads`` must be a list of wire payloads. A number in their place reached
    ``len()`` and raised a bare TypeError on the node; it is now the DecodeError every malformed downlink gets."""
    mod = delta_mod(codec="identity")
    ctx = _node_holding_version_0(mod)
    for garbled in (2, b"xy"):
        bad = RecordDict({CONTROL_KEY: control("m", 2, 0), DOWNLINK_KEY: ConfigRecord({"payloads": garbled})})
        with pytest.raises(DecodeError, match="downlink payloads must be a list of bytes"):
            mod(_train_msg(bad), ctx, _add_one)


def test_mod_passes_evaluate_messages_through():
    mod = delta_mod(codec="identity")
    msg = Message(
        RecordDict({"arrays": state_to_arrays(_state(0.0))}), dst_node_id=7, message_type=MessageType.EVALUATE
    )
    out = mod(
        msg, _context(), lambda m, c: Message(RecordDict({"metrics": MetricRecord({"acc": 0.5})}), reply_to=m)
    )
    assert out.content.metric_records["metrics"]["acc"] == 0.5


def test_strategy_sends_full_model_once_then_downlink_chains(loopback_grid):
    app = ClientApp(mods=[delta_mod(codec="identity")])
    app.train()(_add_one)
    grid = loopback_grid(app, 3)
    strategy = DeltaStrategy(
        inner=FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=3), base_id="m"
    )
    result = strategy.start(grid, state_to_arrays(_state(0.0)), num_rounds=3)

    final = result.arrays.to_torch_state_dict()
    torch.testing.assert_close(final["w"], torch.full((4, 5), 3.0))  # +1 per round, averaged over 3 nodes
    assert strategy.version == 3
    first, later = grid.sent[:3], grid.sent[3:]
    assert all("arrays" in m.content for m in first)
    assert all("arrays" not in m.content and DOWNLINK_KEY in m.content for m in later)
    # each node's chain is exactly the one downlink payload it missed
    assert [len(m.content.config_records[DOWNLINK_KEY]["payloads"]) for m in later] == [1] * 6
    t = strategy.traffic[1]
    # identity uplink: 23 fp32 values per node plus a header; message bytes add Flower's metric record
    assert t.clients == 3 and 3 * 23 * 4 < t.uplink_payload_bytes < t.uplink_message_bytes
    assert t.downlink_message_bytes < strategy.traffic[0].downlink_message_bytes


def test_strategy_can_hand_decoded_weights_to_the_wrapped_flower_strategy(loopback_grid):
    app = ClientApp(mods=[delta_mod(codec="identity")])
    app.train()(_add_one)
    strategy = DeltaStrategy(
        inner=FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=2), aggregator=None
    )
    result = strategy.start(loopback_grid(app, 2), state_to_arrays(_state(1.0)), num_rounds=2)
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"], torch.full((4, 5), 3.0))


def test_strategy_refuses_a_wrapped_flower_strategy_that_returns_no_weights(loopback_grid):
    """A Flower Strategy may return ``(None, None)`` from ``aggregate_train``; DeltaStrategy(aggregator=None) took
    its weights regardless and failed with AttributeError ('NoneType' ... 'to_torch_state_dict'). It now raises
    a ConfigError naming the wrapped strategy and the round."""

    class NoWeights(FlowerFedAvg):
        def aggregate_train(self, server_round, replies):
            return None, None

    app = ClientApp(mods=[delta_mod(codec="identity")])
    app.train()(_add_one)
    strategy = DeltaStrategy(
        inner=NoWeights(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=2), aggregator=None
    )
    with pytest.raises(ConfigError, match="NoWeights returned no weights for round 1"):
        strategy.start(loopback_grid(app, 2), state_to_arrays(_state(1.0)), num_rounds=1)


def test_strategy_runs_any_deltaplane_aggregator_robust_median_outvotes_a_byzantine_node(loopback_grid):
    def step(msg: Message, context: Context) -> Message:
        bad = context.node_config["partition-id"] == 2
        state = msg.content.array_records["arrays"].to_torch_state_dict()
        new = ArrayRecord({k: v + (100.0 if bad else 1.0) for k, v in state.items()})
        return Message(
            RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg
        )

    finals = {}
    for name, agg in (("mean", FedAvg()), ("median", CoordinateMedian(bucket=1))):
        app = ClientApp(mods=[delta_mod(codec="identity")])
        app.train()(step)
        strategy = DeltaStrategy(
            inner=FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=3),
            aggregator=agg,
        )
        result = strategy.start(loopback_grid(app, 3), state_to_arrays(_state(0.0)), num_rounds=1)
        finals[name] = result.arrays.to_torch_state_dict()["w"]
        assert result.train_metrics_clientapp[1]["clients"] == 3
    torch.testing.assert_close(finals["mean"], torch.full((4, 5), 34.0))  # (1 + 1 + 100) / 3
    torch.testing.assert_close(finals["median"], torch.full((4, 5), 1.0))


def test_digits_apps_match_the_in_process_engine_exactly(loopback_grid):
    """Same seed and config: the Flower app path gives the in-process engine's accuracies and uplink bytes."""
    # engine="sequential": the in-process batched trainer equals the client loop only up to float rounding
    cfg = RunConfig(
        clients=5,
        rounds=4,
        codec="topk(0.05) | quant(bits=8)",
        local_epochs=1,
        alpha=5.0,
        engine="sequential",
    )
    expected = run_simulation(cfg)
    rounds, finals = [], {}
    server = digits_server_app(
        cfg, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: finals.update(st)
    )
    grid = loopback_grid(digits_client_app(cfg), cfg.clients)
    server(grid=grid, context=_context())

    assert [r.test_accuracy for r in rounds] == [r.test_accuracy for r in expected.rounds]
    assert [r.uplink_bytes for r in rounds] == [r.uplink_bytes for r in expected.rounds]
    assert [r.client_accuracy_min for r in rounds] == [r.client_accuracy_min for r in expected.rounds]
    for k, v in expected.final_state.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)
    assert rounds[-1].test_accuracy > 0.35  # measured 0.384: it learns, on both engines
    assert BASE_ID in {
        m.content.config_records[CONTROL_KEY]["base-id"] for m in grid.sent if CONTROL_KEY in m.content
    }


def test_strategy_with_server_optimizer_over_dp_reports_measurements(loopback_grid):
    from deltaplane.aggregation import DPFedAvg, FedAdam

    app = ClientApp(mods=[delta_mod(codec="identity")])
    app.train()(_add_one)
    agg = FedAdam(DPFedAvg(FedAvg(), clip=1.0, noise_multiplier=0.5, expected_clients=3, seed=0))
    strategy = DeltaStrategy(
        inner=FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=3), aggregator=agg
    )
    result = strategy.start(loopback_grid(app, 3), state_to_arrays(_state(0.0)), num_rounds=2)
    w = result.arrays.to_torch_state_dict()["w"]
    assert bool(torch.isfinite(w).all()) and float(w.abs().max()) > 0
    metrics = result.train_metrics_clientapp[2]
    # the DP wrapper's and the server optimizer's measurements came along as Flower metrics
    assert metrics["clients"] == 3 and metrics["clip"] == 1.0 and metrics["noise_std"] == 0.5, metrics
    assert metrics["server_step"] == 2.0


@pytest.mark.parametrize(
    "change",
    [
        {"defense": "fltrust", "server_lr": 0.5},
        {"attack": "sign_flip:0.4", "prox_mu": 0.1, "train_shifts": 1},
        {"clip": "1.0", "local_dp_noise": 0.3},
    ],
    ids=["fltrust-server-lr", "attack-prox-shifts", "local-dp"],
)
def test_flower_runs_the_engine_steps_bit_for_bit(loopback_grid, change):
    """The Flower driver used to refuse FedProx, local DP, attacks and FLTrust and to apply server_lr twice
    over FedAdam; it now runs the engine's client and server steps, equal to the sequential driver."""
    cfg = RunConfig(clients=3, rounds=2, local_epochs=1, lr=0.1, codec="topk(0.05) | quant(bits=8)").replace(
        **change
    )
    expected = run_simulation(cfg)
    rounds, finals = [], {}
    server = digits_server_app(
        cfg, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: finals.update(st)
    )
    server(grid=loopback_grid(digits_client_app(cfg), cfg.clients), context=_context())
    for k, v in expected.final_state.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)

    def seen(r):
        return (
            r.test_accuracy,
            r.uplink_bytes,
            r.epsilon,
            r.rejected,
            r.clipped_fraction,
            r.backdoor_success,
        )

    assert [seen(r) for r in rounds] == [seen(r) for r in expected.rounds]
