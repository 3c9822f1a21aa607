"""The Flower driver gives a feature the sequential driver's meaning where the two used to differ: a node whose
ClientApp fails, nodes whose Flower ids do not follow their partition-ids (real Flower's are random), SecAgg's
weight scale in sampled rounds, and what ``downlink_bytes`` counts. Flower's real app code on a loopback grid."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from deltaplane.aggregation import FedAvg, FoolsGold, Validate
from deltaplane.codecs import Compressor
from deltaplane.engine import MemoryPublisher, RunConfig, ServerStep
from deltaplane.errors import ConfigError, InvalidUpdate, UnsupportedOption
from deltaplane.flower import DeltaStrategy, delta_mod, task_client_app, task_server_app
from deltaplane.flower.records import UPLINK_KEY, state_to_arrays
from deltaplane.sim import run_simulation

BASE = RunConfig(clients=3, rounds=2, local_epochs=1, lr=0.1)
#: node ids in another order than the partitions, like the random ids real Flower gives its nodes
SHUFFLED_IDS = [907, 113, 505, 42]


def _flower(cfg: RunConfig, loopback_grid, node_ids: list[int] | None = None):
    rounds, finals = [], {}
    server = task_server_app(
        cfg, on_round=lambda m, t: rounds.append((m, t)), on_done=lambda s, st: finals.update(st)
    )
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server(grid=loopback_grid(task_client_app(cfg), cfg.clients, node_ids), context=context)
    return [m for m, _ in rounds], [t for _, t in rounds], finals


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _fields(r) -> tuple:
    return (r.test_accuracy, r.clients, r.rejected, r.uplink_bytes, r.downlink_bytes)


def test_a_node_whose_client_app_fails_is_refused_and_counted_as_in_process(loopback_grid) -> None:
    # the attacker's 1e39-scaled update overflows to Inf: its compression raises InvalidUpdate on the node
    cfg = BASE.replace(attack="sign_flip(0.34, scale=1e39)")
    seq = run_simulation(cfg)
    rounds, traffic, final = _flower(cfg, loopback_grid)
    assert [r.rejected for r in seq.rounds] == [1, 1]
    assert [_fields(r) for r in rounds] == [_fields(r) for r in seq.rounds]
    assert [t.rejected for t in traffic] == [1, 1]
    assert _same(seq.final_state, final)


def test_a_round_where_every_node_fails_raises_invalid_update_as_in_process(loopback_grid) -> None:
    cfg = BASE.replace(attack="sign_flip(0.99, scale=1e39)")
    with pytest.raises(InvalidUpdate, match="every update of the round was refused"):
        run_simulation(cfg)
    with pytest.raises(InvalidUpdate, match="every update of the round was refused") as raised:
        _flower(cfg, loopback_grid)
    assert "client 0" in str(raised.value) and "NaN or Inf" in str(raised.value)


def test_a_failing_node_under_secagg_is_refused_and_counted_as_in_process(loopback_grid) -> None:
    cfg = BASE.replace(clients=4, secagg=True, clip="2.0", attack="sign_flip(0.25, scale=1e39)")
    seq = run_simulation(cfg)
    rounds, _, final = _flower(cfg, loopback_grid)
    assert [r.rejected for r in seq.rounds] == [1, 1]
    assert [_fields(r)[:3] for r in rounds] == [_fields(r)[:3] for r in seq.rounds]
    assert _same(seq.final_state, final)


def _const_app(values: dict[int, bytes | float | torch.Tensor]) -> ClientApp:
    """Node *i* answers with the update +values[i] (a float or a tensor), or with the raw uplink bytes values[i]."""

    def garble(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        value = values[int(context.node_config["partition-id"])]
        if isinstance(value, bytes):  # outside delta_mod: replace its payload on the way out
            reply.content.config_records[UPLINK_KEY]["payload"] = value
        return reply

    app = ClientApp(mods=[garble, delta_mod(codec="identity")])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        value = values[int(context.node_config["partition-id"])]
        state = msg.content.array_records["arrays"].to_torch_state_dict()
        arrays = ArrayRecord({k: v + (0.0 if isinstance(value, bytes) else value) for k, v in state.items()})
        return Message(
            RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg
        )

    return app


def _standalone(
    loopback_grid, values: dict[int, bytes | float | torch.Tensor], aggregator=None, *, step=None
):
    """One round of a DeltaStrategy over ``values`` (see :func:`_const_app`): standalone with ``aggregator``,
    or through the server step ``step(initial_state)`` builds."""
    state = {"w": torch.zeros(4, 5)}
    inner = FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=len(values))
    if step is not None:
        strategy = DeltaStrategy(inner=inner, server_step=step(state), base_id="m")
    else:
        strategy = DeltaStrategy(
            inner=inner, aggregator=aggregator if aggregator is not None else FedAvg(), base_id="m"
        )
    result = strategy.start(
        loopback_grid(_const_app(values), len(values)), state_to_arrays(state), num_rounds=1
    )
    return strategy, result


def test_a_standalone_strategy_refuses_an_undecodable_payload_and_goes_on(loopback_grid) -> None:
    strategy, result = _standalone(loopback_grid, {0: 1.0, 1: b"not a payload", 2: 3.0})
    assert torch.equal(result.arrays.to_torch_state_dict()["w"], torch.full((4, 5), 2.0))  # (1 + 3) / 2
    assert strategy.traffic[-1].rejected == 1 and strategy.traffic[-1].clients == 3
    assert result.train_metrics_clientapp[1]["rejected"] == 1


def test_a_standalone_strategy_counts_what_its_aggregator_refuses(loopback_grid) -> None:
    strategy, result = _standalone(
        loopback_grid, {0: 1.0, 1: 1e6, 2: 3.0}, Validate(FedAvg(), max_norm=100.0)
    )
    assert torch.equal(result.arrays.to_torch_state_dict()["w"], torch.full((4, 5), 2.0))
    assert strategy.traffic[-1].rejected == 1
    assert result.train_metrics_clientapp[1]["clients"] == 2


def test_a_standalone_strategy_tells_its_chain_who_sent_each_update_as_the_server_step_does(
    loopback_grid,
) -> None:
    # FoolsGold refuses an update whose sender it is not told; honest updates point in different directions
    gen = torch.Generator().manual_seed(0)
    values = {i: torch.randn(4, 5, generator=gen) for i in range(3)}
    strategy, result = _standalone(loopback_grid, values, Validate(FoolsGold()))
    assert strategy.traffic[-1].rejected == 0 and result.train_metrics_clientapp[1]["clients"] == 3
    assert sorted(strategy.aggregator.inner.state.history) == ["100", "101", "102"]  # the nodes' device ids

    def step(state: dict) -> ServerStep:
        publisher = MemoryPublisher(Compressor("identity"), "m")
        return ServerStep(Validate(FoolsGold()), publisher, state, base_id="m")

    _, by_step = _standalone(loopback_grid, values, step=step)
    assert torch.allclose(
        result.arrays.to_torch_state_dict()["w"], by_step.arrays.to_torch_state_dict()["w"], atol=1e-6
    )


def _claiming_app(claims: dict[int, object]) -> ClientApp:
    """Node *i* moves every weight by +(i + 1) and claims ``claims.get(i, 1)`` examples."""
    app = ClientApp(mods=[delta_mod(codec="identity")])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        state = msg.content.array_records["arrays"].to_torch_state_dict()
        arrays = ArrayRecord({k: v + (i + 1) for k, v in state.items()})
        metrics = MetricRecord({"num-examples": claims.get(i, 1)})  # type: ignore[dict-item]
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


@pytest.mark.parametrize(
    ("claim", "aggregator"),
    [(c, a) for c in (float("nan"), float("inf"), -5.0) for a in ("fedavg", "flower")] + [(1e308, "fedavg")],
)
def test_a_node_claiming_an_absurd_example_count_is_refused_alone(loopback_grid, claim, aggregator) -> None:
    """The weight is the node's claim: a NaN, infinite or negative one (or one that overflows FedAvg's sums)
    used to raise out of the bare aggregator and end the run for every node, or (negative) to go into the
    wrapped Flower strategy's mean; now only that node is refused, as the engine's server step refuses it."""
    inner = FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=3)
    strategy = DeltaStrategy(inner=inner, aggregator=FedAvg() if aggregator == "fedavg" else None)
    result = strategy.start(
        loopback_grid(_claiming_app({1: claim}), 3), state_to_arrays({"w": torch.zeros(2, 2)}), num_rounds=1
    )
    assert torch.equal(result.arrays.to_torch_state_dict()["w"], torch.full((2, 2), 2.0))  # (1 + 3) / 2
    assert strategy.traffic[-1].rejected == 1 and result.train_metrics_clientapp[1]["rejected"] == 1


@pytest.mark.parametrize("aggregator", ["fedavg", "flower"])
def test_a_node_claiming_more_examples_than_the_bound_is_refused_alone(loopback_grid, aggregator) -> None:
    """A finite claim is still the node's weight: one node claiming 10⁹ examples made the round's model its own
    update (w = 2 here instead of the honest mean). Above ``max_examples`` (the service's ``--max-examples``,
    same default) the node is refused alone, never clipped; a claim at the bound is taken."""
    inner = FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=3)
    strategy = DeltaStrategy(inner=inner, aggregator=FedAvg() if aggregator == "fedavg" else None)
    result = strategy.start(
        loopback_grid(_claiming_app({1: 1e9}), 3), state_to_arrays({"w": torch.zeros(2, 2)}), num_rounds=1
    )
    assert torch.equal(result.arrays.to_torch_state_dict()["w"], torch.full((2, 2), 2.0))  # (1 + 3) / 2
    assert strategy.traffic[-1].rejected == 1

    strategy = DeltaStrategy(inner=inner, max_examples=3)
    result = strategy.start(
        loopback_grid(_claiming_app({0: 3, 1: 1}), 3), state_to_arrays({"w": torch.zeros(2, 2)}), num_rounds=1
    )
    assert torch.equal(
        result.arrays.to_torch_state_dict()["w"], torch.full((2, 2), 1.6)
    )  # (3·1 + 2 + 3) / 5, the claim at the bound taken
    assert strategy.traffic[-1].rejected == 0


@pytest.mark.parametrize("bound", [0, 0.5, float("nan"), 2e12, True, "10"])
def test_a_strategy_refuses_an_unusable_example_bound(bound) -> None:
    with pytest.raises(ConfigError, match="max_examples must be a number"):
        DeltaStrategy(max_examples=bound)


def test_a_standalone_strategy_raises_when_every_reply_is_refused(loopback_grid) -> None:
    with pytest.raises(InvalidUpdate, match="every update of the round was refused"):
        _standalone(loopback_grid, {0: b"junk", 1: b"more junk"})


@pytest.mark.parametrize(
    "feature",
    [
        {"sample_fraction": 0.5},
        {"defense": "median"},
        {"secagg": True, "clip": "2.0", "sample_fraction": 0.5},
    ],
    ids=["sampled", "median-buckets", "secagg-sampled"],
)
def test_nodes_are_sampled_and_ordered_by_partition_id_not_by_flower_node_id(loopback_grid, feature) -> None:
    cfg = BASE.replace(clients=4, **feature)
    seq = run_simulation(cfg)
    rounds, _, final = _flower(cfg, loopback_grid, SHUFFLED_IDS)
    assert [_fields(r)[:3] for r in rounds] == [_fields(r)[:3] for r in seq.rounds]
    assert _same(seq.final_state, final)


def test_downlink_bytes_mean_the_round_payload_for_every_device_as_in_process(loopback_grid) -> None:
    cfg = BASE.replace(rounds=3, downlink_codec="topk(0.2) | quant(bits=8)")
    seq = run_simulation(cfg)
    rounds, traffic, _ = _flower(cfg, loopback_grid)
    assert [(r.downlink_bytes, r.cumulative_downlink_bytes) for r in rounds] == [
        (r.downlink_bytes, r.cumulative_downlink_bytes) for r in seq.rounds
    ]
    # what Flower really sent stays measured: the full model to every node on first contact
    assert traffic[0].downlink_message_bytes > seq.raw_update_bytes * cfg.clients


def test_a_client_app_for_real_supernodes_refuses_simulation_only_options() -> None:
    cfg = BASE.replace(attack="sign_flip(0.34)")
    with pytest.raises(UnsupportedOption, match="attack='sign_flip"):
        task_client_app(cfg, simulation=False)
    task_client_app(BASE, simulation=False)  # nothing simulation-only: a deployable app
    task_client_app(cfg)  # Flower's simulation engine (run_flower) simulates the attack, as in process


def test_the_example_flower_app_refuses_an_attack_on_its_supernodes(monkeypatch) -> None:
    """examples/flower-app is a deployable App: its SuperNodes answer an attack config with the typed refusal."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples" / "flower-app"))
    client_app = importlib.import_module("deltaplane_app.client_app")
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={"clients": 3, "attack": "sign_flip(0.34)"},
    )
    ask = Message(RecordDict(), dst_node_id=7, message_type="query.device")
    with pytest.raises(UnsupportedOption, match="runs only on simulated devices"):
        client_app.app(ask, context)


def _hostile_app(cfg: RunConfig) -> ClientApp:
    """A node that runs none of deltaplane's client code: it answers every train instruction with a CRC-valid
    frame of the instruction's base whose table declares conv1.weight as [3, 3, 1, 8] (the model's is
    [8, 1, 3, 3]), claiming 100 examples."""
    from flwr.app import ConfigRecord

    from deltaplane.codecs.fuzzing import parse, serialize
    from deltaplane.delta import Delta
    from deltaplane.engine import make_task
    from deltaplane.flower.digits import DEVICE_KEY
    from deltaplane.flower.records import CONTROL_KEY

    app = ClientApp()

    @app.query("device")
    def device(msg: Message, context: Context) -> Message:  # which device it claims: the server samples by it
        record = ConfigRecord({"partition-id": int(context.node_config["partition-id"])})
        return Message(RecordDict({DEVICE_KEY: record}), reply_to=msg)

    zeros = Delta.zeros_like(make_task(cfg).build_model(0).state_dict())

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        ctrl = msg.content.config_records[CONTROL_KEY]
        frame = Compressor("identity").compress(
            zeros, base_id=str(ctrl["base-id"]), base_version=int(ctrl["base-version"])
        )
        doc = parse(frame).doc
        doc["t"][0][2]["s"] = [3, 3, 1, 8]
        content = RecordDict(
            {
                UPLINK_KEY: ConfigRecord({"payload": serialize(doc)}),
                "metrics": MetricRecord({"num-examples": 100}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def test_a_hostile_node_sending_a_crc_valid_malformed_frame_is_refused_alone(loopback_grid) -> None:
    """A custom ClientApp that runs none of deltaplane's client code sends a well-formed, CRC-valid frame whose
    table lies about a shape: the server refuses that node's update (counted in ``rejected``), never crashes,
    and closes every round on the others, to the very weights of the sequential driver whose device sends the
    `malformed_frame` attack's bytes (and of the same driver through deltaplane's own forging mod)."""
    from deltaplane.engine import ClientStep, make_task

    cfg = BASE.replace(attack="malformed_frame(0.34)")
    seq = run_simulation(cfg)
    (bad,) = ClientStep(cfg, make_task(cfg), base_id="b").malicious
    honest, hostile = task_client_app(BASE), _hostile_app(BASE)

    def app(msg: Message, context: Context) -> Message:
        side = hostile if int(context.node_config["partition-id"]) == bad else honest
        return side(msg, context)

    rounds, finals = [], {}
    server = task_server_app(
        BASE, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: finals.update(st)
    )
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server(grid=loopback_grid(app, cfg.clients), context=context)
    assert [r.rejected for r in rounds] == [r.rejected for r in seq.rounds] == [1, 1]
    assert [(r.test_accuracy, r.clients) for r in rounds] == [
        (r.test_accuracy, r.clients) for r in seq.rounds
    ]
    assert _same(seq.final_state, finals)
    forged_rounds, _, forged_finals = _flower(cfg, loopback_grid)  # the library's own forging mod
    assert [_fields(r) for r in forged_rounds] == [_fields(r) for r in seq.rounds]
    assert _same(seq.final_state, forged_finals)


def test_client_eval_every_scores_the_devices_on_the_rounds_the_sequential_engine_scores(
    loopback_grid,
) -> None:
    """``client_eval_every=2`` over 3 rounds: the devices' held-out fields on rounds 2 and 3 (the last), NaN on
    round 1, as in process; the test set every round; the same model."""
    cfg = BASE.replace(rounds=3, client_eval_every=2)
    seq = run_simulation(cfg)
    rounds, _, final = _flower(cfg, loopback_grid)
    fields = ("test_accuracy", "client_accuracy_mean", "client_accuracy_min", "client_accuracy_max")
    as_text = [[repr(getattr(r, f)) for f in fields] for r in rounds]  # NaN == NaN as text
    assert as_text == [[repr(getattr(r, f)) for f in fields] for r in seq.rounds]
    assert [r.round for r in rounds if r.client_accuracy_mean == r.client_accuracy_mean] == [2, 3]
    assert _same(seq.final_state, final)


@pytest.mark.parametrize("aggregator", ["fedadam", "fedavgm"])
def test_a_standalone_strategy_refuses_server_lr_with_a_server_optimizer_as_every_driver_does(
    aggregator,
) -> None:
    # build_aggregator (sequential, batched, population, HTTP, task_server_app) refuses the pair; the standalone
    # strategy scaled the optimizer's step by server_lr instead
    from deltaplane.aggregation import build_aggregator

    with pytest.raises(ConfigError, match="server_lr=0.5 is FedAvg's server step"):
        build_aggregator(aggregator=aggregator, server_lr=0.5)
    chain = build_aggregator(aggregator=aggregator)
    with pytest.raises(ConfigError, match="server_lr=0.5 is FedAvg's server step"):
        DeltaStrategy(aggregator=chain, server_lr=0.5)
    DeltaStrategy(aggregator=chain)  # its own lr: accepted
    DeltaStrategy(aggregator=Validate(FedAvg()), server_lr=0.5)  # FedAvg's server step: accepted
