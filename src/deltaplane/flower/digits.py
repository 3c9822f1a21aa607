"""The default digits federation as a Flower app: the same data partition, model and seeds as ``deltaplane run``.

:func:`digits_client_app` and :func:`digits_server_app` build Flower apps around the in-process engine's
pieces (:func:`deltaplane.sim.make_clients`, :class:`~deltaplane.sim.DigitsCNN`, the seeded streams of
:mod:`deltaplane.sim.seeding`), so a run on Flower differs from the in-process one only in how messages
travel. Node ``partition-id`` *i* is client *i* of the in-process engine; it trains with the same generator
``(seed, LOCAL_TRAINING, round, i)`` and compresses with the same codec seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from deltaplane.data.digits import Dataset
from deltaplane.flower.mod import delta_mod
from deltaplane.flower.records import arrays_to_state, state_to_arrays
from deltaplane.flower.secagg import SecAggStrategy, add_secagg, secagg_mod
from deltaplane.flower.strategy import DeltaStrategy, RoundTraffic
from deltaplane.sim.client import Client, evaluate_clients, make_clients, round_scores
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import build_model
from deltaplane.sim.seeding import Stream, derive_seed, torch_generator
from deltaplane.sim.simulation import BASE_ID, RoundMetrics, federation_data

__all__ = ["digits_client_app", "digits_server_app"]

# One partition per process: Ray reuses its actors, so each builds the federation's shards once per config.
_FEDERATIONS: dict[str, tuple[list[Client], Dataset]] = {}


def _federation(config: RunConfig) -> tuple[list[Client], Dataset]:
    key = config.model_dump_json()
    if key not in _FEDERATIONS:
        _FEDERATIONS.clear()
        train, test = federation_data(config)
        _FEDERATIONS[key] = (make_clients(config, train), test)
    return _FEDERATIONS[key]


def digits_client_app(config: RunConfig) -> ClientApp:
    """A ClientApp that trains client ``partition-id`` of the digits federation, behind :func:`delta_mod`.

    Partner: :func:`digits_server_app`. The train handler is plain Flower: it reads the ``arrays`` and the
    ``server-round`` config, and returns the trained ``arrays`` with ``num-examples``; compression is
    entirely the mod's job.
    """
    # with SecAgg the node clips before it compresses (as the engine's client step does), and secagg_mod
    # turns the compressed update into the node's masked input
    clip = float(config.clip) if config.secagg and config.clip is not None else None
    mods = [delta_mod(codec=config.codec, error_feedback=config.error_feedback, seed=config.seed, clip=clip)]
    if config.secagg:
        mods.insert(0, secagg_mod(seed=config.seed))
    app = ClientApp(mods=mods)
    if config.secagg:
        add_secagg(app)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(config.threads)
        cid = int(context.node_config["partition-id"])
        client = _federation(config)[0][cid]
        rnd = int(msg.content.config_records["config"]["server-round"])
        state = arrays_to_state(msg.content.array_records["arrays"])
        model = build_model(0)  # scratch module: local_update overwrites its weights
        gen = torch_generator(config.seed, Stream.LOCAL_TRAINING, rnd, cid)
        client.local_update(model, state, config, gen, lr=config.client_lr(rnd))
        # The trained weights themselves, not start + delta: the mod's delta is then bit-identical to the
        # one the in-process engine computes.
        content = RecordDict(
            {
                "arrays": state_to_arrays(model.state_dict()),
                "metrics": MetricRecord({"num-examples": client.num_samples}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def digits_server_app(
    config: RunConfig,
    *,
    on_round: Callable[[RoundMetrics, RoundTraffic], None] | None = None,
    on_done: Callable[[DeltaStrategy, dict[str, torch.Tensor]], None] | None = None,
) -> ServerApp:
    """A ServerApp running ``config.rounds`` rounds of :class:`DeltaStrategy` over the digits nodes.

    Partner: :func:`digits_client_app`. Flower's ``FedAvg`` samples ``config.sample_fraction`` of the nodes
    (all of them by default) and ``config.build_aggregator()`` aggregates (FedAvg by default; server
    optimizers, DP, clipping and robust defenses as configured). After every round the global model is
    scored centrally on the test set and on every client's held-out shard, as the in-process engine does.

    Args:
        config: the run (``config.clients`` must equal the number of SuperNodes).
        on_round: called after each round with its metrics and measured traffic.
        on_done: called with the strategy and the final global weights.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(config.threads)
        clients, test = _federation(config)
        options = dict(
            inner=FlowerFedAvg(
                fraction_train=config.sample_fraction,
                fraction_evaluate=0.0,
                min_train_nodes=1,
                min_available_nodes=config.clients,
            ),
            # The same chain as the in-process engine: validation, server optimizer, DP, clipping, defense.
            aggregator=config.build_aggregator(seed=derive_seed(config.seed, Stream.AGGREGATION) % 2**31),
            downlink_codec=config.downlink_codec,
            downlink_error_feedback=config.downlink_error_feedback,
            server_lr=config.server_lr,
            seed=derive_seed(config.seed, Stream.DOWNLINK_CODEC),
            base_id=BASE_ID,
        )
        if config.secagg:
            # the public weight scale: the mean example count of the devices (the server knows every count,
            # as plain FedAvg does; with full participation it is the in-process engine's scale)
            strategy: DeltaStrategy = SecAggStrategy(
                bits=config.secagg_bits,
                clip_range=config.secagg_range,
                weight_scale=float(np.mean([c.num_samples for c in clients])),
                **options,
            )
        else:
            strategy = DeltaStrategy(**options)
        model = build_model(derive_seed(config.seed, Stream.MODEL_INIT))
        initial = state_to_arrays(model.state_dict())
        cum = {"up": 0, "down": 0}
        clock = [time.perf_counter()]

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
            if rnd == 0:
                clock[0] = time.perf_counter()
                return None
            model.load_state_dict(arrays_to_state(arrays))
            traffic = strategy.traffic[-1]
            cum["up"] += traffic.uplink_payload_bytes
            cum["down"] += traffic.downlink_message_bytes
            client_acc = evaluate_clients(model, clients)
            metrics = RoundMetrics(
                round=rnd,
                clients=traffic.clients,
                **round_scores(model, test, client_acc),
                uplink_bytes=traffic.uplink_payload_bytes,
                downlink_bytes=traffic.downlink_message_bytes,
                cumulative_uplink_bytes=cum["up"],
                cumulative_downlink_bytes=cum["down"],
                seconds=time.perf_counter() - clock[0],
            )
            clock[0] = time.perf_counter()
            if on_round is not None:
                on_round(metrics, traffic)
            return MetricRecord({"test-accuracy": metrics.test_accuracy})

        result = strategy.start(grid, initial, num_rounds=config.rounds, evaluate_fn=evaluate)
        if on_done is not None:
            on_done(strategy, arrays_to_state(result.arrays))

    return app
