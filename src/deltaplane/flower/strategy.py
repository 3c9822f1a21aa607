"""Server side of deltaplane-in-Flower: a Strategy that decodes, aggregates and compresses with deltaplane.

Partner: :func:`deltaplane.flower.delta_mod` on every SuperNode. :class:`DeltaStrategy` wraps any Flower
strategy (``flwr.serverapp.strategy.FedAvg`` by default), which keeps choosing the nodes and building the
train config, and replaces what travels: the downlink is a deltaplane payload (or a chain of them, for a
node that missed rounds) instead of the full model, and the uplink is a compressed delta decoded strictly
with ``deltaplane.decompress(expect_base=...)``, so an update computed against another model version is
refused, never applied. Aggregation is a deltaplane :class:`~deltaplane.aggregation.Aggregator` (FedAvg, or
any DP / robust / server-optimizer wrapper around it), or, with ``aggregator=None``, the wrapped Flower
strategy's own ``aggregate_train`` fed with the decoded weights.

Bytes are counted from the real Flower messages: the payload lengths (comparable with the in-process
engine) and the full record sizes Flower reports (``Record.count_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Strategy

from deltaplane.aggregation import Aggregator, FedAvg, FedOpt, Validate
from deltaplane.aggregation.base import find_in_chain
from deltaplane.codecs import Codec, Compressor, Layout, decompress, get_codec, is_compact
from deltaplane.delta import Delta
from deltaplane.engine.admission import DEFAULT_MAX_EXAMPLES, check_examples, check_max_examples
from deltaplane.engine.server import RoundOutcome, ServerStep
from deltaplane.engine.wire import Sessions
from deltaplane.errors import ConfigError, DecodeError, DeltaplaneError, InvalidUpdate
from deltaplane.flower.records import (
    CONTROL_KEY,
    DOWNLINK_KEY,
    UPLINK_KEY,
    arrays_to_state,
    as_float,
    content_bytes,
    control,
    state_to_arrays,
)

__all__ = ["DeltaStrategy", "RoundTraffic"]


class _Default:
    """Marks an argument left out, where ``None`` means something else."""

    def __repr__(self) -> str:
        return "FedAvg()"


_DEFAULT = _Default()


@dataclass
class RoundTraffic:
    """What one round sent, measured on the Flower messages themselves."""

    round: int
    #: nodes sampled for the round (sent a train instruction), as ``RoundMetrics.clients`` counts devices
    clients: int
    #: summed lengths of the uplink wire payloads (what the in-process engine counts)
    uplink_payload_bytes: int
    #: summed sizes of the reply messages' records (payload plus Flower's metrics/config records)
    uplink_message_bytes: int
    #: summed sizes of the downlink messages really sent: payload chains, or full weights on a node's first
    #: contact (not ``RoundMetrics.downlink_bytes``, which charges every device this round's payload)
    downlink_message_bytes: int
    #: length of this round's downlink payload (what one node receives if it was in the last round)
    downlink_payload_bytes: int
    #: the nodes that answered the round (its update accepted or refused), in device order
    node_ids: list[int] = field(default_factory=list)
    #: nodes whose reply was refused (an error reply, an undecodable or invalid update)
    rejected: int = 0


class DeltaStrategy(Strategy):
    """A Flower Strategy whose updates travel as compressed deltaplane payloads both ways.

    Partner: :func:`deltaplane.flower.delta_mod` (client mod). Keyword-only hyperparameters, stored verbatim;
    the learned server state (global model, downlink residual, which version each node holds, traffic
    history) lives in attributes set by :meth:`start`.

    Args:
        inner: the Flower strategy that samples nodes and configures rounds (default: Flower ``FedAvg``
            with ``fraction_train=1``). Its ``configure_evaluate``/``aggregate_evaluate`` are used as is.
        aggregator: the deltaplane aggregator applied to the decoded deltas, weighted by each reply's
            ``weighted_by_key`` metric (default deltaplane ``FedAvg()``); ``None`` hands the decoded
            weights to ``inner.aggregate_train`` instead.
        downlink_codec: codec of the global update sent to nodes.
        uplink_codec: the nodes' codec, when they send compact frames (``delta_mod(wire="compact")``): the
            :class:`~deltaplane.codecs.WireSession` is derived from the global model's layout, this codec and
            ``base_id``, as the nodes derive it (with ``server_step``, its own config says instead).
        entropy_coding: the nodes' ``delta_mod(entropy_coding=...)`` (part of the session).
        downlink_error_feedback: keep the downlink compression error on the server.
        server_lr: scale of the aggregated delta applied to the global model (FedAvg's server step; refused
            with an ``aggregator`` holding a server optimizer, which takes its step from its own ``lr``, as
            :func:`~deltaplane.aggregation.build_aggregator` refuses it).
        seed: seeds the downlink compressor.
        base_id: the model lineage named in every payload's header.
        weighted_by_key: the reply MetricRecord entry that weighs a node's delta (Flower's convention).
        arrayrecord_key: the key of the model in instructions (Flower's convention).
        server_step: the engine's :class:`~deltaplane.engine.ServerStep` to run every round (decode +
            validate, the whole aggregator chain incl. FLTrust's reference, downlink compress); it replaces
            ``aggregator``, ``downlink_codec`` and ``server_lr``, which must then keep their defaults.
        device_ids: node id → device id (a task's ``partition-id``), a mapping the caller may fill later
            (:func:`~deltaplane.flower.task_server_app`'s sampler learns it before the first round). Replies
            are aggregated in device-id order and named by it, as the in-process drivers order and name
            devices; a node missing from it goes by its node id.
        max_examples: the largest example count (the ``weighted_by_key`` metric) a node may claim; a node
            claiming more is refused for the round, never clipped (the service's ``--max-examples``, with the
            same default). The claim is the node's weight in FedAvg: unbounded, one node claiming 10¹²
            examples makes the round's model its own update.

    A node whose ClientApp failed (an error reply), or whose reply cannot be decoded or is refused by the
    aggregator, is refused and counted (``rejected``); the round goes on without it, and a round where every
    reply was refused raises :class:`~deltaplane.errors.InvalidUpdate`, as in process.

    Example:
        >>> from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
        >>> from deltaplane.flower import DeltaStrategy
        >>> strategy = DeltaStrategy(inner=FlowerFedAvg(fraction_train=0.05), downlink_codec="quant(bits=8)")
    """

    def __init__(
        self,
        *,
        inner: Strategy | None = None,
        aggregator: Aggregator | _Default | None = _DEFAULT,
        downlink_codec: str | Codec = "identity",
        downlink_error_feedback: bool = True,
        server_lr: float = 1.0,
        seed: int = 0,
        base_id: str = "flower/global",
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        server_step: ServerStep | None = None,
        uplink_codec: str | Codec | None = None,
        entropy_coding: bool = True,
        device_ids: Mapping[int, int] | None = None,
        max_examples: float = DEFAULT_MAX_EXAMPLES,
    ) -> None:
        self.max_examples = check_max_examples(max_examples)
        if server_lr <= 0:
            raise ConfigError(f"server_lr must be positive. Found {server_lr}")
        if server_step is not None and (
            not isinstance(aggregator, _Default) or downlink_codec != "identity" or server_lr != 1.0
        ):
            raise ConfigError(
                "server_step brings its own chain and downlink; drop aggregator, downlink_codec and server_lr"
            )
        self.inner = inner if inner is not None else FlowerFedAvg(min_train_nodes=1, min_available_nodes=1)
        self.aggregator = FedAvg() if isinstance(aggregator, _Default) else aggregator
        optimizer = find_in_chain(self.aggregator, FedOpt)  # FedAdam, FedYogi, FedAdagrad, FedAvgM
        if server_lr != 1.0 and optimizer is not None:
            # build_aggregator refuses this pair on every other driver; here it scaled the optimizer's step
            raise ConfigError(
                f"server_lr={server_lr:g} is FedAvg's server step; {type(optimizer).__name__} takes its step "
                "from its own lr: drop server_lr or set the optimizer's lr"
            )
        self.downlink_codec = downlink_codec
        self.downlink_error_feedback = downlink_error_feedback
        self.server_lr = server_lr
        self.seed = seed
        self.base_id = base_id
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self._downlink = Compressor(downlink_codec, error_feedback=downlink_error_feedback, seed=seed)
        self._global: dict | None = None
        self._version = 0
        self._downlink_payloads: list[bytes] = []  # entry v takes version v to v + 1
        self._node_version: dict[int, int] = {}
        self.traffic: list[RoundTraffic] = []
        self.server_step = server_step
        #: compact uplinks (``delta_mod(wire="compact")``) decode in the session of the global model's layout
        #: and ``uplink_codec``; without it every uplink payload must be self-describing
        self.uplink_sessions = (
            Sessions(get_codec(uplink_codec).spec, base_id, entropy=entropy_coding)
            if uplink_codec is not None
            else Sessions("identity", base_id, compact=False)
        )
        #: the last round's outcome when a server step runs (measurements, rejections)
        self.last_outcome: RoundOutcome | None = None
        self.device_ids: Mapping[int, int] = device_ids if device_ids is not None else {}
        self._pending_down = self._pending_sampled = 0

    def device_id(self, node_id: int) -> int:
        """The device id of ``node_id`` (see ``device_ids``; the node id itself when unknown)."""
        return int(self.device_ids.get(node_id, node_id))

    def _client_id(self, m: Message) -> str:
        """How a reply's sender is named to the server step: its device id, as in process."""
        return str(self.device_id(m.metadata.src_node_id))

    @staticmethod
    def _failure(m: Message) -> InvalidUpdate:
        """Why an error reply brings no update: its node's ClientApp failed (Flower's error reason says how)."""
        return InvalidUpdate(
            f"node {m.metadata.src_node_id} sent no update: its ClientApp failed ({m.error.reason})"
        )

    def _upload(self, m: Message) -> tuple[bytes, float]:
        """A reply's uplink payload and weight.

        Raises:
            InvalidUpdate: the reply is an error (the node's ClientApp failed) or carries no payload or weight.
        """
        node = m.metadata.src_node_id
        if m.has_error():
            raise self._failure(m)
        try:
            payload = m.content.config_records[UPLINK_KEY]["payload"]
            weight = as_float(m.content.metric_records["metrics"][self.weighted_by_key])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidUpdate(
                f"node {node}'s reply holds no deltaplane payload and '{self.weighted_by_key}' metric "
                f"(is delta_mod in its ClientApp's mods?): {exc!r}"
            ) from exc
        if not isinstance(payload, bytes):
            raise InvalidUpdate(f"node {node}'s uplink payload is {type(payload).__name__}, not bytes")
        # the weight is the node's own claim: a NaN, infinite or negative one is that node's fault, refused here
        # so it cannot abort the round for everyone in the aggregator (or skew the wrapped Flower strategy's mean)
        if not (math.isfinite(weight) and weight >= 0):
            raise InvalidUpdate(
                f"node {node}'s '{self.weighted_by_key}' metric is {weight!r}; it must be a finite non-negative "
                "number (the node's example count)"
            )
        check_examples(weight, self.max_examples, fix="DeltaStrategy(max_examples=...)")
        return payload, weight

    def summary(self) -> None:
        """Log the configuration (Flower calls this when :meth:`start` begins)."""
        self.inner.summary()

    # -- training ----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let ``inner`` pick the nodes, then give each the downlink it needs to reach the current model."""
        if self._global is None:  # the first round's arrays are the initial model: version 0
            self._global = arrays_to_state(arrays)
        full = state_to_arrays(self._global)
        messages, self._pending_down = self._instruct(
            self.inner.configure_train(server_round, full, config, grid)
        )
        self._pending_sampled = len(messages)
        return messages

    def _instruct(self, instructions: Iterable[Message]) -> tuple[list[Message], int]:
        """``instructions`` with the full model replaced by the downlink chain each node needs (the full model
        on first contact), and the bytes they carry."""
        assert self._global is not None
        full = state_to_arrays(self._global)
        messages, size = [], 0
        for msg in instructions:
            node = msg.metadata.dst_node_id
            content = RecordDict({k: v for k, v in msg.content.items() if k != self.arrayrecord_key})
            start = self._node_version.get(node, -1)
            if start < 0:
                content[self.arrayrecord_key] = full
            elif start < self._version:  # a node already holding the current model is sent no payload
                content[DOWNLINK_KEY] = ConfigRecord({"payloads": self._downlink_payloads[start:]})
            content[CONTROL_KEY] = control(self.base_id, self._version, start)
            size += content_bytes(content)
            messages.append(Message(content, dst_node_id=node, message_type=msg.metadata.message_type))
        return messages, size

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every payload against the current version, aggregate, and compress the downlink.

        Raises:
            InvalidUpdate: every reply of the round was refused (an error reply counts as refused).
        """
        assert self._global is not None, "configure_train runs first"
        # A fixed order (the devices') makes the float sums, and so the run, independent of reply arrival order.
        replies = sorted(replies, key=lambda m: self.device_id(m.metadata.src_node_id))
        for m in replies:
            if m.has_error():  # its cached model is unknown now: send it the full model next time
                self._node_version.pop(m.metadata.src_node_id, None)
        if self.server_step is not None:
            # (a round that sampled nobody still closes the server step: DP releases its noise, as in process)
            return self._engine_round(server_round, replies)
        if not replies:
            return None, None
        base = (self.base_id, self._version)
        up_payload = up_msg = 0
        decoded: list[tuple[Delta, float, Message]] = []
        refused: list[tuple[str, DeltaplaneError]] = []
        for m in replies:
            try:
                payload, weight = self._upload(m)
            except InvalidUpdate as exc:  # a failed node is refused, the round goes on
                refused.append((self._client_id(m), exc))
                continue
            up_payload += len(payload)
            up_msg += content_bytes(m.content)
            session = self.uplink_sessions.get(Layout.of(self._global)) if is_compact(payload) else None
            try:
                # refused like any undecodable payload, not raised: b"DQ" from one hostile node aborted the round
                # for every node; when all nodes send compact frames the round's InvalidUpdate names the fix
                if is_compact(payload) and session is None:
                    raise DecodeError("a compact uplink payload: give DeltaStrategy the nodes' uplink_codec")
                delta = decompress(payload, expect_base=base, expect_layout=self._global, session=session)
            except DeltaplaneError as exc:  # one bad payload is refused, the round goes on
                refused.append((self._client_id(m), exc))
                continue
            decoded.append((delta, weight, m))

        accepted: list[Message] = []
        if self.aggregator is not None:
            self.aggregator.reset()
            for delta, weight, m in decoded:
                why = self._add(delta, weight, m)
                if why is not None:
                    refused.append((self._client_id(m), why))
                else:
                    accepted.append(m)
        else:
            accepted = [m for _, _, m in decoded]
        if not accepted:
            client, error = refused[0]
            raise InvalidUpdate(
                f"round {server_round}, client {client}: {error} (every update of the round was refused)"
            ) from error
        if self.aggregator is not None:
            update = self.aggregator.result()
            # The aggregator's own measurements (clip norm, noise, rejections...) travel as Flower metrics.
            measured = getattr(self.aggregator, "measurements", {}) or {}
            metrics: MetricRecord | None = MetricRecord(
                {
                    **{k: float(v) for k, v in measured.items() if isinstance(v, int | float)},
                    "clients": len(accepted),
                }
            )
        else:  # the wrapped Flower strategy averages full weights; give it what the nodes meant to send
            rebuilt = []
            for delta, _, m in decoded:
                content = RecordDict({k: v for k, v in m.content.items() if k != UPLINK_KEY})
                content[self.arrayrecord_key] = state_to_arrays(delta.apply(self._global))
                m.content = content  # the reply keeps its routing metadata; only what it carries changes
                rebuilt.append(m)
            new_arrays, metrics = self.inner.aggregate_train(server_round, rebuilt)
            if new_arrays is None:  # a Flower Strategy may return (None, None)
                raise ConfigError(
                    f"the wrapped Flower strategy {type(self.inner).__name__} returned no weights for round "
                    f"{server_round}: DeltaStrategy(aggregator=None) needs an inner strategy that averages them"
                )
            update = Delta.between(self._global, arrays_to_state(new_arrays))
        update = update * self.server_lr

        payload = self._downlink.compress(update, base_id=self.base_id, base_version=self._version)
        self._global = decompress(payload, expect_base=base, expect_layout=self._global).apply(self._global)
        answered = [m for m in replies if not m.has_error()]
        self._advance(server_round, answered, payload, up_payload, up_msg, rejected=len(refused))
        out = MetricRecord(dict(metrics) if metrics is not None else {})
        out["uplink-payload-bytes"] = up_payload
        out["rejected"] = len(refused)
        return state_to_arrays(self._global), out

    def _advance(
        self,
        server_round: int,
        ok: list[Message],
        payload: bytes,
        up_payload: int,
        up_msg: int,
        *,
        rejected: int,
    ) -> None:
        """Publish the round's downlink ``payload``: remember it, the version each node now holds (``ok``: the
        nodes that answered), the traffic."""
        self._downlink_payloads.append(payload)
        for m in ok:  # each holds the model it trained from; next time it needs the downlink from there on
            self._node_version[m.metadata.src_node_id] = self._version
        self._version += 1
        self.traffic.append(
            RoundTraffic(
                round=server_round,
                clients=self._pending_sampled,
                uplink_payload_bytes=up_payload,
                uplink_message_bytes=up_msg,
                downlink_message_bytes=self._pending_down,
                downlink_payload_bytes=len(payload),
                node_ids=[m.metadata.src_node_id for m in ok],
                rejected=rejected,
            )
        )

    def _add(self, delta: Delta, weight: float, m: Message) -> DeltaplaneError | None:
        """Fold ``m``'s decoded update into the standalone aggregator; the reason it was refused, or ``None``.

        A :class:`Validate` chain is told the sender's device id, as the server step tells it: FoolsGold and
        attribution refuse an update without it, and bucketing orders updates by it (a bare rule's ``add``
        takes no client id). A validating aggregator refuses by returning ``False`` (bad norm, NaN, stale
        base); a bare rule by raising (FedAvg's float64 overflow guard): either way only that node is refused,
        the round goes on, as :class:`Validate` and the engine's server step treat it."""
        assert self.aggregator is not None
        try:
            ok: bool | None  # a bare rule's add returns None
            if isinstance(self.aggregator, Validate):
                ok = self.aggregator.add(delta, weight=weight, client_id=self._client_id(m))
            else:
                ok = self.aggregator.add(delta, weight=weight)
        except InvalidUpdate as exc:
            return exc
        if ok is not False:
            return None
        said = getattr(self.aggregator, "rejections", None)
        return said[-1].error if said else InvalidUpdate("refused by the aggregator")

    def _engine_round(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The engine's server step over the replies: decode + validate, chain, downlink. A node that sent no
        usable reply is refused through the step, as in process a device whose client step failed."""
        step = self.server_step
        assert step is not None and self._global is not None
        step.open(server_round, version=self._version, state=self._global)
        up_msg = 0
        ok = []
        for m in replies:
            try:
                payload, weight = self._upload(m)
            except InvalidUpdate as exc:
                step.refuse(self._client_id(m), exc)
                continue
            up_msg += content_bytes(m.content)
            step.receive_payload(self._client_id(m), payload, weight)
            ok.append(m)  # refused or not, the node holds this round's base model now
        outcome = self.last_outcome = step.close()  # raises InvalidUpdate when every reply was refused
        return self._take_outcome(server_round, ok, outcome, up_msg)

    def _take_outcome(
        self, server_round: int, ok: list[Message], outcome: RoundOutcome, up_msg: int
    ) -> tuple[ArrayRecord, MetricRecord]:
        """A closed engine round: the new global model, its downlink, node versions, traffic and metrics."""
        self._global = outcome.state
        self._advance(
            server_round,
            ok,
            outcome.downlink_payload,
            outcome.uplink_bytes,
            up_msg,
            rejected=len(outcome.rejections),
        )
        out = MetricRecord(
            {k: float(v) for k, v in outcome.measurements.items() if isinstance(v, int | float)}
        )
        out["uplink-payload-bytes"] = outcome.uplink_bytes
        out["rejected"] = len(outcome.rejections)
        return state_to_arrays(self._global), out

    # -- evaluation: the wrapped strategy's, on the current global model -------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let ``inner`` pick the nodes; each is sent the downlink it needs to reach the current model, as for
        training (:func:`delta_mod` rebuilds the weights; a node's personalization adapts to them here)."""
        if self._global is None:
            return self.inner.configure_evaluate(server_round, arrays, config, grid)
        messages, size = self._instruct(self.inner.configure_evaluate(server_round, arrays, config, grid))
        if self.traffic and self.traffic[-1].round == server_round:
            self.traffic[-1].downlink_message_bytes += size
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Note which version each node now holds, then delegate to ``inner``."""
        replies = list(replies)
        for m in replies:
            if m.has_error():
                self._node_version.pop(m.metadata.src_node_id, None)
            else:
                self._node_version[m.metadata.src_node_id] = self._version
        return self.inner.aggregate_evaluate(server_round, replies)

    @property
    def global_state(self) -> dict:
        """The current global model (the last published version's weights)."""
        if self._global is None:
            raise ConfigError("no global model yet: the strategy has not started")
        return self._global

    @property
    def version(self) -> int:
        """The version of the current global model (the number of updates applied so far)."""
        return self._version
