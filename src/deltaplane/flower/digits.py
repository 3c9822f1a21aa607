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

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from deltaplane.aggregation import local_epsilon
from deltaplane.aggregation.secagg.identity import TrustedAuthorities
from deltaplane.aggregation.secagg.revocation import RevocationList
from deltaplane.codecs import Layout, is_compact
from deltaplane.delta import Delta
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
    sample_clients,
)
from deltaplane.engine.admission import examples_bound
from deltaplane.engine.attacks import parse_attack
from deltaplane.engine.client import require_simulation
from deltaplane.engine.divergence import DivergenceWatch
from deltaplane.engine.results import budget_stop
from deltaplane.engine.scoring import backdoor_success, dp_adjacency, personal_row, personal_summary
from deltaplane.engine.secure import secure_weight_scale
from deltaplane.engine.seeding import Stream, derive_seed, numpy_rng
from deltaplane.errors import ConfigError, DeltaplaneError, PrivacyBudgetExceeded
from deltaplane.flower.mod import delta_mod
from deltaplane.flower.records import (
    DELTA_KEY,
    UPLINK_KEY,
    arrays_to_state,
    as_bytes,
    as_float,
    as_int,
    personal_from_bytes,
    personal_to_bytes,
    state_to_arrays,
)
from deltaplane.flower.secagg import SecAggStrategy, add_secagg, secagg_mod
from deltaplane.flower.strategy import DeltaStrategy, RoundTraffic
from deltaplane.personalization import PersonalState

__all__ = ["BASE_ID", "digits_client_app", "digits_server_app", "task_client_app", "task_server_app"]

#: The model lineage in payload headers: the in-process drivers' (so payloads have the same length).
BASE_ID = "sim/digits-cnn"

#: Key of the device's personal state in its node's ``Context.state`` (node-persistent across rounds).
_PERSONAL_STATE = "deltaplane.personal"
_ROW_KEYS = ("global_accuracy", "personal_accuracy", "alpha")


class FlowerRunError(DeltaplaneError):
    """The Flower run ended without completing every round (see Flower's log for the cause)."""


#: Flower message type asking a node which device it runs (its ``partition-id``); answered by the task's ClientApp
DEVICE_QUERY = "query.device"
#: ConfigRecord of the answer: ``partition-id``
DEVICE_KEY = "deltaplane.device"


class SeededSampling(FlowerFedAvg):
    """Flower's ``FedAvg`` choosing a round's nodes as every deltaplane driver chooses devices.

    Flower gives nodes ids of its own (random on its real engines), so before its first draw the sampler asks
    every node which device it runs (a :data:`DEVICE_QUERY` message; :attr:`devices` maps node id → device id).
    The run's ``clients`` devices (device ids ``0 … clients − 1``, the population ``N`` whose rate ``q = m / N``
    the accountant composes) are drawn by :func:`~deltaplane.engine.sample_clients` from the run's
    ``(seed, CLIENT_SAMPLING, round)`` stream: Poisson sampling at the accountant's rate under central DP (what
    its ε assumes; Flower's own sampler takes a fixed-size subset), else ``round(fraction · N)`` devices without
    replacement; each chosen device's node is sent the round. A round may then choose nobody; the server step
    still releases its DP noise. The draw is over the devices, never over however many nodes are connected: a
    draw over ``N' ≠ N`` nodes samples each device at ``round(fraction · N') / N'`` (3/11 for 10 devices at
    fraction 0.25 and one extra node, against the accountant's 2/10), so a node outside the devices is refused.

    Args:
        seed: seed of the sampling stream.
        central_dp: whether the server adds DP noise (Poisson sampling).
        clients: the run's number of devices (``config.clients``); defaults to ``min_available_nodes``.
        kwargs: Flower ``FedAvg``'s (``fraction_train``, ``min_available_nodes``...).
    """

    def __init__(self, *, seed: int, central_dp: bool, clients: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.central_dp = central_dp
        self.clients = self.min_available_nodes if clients is None else clients
        if isinstance(self.clients, bool) or not (isinstance(self.clients, int) and self.clients >= 1):
            raise ConfigError(f"clients must be a positive integer. Found {self.clients!r}")
        #: node id → device id (``partition-id``), learned from the nodes themselves
        self.devices: dict[int, int] = {}

    def learn_devices(self, grid: Grid, nodes: list[int]) -> None:
        """Ask the nodes not yet known which device they run.

        Raises:
            FlowerRunError: a node did not answer with a device id, claims a device outside the run's
                ``clients``, or two nodes claim the same device.
        """
        unknown = [n for n in nodes if n not in self.devices]
        if not unknown:
            return
        asks = [Message(RecordDict(), dst_node_id=n, message_type=DEVICE_QUERY) for n in unknown]
        for reply in grid.send_and_receive(asks):
            node = reply.metadata.src_node_id
            if reply.has_error() or DEVICE_KEY not in reply.content.config_records:
                why = reply.error.reason if reply.has_error() else "no device record"
                raise FlowerRunError(f"node {node} did not say which device it runs ({why})")
            self.devices[node] = as_int(reply.content.config_records[DEVICE_KEY]["partition-id"])
        missing = [n for n in nodes if n not in self.devices]
        if missing:
            raise FlowerRunError(f"nodes {missing} did not say which device they run")
        claimed = [self.devices[n] for n in nodes]
        outside = sorted(d for d in claimed if not 0 <= d < self.clients)
        if outside:
            raise FlowerRunError(
                f"nodes claim partition-ids {outside}, outside the run's {self.clients} devices "
                f"(0 to {self.clients - 1}): the devices are sampled at the accountant's rate over the run's "
                "clients, so config.clients must equal the number of SuperNodes"
            )
        if len(set(claimed)) != len(claimed):
            raise FlowerRunError(f"two nodes run the same device (partition-ids {sorted(claimed)})")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        _, available = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        self.learn_devices(grid, list(available))
        node_of = {self.devices[n]: n for n in available}
        rng = numpy_rng(self.seed, Stream.CLIENT_SAMPLING, server_round)
        chosen = sample_clients(self.clients, self.fraction_train, rng, central_dp=self.central_dp)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        # a chosen device without a connected node drops out of the round, as a node that fails would
        nodes = [node_of[d] for d in chosen if d in node_of]
        return list(self._construct_messages(record, nodes, MessageType.TRAIN))


# One federation per process: Ray reuses its actors, so each builds the devices once per config.
_FEDERATIONS: dict[tuple[str, bool], tuple[Task, list[Client], ClientStep]] = {}


def _federation(config: RunConfig, *, simulation: bool = True) -> tuple[Task, list[Client], ClientStep]:
    key = (config.model_dump_json(), simulation)
    if key not in _FEDERATIONS:
        _FEDERATIONS.clear()
        task = make_task(config)
        step = ClientStep(config, task, base_id=BASE_ID, simulation=simulation)
        _FEDERATIONS[key] = (task, build_clients(config, task), step)
    return _FEDERATIONS[key]


def task_client_app(
    config: RunConfig,
    *,
    simulation: bool = True,
    node_configs: Mapping[int, Mapping[str, str]] | None = None,
) -> ClientApp:
    """A ClientApp that runs the engine's client step on device ``partition-id``, behind :func:`delta_mod`.

    Partner: :func:`task_server_app`. The handler reads the ``arrays`` and the ``server-round`` config and
    returns the trained ``arrays`` with ``num-examples`` (plain Flower), or, when a later stage changed the
    update (local DP, an attack), the update itself under ``DELTA_KEY``; compression is the mod's job.

    ``simulation=False`` is for SuperNodes that may be real devices (a deployed Flower App): options only a
    simulation may run on a device (an attack) are refused.

    Under ``config.secagg`` a node whose ``node_config`` names its SecAgg enrollment
    (:data:`~deltaplane.flower.secagg.NODE_CONFIG_KEYS`) takes only authenticated rounds
    (``task_server_app(..., authenticated=True)``, or ``config.secagg_authenticated``), and a node without one
    only the others: the node's enrollment decides, never the run config it was sent.

    ``node_configs``: partition-id → ``node_config`` entries each node of a *simulation* gets on top of its own
    (what ``flower-supernode --node-config`` gives a deployed one; Flower's simulation engine gives its virtual
    nodes only ``partition-id`` and ``num-partitions``): :func:`~deltaplane.flower.run_flower` passes each
    node's enrollment files of an authenticated run here.

    Raises:
        UnsupportedOption: ``simulation`` is False and ``config`` asks for a simulation-only option.
    """
    require_simulation(config, simulation=simulation)
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
    if config.attack and parse_attack(config.attack)[0].forges_frames:  # outermost: sends its own bytes
        mods.insert(0, _forged_frame_mod(config, simulation=simulation))
    if config.secagg:  # the node masks the ring codes of its own decoded payload; only those leave it

        def privacy(update: Delta, rnd: int, context: Context) -> Delta:  # distributed DP, on the node
            step = _federation(config, simulation=simulation)[2]
            return step.distributed_privacy(int(context.node_config["partition-id"]), update, rnd)

        mods.insert(0, secagg_mod(seed=config.seed, privacy=privacy if config.dp_noise > 0 else None))
    if node_configs is not None:  # outermost: every handler and mod sees the node's full node_config
        mods.insert(0, _node_config_mod(node_configs))
    app = ClientApp(mods=mods)
    if config.secagg:
        # distributed DP: never help unmask below m_min, nor encode into a ring that would clip the noise
        add_secagg(app, min_inputs=config.unmask_floor(), min_range=config.min_secagg_range())

    personalized = config.personalization != "none"

    @app.query("device")
    def device(msg: Message, context: Context) -> Message:
        """Which device this node runs (its ``partition-id``): the server samples and orders by it."""
        record = ConfigRecord({"partition-id": int(context.node_config["partition-id"])})
        return Message(RecordDict({DEVICE_KEY: record}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(config.threads)
        task, clients, step = _federation(config, simulation=simulation)
        client = clients[int(context.node_config["partition-id"])]
        rnd = as_int(msg.content.config_records["config"]["server-round"])
        state = arrays_to_state(msg.content.array_records["arrays"])
        model = task.build_model(0)  # scratch module: training overwrites its weights
        if personalized:
            _load_personal(context, client)
        delta = step.train(client, model, state, rnd)
        final = step.transform(client, delta, model=model, global_state=state, rnd=rnd)
        if personalized:  # FedPer's head, FedBN's norms: kept on the node, never sent
            _save_personal(context, client)
        content = RecordDict({"metrics": MetricRecord({"num-examples": client.num_samples})})
        if final is delta:
            # The trained weights themselves, not start + delta: the mod's delta is then bit-identical to the
            # one the in-process drivers compute.
            content["arrays"] = state_to_arrays(model.state_dict())
        else:
            content[DELTA_KEY] = state_to_arrays(dict(final))
        return Message(content, reply_to=msg)

    if personalized:

        @app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:
            """The node adapts its personal state to the new global model (α-mix, Ditto), as every device does
            after a round in process, and reports its row of :func:`~deltaplane.engine.scoring.personal_row`
            (accuracies only: the personal model never leaves the node)."""
            torch.set_num_threads(config.threads)
            task, clients, step = _federation(config, simulation=simulation)
            client = clients[int(context.node_config["partition-id"])]
            rnd = as_int(msg.content.config_records["config"]["server-round"])
            state = arrays_to_state(msg.content.array_records["arrays"])
            model = task.build_model(0)
            _load_personal(context, client)
            step.after_round([client], model, state, rnd)
            _save_personal(context, client)
            row = personal_row(step, model, state, task.test, client, int(task.num_classes))
            metrics = {k: float(v) for k, v in row.items() if k != "client" and v is not None}
            record = MetricRecord({**metrics, "partition-id": client.cid, "num-examples": client.num_samples})
            return Message(RecordDict({"metrics": record}), reply_to=msg)

    return app


def _forged_frame_mod(config: RunConfig, *, simulation: bool) -> Mod:
    """A malicious node's uplink under a frame-forging attack (``malformed_frame``): :func:`delta_mod`
    compressed its update as an honest node does (error feedback included); this mod, outside it, replaces
    the payload with the attack's forged frame (:meth:`~deltaplane.engine.attacks.Attack.forge`), as
    :meth:`~deltaplane.engine.ClientStep.uplink` does in process. Partner: the server step's strict decode,
    which refuses it."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        task, _, step = _federation(config, simulation=simulation)
        if int(context.node_config["partition-id"]) not in step.malicious or UPLINK_KEY not in reply.content:
            return reply
        # delta_mod stores the payload as bytes (a ConfigRecord value's type is a union of every kind it holds)
        payload = bytes(cast(bytes, reply.content.config_records[UPLINK_KEY]["payload"]))
        session = None
        if is_compact(payload):  # the session delta_mod framed it in: the shared tensors' (the server's too)
            model = task.build_model(0)
            session = step.sessions.get(Layout.of(model.state_dict()).without(step.left_out(model)))
        reply.content[UPLINK_KEY] = ConfigRecord({"payload": step.attack.forge(payload, session)})
        return reply

    mod.__name__ = mod.__qualname__ = "forged_frame_mod"
    return mod


def _node_config_mod(node_configs: Mapping[int, Mapping[str, str]]) -> Mod:
    """A ClientApp mod giving each simulated node its ``node_config`` entries from ``node_configs`` (by its
    ``partition-id``) before anything reads them: a simulation's stand-in for ``flower-supernode
    --node-config``. A node whose partition has none keeps its own (an unenrolled node, which then refuses an
    authenticated round, saying so)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        extra = node_configs.get(int(context.node_config["partition-id"]))
        if extra:
            context.node_config.update(extra)
        return call_next(msg, context)

    mod.__name__ = mod.__qualname__ = "node_config_mod"
    return mod


def _load_personal(context: Context, client: Client) -> None:
    """The device's personal state from its node's ``Context.state`` (a fresh one before its first round)."""
    saved = context.state.config_records.get(_PERSONAL_STATE)
    client.personal = personal_from_bytes(as_bytes(saved["state"])) if saved is not None else PersonalState()


def _save_personal(context: Context, client: Client) -> None:
    context.state[_PERSONAL_STATE] = ConfigRecord({"state": personal_to_bytes(client.personal)})


def task_server_app(
    config: RunConfig,
    *,
    on_round: Callable[[RoundMetrics, RoundTraffic], None] | None = None,
    on_done: Callable[[DeltaStrategy, dict[str, torch.Tensor]], None] | None = None,
    on_clients: Callable[[list[dict[str, Any]]], None] | None = None,
    on_stop: Callable[[str], None] | None = None,
    simulation: bool = True,
    authenticated: bool | None = None,
    revocations: RevocationList | str | None = None,
    enrollment_authority: TrustedAuthorities | str | None = None,
) -> ServerApp:
    """A ServerApp running ``config.rounds`` rounds of the engine's server step over the task's nodes.

    Partner: :func:`task_client_app`. Flower's ``FedAvg`` samples ``config.sample_fraction`` of the nodes
    (all of them by default); :class:`DeltaStrategy` runs :class:`~deltaplane.engine.ServerStep` on the
    replies. After every round the global model is scored centrally on the test set and on every device's
    held-out shard, as the in-process drivers do. With personalization every node is then sent the new model
    in an evaluate message: it adapts its personal state (kept in its ``Context.state``) and reports its
    accuracies, which make the round's personalization figures.

    Args:
        config: the run (``config.clients`` must equal the number of SuperNodes).
        on_round: called after each round with its metrics and measured traffic.
        on_done: called with the strategy and the final global weights.
        on_clients: with personalization, called after the last round with every device's row (global and
            personal accuracy on its label mix, α), as the nodes reported them.
        on_stop: called with the reason when the run stops early at its privacy budget (the server step
            refuses a round that would exceed it); ``on_done`` then gets the last released model.
        simulation: False for a deployed Flower App whose SuperNodes may be real devices: DP noise and DP
            client sampling then come from the OS CSPRNG, not from ``config.seed`` (unless
            ``config.dp_noise_source`` is ``"seeded"``).
        authenticated: under ``config.secagg``, authenticated SecAgg rounds
            (:class:`~deltaplane.flower.SecAggStrategy`'s ``authenticated``): every node must be enrolled in its
            own ``node_config`` (:data:`~deltaplane.flower.secagg.NODE_CONFIG_KEYS`), which
            :func:`task_client_app` reads. Without ``config.secagg`` it is a ConfigError. None (the default):
            ``config.secagg_authenticated``; False under it is a ConfigError (the run asks for authenticated
            rounds).
        revocations: the enrollment authority's revocation list (or its file) for authenticated rounds
            (:class:`~deltaplane.flower.SecAggStrategy`'s ``revocations``): a revoked node is left out of them.
        enrollment_authority: the authority's public key the list is verified under (``SecAggStrategy``'s).
    """
    if authenticated is None:
        authenticated = config.secagg_authenticated
    if (authenticated or revocations is not None) and not config.secagg:
        raise ConfigError(
            "authenticated=True (and revocations=) apply to SecAgg rounds; the run has none (set secagg=True)"
        )
    if not authenticated and config.secagg_authenticated:
        raise ConfigError(
            "authenticated=False, but the run asks for authenticated SecAgg rounds (secagg_authenticated); "
            "leave authenticated out, or set secagg_authenticated=False"
        )
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(config.threads)
        task, clients, step = _federation(config)
        model = task.build_model(derive_seed(config.seed, Stream.MODEL_INIT))
        initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        personal_rows: list[list[dict[str, Any]]] = []

        def personal_rows_of(contents: list[RecordDict], weighted_by: str) -> MetricRecord:
            # every node's row (the personal models stay on the nodes), in device order as in process
            # a node leaves out a figure its row does not have (FedPer's global: has_global_model)
            rows: list[dict[str, Any]] = [
                {
                    "client": as_int(m["partition-id"]),
                    **{k: as_float(m[k]) if k in m else None for k in _ROW_KEYS},
                }
                for m in (c.metric_records["metrics"] for c in contents)
            ]
            rows.sort(key=lambda r: r["client"])
            personal_rows.append(rows)
            # a new dict: a dict[str, float] is not a dict[str, MetricRecordValues] (dict is invariant)
            return MetricRecord({k: v for k, v in personal_summary(rows).items() if v is not None})

        personalized = config.personalization != "none"
        seeded = config.seeded_dp_noise(simulation=simulation) or config.dp_noise == 0
        sampling = SeededSampling(
            # under DP on real devices the draw must not be predictable from the config (secrets: OS CSPRNG)
            seed=config.seed if seeded else secrets.randbits(62),
            central_dp=config.dp_noise > 0,
            clients=config.clients,
            fraction_train=config.sample_fraction,
            # with personalization every node adapts to each new global model, as in process
            fraction_evaluate=1.0 if personalized else 0.0,
            min_train_nodes=1,
            min_evaluate_nodes=config.clients if personalized else 2,
            min_available_nodes=config.clients,
            evaluate_metrics_aggr_fn=personal_rows_of if personalized else None,
        )
        options: dict[str, Any] = dict(  # DeltaStrategy's keywords, shared with SecAggStrategy
            inner=sampling,
            # replies are aggregated in device order and refusals named by device, as in process
            device_ids=sampling.devices,
            server_step=ServerStep.for_run(
                config, task, initial_state, base_id=BASE_ID, simulation=simulation
            ),
            base_id=BASE_ID,
            # the task's partitions are known here: a node may claim its own partition's size, however large
            # (as in process), and no more than the default bound above the largest one
            max_examples=examples_bound(c.num_samples for c in clients),
        )
        if config.secagg:
            # SecAgg's stages travel as Flower messages; the public weight scale is the mean example count
            # of the round's sampled devices, as in process and over HTTP
            def weight_scale(nodes: list[int]) -> float:
                return secure_weight_scale(config, [clients[sampling.devices[n]].num_samples for n in nodes])

            strategy: DeltaStrategy = SecAggStrategy(
                bits=config.secagg_bits,
                clip_range=config.secagg_range,
                weight_scale=weight_scale,
                neighbours=config.secagg_neighbours,  # SecAgg+: each round's degree as in process
                authenticated=authenticated,
                revocations=revocations,
                enrollment_authority=enrollment_authority,
                **options,
            )
        else:
            strategy = DeltaStrategy(**options)
        initial = state_to_arrays(initial_state)
        # the whole test set, as each round's scoring, which hands the watch its loss (round_scores, below)
        watch = DivergenceWatch(task, initial_state, config=config, samples=None)
        cum = {"up": 0, "down": 0}
        clock = [time.perf_counter()]
        sampled: dict[int, int] = {}  # rounds each node trained in (local DP: its ε grows with them)

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
            if rnd == 0:
                clock[0] = time.perf_counter()
                return None
            state = arrays_to_state(arrays)
            model.load_state_dict(state)
            traffic = strategy.traffic[-1]
            outcome = strategy.last_outcome
            assert outcome is not None
            for node in traffic.node_ids:
                sampled[node] = sampled.get(node, 0) + 1
            # what every device needs to stay in sync, as the in-process drivers count it: the round's
            # payload per device (Flower sends it later, in chains; traffic.downlink_message_bytes says that)
            down = traffic.downlink_payload_bytes * len(clients)
            cum["up"] += traffic.uplink_payload_bytes
            cum["down"] += down
            # the devices' held-out data on the rounds config.client_eval_every names (NaN fields on the others)
            client_acc = evaluate_clients(model, clients) if config.scores_clients(rnd) else []
            personal: dict[str, Any] = {}
            if personalized:
                if len(personal_rows) != rnd or len(personal_rows[-1]) != len(clients):
                    got = len(personal_rows[-1]) if len(personal_rows) == rnd else 0
                    raise FlowerRunError(
                        f"round {rnd}: {got} of {len(clients)} nodes reported their personal evaluation"
                    )
                personal = personal_summary(personal_rows[-1])
                if on_clients is not None and rnd == config.rounds:
                    on_clients(personal_rows[-1])
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
                **watch.take(rnd, round_scores(model, task.test, client_acc, loss=task.loss)),
                uplink_bytes=traffic.uplink_payload_bytes,
                downlink_bytes=down,
                cumulative_uplink_bytes=cum["up"],
                cumulative_downlink_bytes=cum["down"],
                seconds=time.perf_counter() - clock[0],
                epsilon=epsilon,
                epsilon_vs_server=outcome.measurements.get("epsilon_vs_server"),
                dp_adjacency=dp_adjacency(config),
                rejected=len(outcome.rejections),
                backdoor_success=backdoor_success(model, task.test, getattr(step.attack, "target", None)),
                clipped_fraction=outcome.measurements.get("clipped_fraction"),
                **personal,
            )
            clock[0] = time.perf_counter()
            if on_round is not None:
                on_round(metrics, traffic)
            return MetricRecord({"test-accuracy": metrics.test_accuracy})

        try:
            result = strategy.start(grid, initial, num_rounds=config.rounds, evaluate_fn=evaluate)
            final = arrays_to_state(result.arrays)
        except PrivacyBudgetExceeded as exc:
            # the server step refused to release another round: the rounds done so far are the run
            reason = budget_stop(exc, len(strategy.traffic) + 1, len(strategy.traffic))
            if on_stop is not None:
                on_stop(reason)
            final = dict(strategy.global_state)
        if on_done is not None:
            on_done(strategy, final)

    return app


#: The default task is digits; these names predate the task abstraction.
digits_client_app = task_client_app
digits_server_app = task_server_app
