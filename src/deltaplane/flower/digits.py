"""A run's task as a Flower app: the same devices, model, seeds and client/server steps as ``deltaplane run``.

:func:`task_client_app` and :func:`task_server_app` are thin Flower drivers over the engine: a node with
``partition-id`` *i* is device *i* of :func:`deltaplane.engine.build_clients`, and its train handler runs the
engine's client step (:class:`~deltaplane.engine.ClientStep`: train with FedProx, [attack], clip / local DP)
with the same generator ``(seed, LOCAL_TRAINING, round, i)``; :func:`~deltaplane.flower.delta_mod`
compresses with the same codec seed. The server runs the engine's server step
(:class:`~deltaplane.engine.ServerStep`: the whole aggregator chain, FLTrust's reference, the downlink)
inside :class:`~deltaplane.flower.DeltaStrategy`. A run on Flower differs from the in-process one only in how
messages travel. ``digits_client_app`` / ``digits_server_app`` are the same functions (digits is the
default task).
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

from deltaplane.aggregation import local_epsilon
from deltaplane.engine import (
    Client,
    ClientStep,
    RoundMetrics,
    RunConfig,
    ServerStep,
    Task,
    build_clients,
    evaluate_clients,
    make_task,
    round_scores,
)
from deltaplane.engine.scoring import backdoor_success
from deltaplane.engine.seeding import Stream, derive_seed
from deltaplane.flower.mod import delta_mod
from deltaplane.flower.records import DELTA_KEY, arrays_to_state, state_to_arrays
from deltaplane.flower.secagg import SecAggStrategy, add_secagg, secagg_mod
from deltaplane.flower.strategy import DeltaStrategy, RoundTraffic

__all__ = ["BASE_ID", "digits_client_app", "digits_server_app", "task_client_app", "task_server_app"]

#: The model lineage in payload headers: the in-process drivers' (so payloads have the same length).
BASE_ID = "sim/digits-cnn"

# One federation per process: Ray reuses its actors, so each builds the devices once per config.
_FEDERATIONS: dict[str, tuple[Task, list[Client], ClientStep]] = {}


def _federation(config: RunConfig) -> tuple[Task, list[Client], ClientStep]:
    key = config.model_dump_json()
    if key not in _FEDERATIONS:
        _FEDERATIONS.clear()
        task = make_task(config)
        _FEDERATIONS[key] = (task, build_clients(config, task), ClientStep(config, task, base_id=BASE_ID))
    return _FEDERATIONS[key]


def task_client_app(config: RunConfig) -> ClientApp:
    """A ClientApp that runs the engine's client step on device ``partition-id``, behind :func:`delta_mod`.

    Partner: :func:`task_server_app`. The handler reads the ``arrays`` and the ``server-round`` config and
    returns the trained ``arrays`` with ``num-examples`` (plain Flower), or, when a later stage changed the
    update (local DP, an attack), the update itself under ``DELTA_KEY``; compression is the mod's job.
    """
    # the node's uplink is compact like the in-process engine's (the server step derives the same session);
    # under SecAgg the payload never leaves the node (it masks the decoded update), so it stays self-describing
    wire = "self-describing" if config.secagg else config.wire
    mods = [
        delta_mod(
            codec=config.codec,
            error_feedback=config.error_feedback,
            seed=config.seed,
            wire=wire,
            entropy_coding=config.entropy_coding,
            dgc=config.make_dgc(),
        )
    ]
    if config.secagg:  # the node masks the ring codes of its own decoded payload; only those leave it
        mods.insert(0, secagg_mod(seed=config.seed))
    app = ClientApp(mods=mods)
    if config.secagg:
        add_secagg(app)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(config.threads)
        task, clients, step = _federation(config)
        client = clients[int(context.node_config["partition-id"])]
        rnd = int(msg.content.config_records["config"]["server-round"])
        state = arrays_to_state(msg.content.array_records["arrays"])
        model = task.build_model(0)  # scratch module: training overwrites its weights
        delta = step.train(client, model, state, rnd)
        final = step.transform(client, delta, model=model, global_state=state, rnd=rnd)
        content = RecordDict({"metrics": MetricRecord({"num-examples": client.num_samples})})
        if final is delta:
            # The trained weights themselves, not start + delta: the mod's delta is then bit-identical to the
            # one the in-process drivers compute.
            content["arrays"] = state_to_arrays(model.state_dict())
        else:
            content[DELTA_KEY] = state_to_arrays(dict(final))
        return Message(content, reply_to=msg)

    return app


def task_server_app(
    config: RunConfig,
    *,
    on_round: Callable[[RoundMetrics, RoundTraffic], None] | None = None,
    on_done: Callable[[DeltaStrategy, dict[str, torch.Tensor]], None] | None = None,
) -> ServerApp:
    """A ServerApp running ``config.rounds`` rounds of the engine's server step over the task's nodes.

    Partner: :func:`task_client_app`. Flower's ``FedAvg`` samples ``config.sample_fraction`` of the nodes
    (all of them by default); :class:`DeltaStrategy` runs :class:`~deltaplane.engine.ServerStep` on the
    replies. After every round the global model is scored centrally on the test set and on every device's
    held-out shard, as the in-process drivers do.

    Args:
        config: the run (``config.clients`` must equal the number of SuperNodes).
        on_round: called after each round with its metrics and measured traffic.
        on_done: called with the strategy and the final global weights.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(config.threads)
        task, clients, step = _federation(config)
        model = task.build_model(derive_seed(config.seed, Stream.MODEL_INIT))
        initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        options = dict(
            inner=FlowerFedAvg(
                fraction_train=config.sample_fraction,
                fraction_evaluate=0.0,
                min_train_nodes=1,
                min_available_nodes=config.clients,
            ),
            server_step=ServerStep.for_run(config, task, initial_state, base_id=BASE_ID),
            base_id=BASE_ID,
        )
        if config.secagg:
            # SecAgg's stages travel as Flower messages; the public weight scale is the mean example count
            # of the devices (with every device taking part, the in-process drivers' scale)
            strategy: DeltaStrategy = SecAggStrategy(
                bits=config.secagg_bits,
                clip_range=config.secagg_range,
                weight_scale=float(np.mean([c.num_samples for c in clients])),
                **options,
            )
        else:
            strategy = DeltaStrategy(**options)
        initial = state_to_arrays(initial_state)
        cum = {"up": 0, "down": 0}
        clock = [time.perf_counter()]
        sampled: dict[int, int] = {}  # rounds each node trained in (local DP: its ε grows with them)

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
            if rnd == 0:
                clock[0] = time.perf_counter()
                return None
            model.load_state_dict(arrays_to_state(arrays))
            traffic = strategy.traffic[-1]
            outcome = strategy.last_outcome
            assert outcome is not None
            for node in traffic.node_ids:
                sampled[node] = sampled.get(node, 0) + 1
            cum["up"] += traffic.uplink_payload_bytes
            cum["down"] += traffic.downlink_message_bytes
            client_acc = evaluate_clients(model, clients)
            epsilon = outcome.measurements.get("epsilon")
            if config.local_dp_noise > 0:
                epsilon = local_epsilon(
                    noise_multiplier=config.local_dp_noise,
                    rounds=max(sampled.values()),
                    delta=config.dp_delta,
                )
            metrics = RoundMetrics(
                round=rnd,
                clients=traffic.clients,
                **round_scores(model, task.test, client_acc),
                uplink_bytes=traffic.uplink_payload_bytes,
                downlink_bytes=traffic.downlink_message_bytes,
                cumulative_uplink_bytes=cum["up"],
                cumulative_downlink_bytes=cum["down"],
                seconds=time.perf_counter() - clock[0],
                epsilon=epsilon,
                rejected=len(outcome.rejections),
                backdoor_success=backdoor_success(model, task.test, getattr(step.attack, "target", None)),
                clipped_fraction=outcome.measurements.get("clipped_fraction"),
            )
            clock[0] = time.perf_counter()
            if on_round is not None:
                on_round(metrics, traffic)
            return MetricRecord({"test-accuracy": metrics.test_accuracy})

        result = strategy.start(grid, initial, num_rounds=config.rounds, evaluate_fn=evaluate)
        if on_done is not None:
            on_done(strategy, arrays_to_state(result.arrays))

    return app


#: The default task is digits; these names predate the task abstraction.
digits_client_app = task_client_app
digits_server_app = task_server_app
