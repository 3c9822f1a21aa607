"""Client side of deltaplane-in-Flower: a ClientApp mod that compresses what a node sends back.

Partner: :class:`deltaplane.flower.DeltaStrategy` in the ServerApp. The strategy sends each sampled node a
train instruction holding either the full global model (first contact) or the chain of compressed downlink
deltas since the version the node last saw; this mod rebuilds the global model from it, hands the wrapped
ClientApp an ordinary ``ArrayRecord`` to train from, and turns the ArrayRecord it returns (or the update
itself, when the ClientApp returns one under ``DELTA_KEY``: the engine's client step does after local DP or
an attack) into one
compressed :class:`~deltaplane.delta.Delta` payload (deltaplane's wire format) with error feedback. The
residual of that feedback, the codec's RNG state and the cached global model are per-device state kept in
the node's ``Context.state`` (node-persistent across rounds), never in the codec or the mod.

Place it last in ``ClientApp(mods=[...])`` so it sits next to the training function: other mods (logging,
local DP) then see the plain weights on the way in and the compressed payload on the way out.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from deltaplane.codecs import Codec, Compressor, Layout, decompress
from deltaplane.delta import Delta
from deltaplane.engine.dgc import DGC, NormHistory
from deltaplane.engine.seeding import Stream, derive_seed
from deltaplane.engine.wire import WIRE_FORMATS, Sessions
from deltaplane.errors import ConfigError, DecodeError, VersionMismatch
from deltaplane.flower.records import (
    CONTROL_KEY,
    DELTA_KEY,
    DOWNLINK_KEY,
    UPLINK_KEY,
    arrays_to_state,
    as_bytes,
    as_float,
    as_int,
    payload_of,
    state_from_bytes,
    state_to_arrays,
    state_to_bytes,
)
from deltaplane.registry.downlink import apply_payload

__all__ = ["delta_mod", "node_seed"]

#: Keys of the node's own state in ``Context.state``.
_COMPRESSOR_STATE = "deltaplane.compressor"
_GLOBAL_STATE = "deltaplane.global"
_GLOBAL_META = "deltaplane.global-meta"
_VELOCITY = "deltaplane.dgc-velocity"
_NORMS = "deltaplane.dgc-norms"


def node_seed(seed: int, context: Context) -> int:
    """The uplink codec seed of this node: the in-process simulator's seed for the same client.

    A simulated node is identified by its ``partition-id`` (the client index of the in-process engine), so
    both engines draw the same stochastic-rounding noise; a deployed node without one uses its node id.
    """
    key = context.node_config.get("partition-id", context.node_id)
    return derive_seed(seed, Stream.UPLINK_CODEC, int(key) % (1 << 62))


def delta_mod(
    *,
    codec: str | Codec,
    error_feedback: bool = True,
    seed: int = 0,
    arrayrecord_key: str = "arrays",
    seed_fn: Callable[[int, Context], int] = node_seed,
    wire: str = "self-describing",
    entropy_coding: bool = True,
    dgc: DGC | None = None,
) -> Mod:
    """A Flower client mod that sends the node's update as a compressed deltaplane payload.

    Partner: :class:`deltaplane.flower.DeltaStrategy` (server side), which decodes the payload with
    ``deltaplane.decompress(expect_base=...)`` and compresses the downlink this mod decodes.

    ``train`` messages are rebuilt and answered with a payload; ``evaluate`` messages from the strategy are
    rebuilt the same way (the node evaluates, and personalizes, on the current global model) and answered
    as they are; ``query`` messages, and any without deltaplane's control record, pass through unchanged.

    Args:
        codec: uplink codec spec or object, e.g. ``"topk(0.01) | quant(bits=8)"``.
        error_feedback: keep what the codec dropped in the node's state and send it in a later round.
        seed: run seed; each node's codec seed is ``seed_fn(seed, context)``.
        arrayrecord_key: the key under which the wrapped ClientApp reads and returns its weights.
        seed_fn: derives a node's codec seed (default :func:`node_seed`, matching the in-process engine).
        wire: ``"compact"`` sends compact frames of the :class:`~deltaplane.codecs.WireSession` derived from
            the update's layout, the codec and the base id (the server derives the same session from the
            initial model: ``DeltaStrategy(uplink_codec=...)`` or a ``server_step`` whose config is compact);
            ``"self-describing"`` (default) sends payloads that carry their tensor table.
        entropy_coding: with ``wire="compact"``, code byte fields losslessly where that makes them smaller.
        dgc: Deep Gradient Compression's device-side techniques (:class:`~deltaplane.engine.dgc.DGC`: local
            clipping, momentum correction, momentum factor masking, sparsity warm-up); the node keeps its
            velocity (and, with the relative clip, its update-norm history) in its own state next to the
            error-feedback residual.

    Returns:
        ``mod(msg, context, call_next) -> Message`` for ``ClientApp(mods=[...])``.

    Example:
        >>> from flwr.clientapp import ClientApp
        >>> from deltaplane.flower import delta_mod
        >>> app = ClientApp(mods=[delta_mod(codec="topk(0.01) | quant(bits=8)", seed=0)])
    """
    spec = Compressor(codec).codec.spec  # validates the spec now, not inside a node at round 1
    if wire not in WIRE_FORMATS:
        raise ConfigError(f"delta_mod: wire must be one of {WIRE_FORMATS}, got {wire!r}")
    sessions: dict[str, Sessions] = {}  # by base id: each derived once per layout

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or CONTROL_KEY not in msg.content:
            return call_next(msg, context)
        ctrl = msg.content.config_records[CONTROL_KEY]
        base_id, version = str(ctrl["base-id"]), as_int(ctrl["base-version"])
        global_state = _global_model(msg, context, base_id, version, arrayrecord_key)

        # The wrapped ClientApp sees a plain Flower instruction: the global weights and the config.
        inner = RecordDict(
            {k: v for k, v in msg.content.items() if k not in (CONTROL_KEY, DOWNLINK_KEY, arrayrecord_key)}
        )
        inner[arrayrecord_key] = state_to_arrays(global_state)
        original, msg.content = msg.content, inner
        try:
            reply = call_next(msg, context)
        finally:
            msg.content = original  # the instruction is the caller's; leave it as it came
        if reply.has_error() or kind == MessageType.EVALUATE:  # evaluation sends back metrics only
            return reply

        if DELTA_KEY in reply.content.array_records:  # the client step already made the update itself
            delta = Delta(arrays_to_state(reply.content.array_records[DELTA_KEY]))
        else:
            delta = Delta.between(global_state, arrays_to_state(reply.content.array_records[arrayrecord_key]))
        compressor = _load_compressor(context, spec, error_feedback, seed_fn(seed, context))
        velocity, norms, rnd = None, None, 0
        if dgc is not None and dgc.active:
            rnd = as_int(msg.content.config_records["config"]["server-round"])
            saved = context.state.array_records.get(_VELOCITY)
            before = Delta(arrays_to_state(saved)) if saved is not None else None
            delta, velocity, norms = dgc.prepare(
                compressor, delta, before, spec=spec, rnd=rnd, norms=_load_norms(context)
            )
        if base_id not in sessions:
            sessions[base_id] = Sessions(spec, base_id, compact=wire == "compact", entropy=entropy_coding)
        # a warm-up round's codec is not the session's: its payload describes itself
        warming = dgc is not None and dgc.warming(rnd)
        session = None if warming else sessions[base_id].get(Layout.of(delta))
        if session is not None:
            payload = compressor.compress(delta, base_version=version, session=session)
        else:
            payload = compressor.compress(delta, base_id=base_id, base_version=version)
        if dgc is not None and velocity is not None:  # a velocity only comes from dgc.prepare
            sent = None
            if dgc.masking:
                sent = decompress(
                    payload, expect_base=(base_id, version), expect_layout=delta, session=session
                )
            context.state[_VELOCITY] = state_to_arrays(dict(dgc.settle(velocity, sent)))
        if norms is not None:
            context.state[_NORMS] = ConfigRecord({"count": norms.count, "reference": norms.reference})
        context.state[_COMPRESSOR_STATE] = ConfigRecord({"state": state_to_bytes(compressor.state_dict())})
        # Only the payload goes back: the full weights never leave the device.
        out = RecordDict({k: v for k, v in reply.content.items() if k not in (arrayrecord_key, DELTA_KEY)})
        out[UPLINK_KEY] = ConfigRecord({"payload": payload})
        reply.content = out
        return reply

    mod.__name__ = mod.__qualname__ = "delta_mod"
    mod.__doc__ = f"deltaplane uplink compression ({spec}); partner: deltaplane.flower.DeltaStrategy"
    return mod


def _global_model(msg: Message, context: Context, base_id: str, version: int, key: str) -> dict:
    """The global model of ``version``: sent in full, or the cached one plus the downlink chain."""
    ctrl = msg.content.config_records[CONTROL_KEY]
    start = as_int(ctrl["downlink-from"])
    if start < 0:
        state = arrays_to_state(msg.content.array_records[key])
    else:
        meta = context.state.config_records.get(_GLOBAL_META)
        if meta is None or str(meta["base-id"]) != base_id or as_int(meta["version"]) != start:
            have = None if meta is None else (meta["base-id"], meta["version"])
            raise VersionMismatch(
                f"node holds global model {have}, the server's downlink starts at ({base_id!r}, {start}); "
                "the server must send the full model"
            )
        state = arrays_to_state(context.state.array_records[_GLOBAL_STATE])
        chain = msg.content.config_records.get(DOWNLINK_KEY)  # none when the node is already current
        payloads = [] if chain is None else chain["payloads"]
        if not isinstance(payloads, list):  # a number reached len() as a bare TypeError
            raise DecodeError(f"downlink payloads must be a list of bytes, not {type(payloads).__name__}")
        if len(payloads) != version - start:
            raise DecodeError(f"downlink holds {len(payloads)} payloads for versions {start}..{version - 1}")
        for v, payload in zip(range(start, version), payloads, strict=True):
            # a personalized federation's downlink carries only the shared layers
            state = apply_payload(payload_of(payload), state, expect_base=(base_id, v))
    context.state[_GLOBAL_STATE] = state_to_arrays(state)
    context.state[_GLOBAL_META] = ConfigRecord({"base-id": base_id, "version": version})
    return state


def _load_norms(context: Context) -> NormHistory | None:
    """The node's update-norm history for DGC's relative clip (``None`` before its first round with it)."""
    saved = context.state.config_records.get(_NORMS)
    return None if saved is None else NormHistory(as_int(saved["count"]), as_float(saved["reference"]))


def _load_compressor(context: Context, spec: str, error_feedback: bool, seed: int) -> Compressor:
    compressor = Compressor(spec, error_feedback=error_feedback, seed=seed)
    saved = context.state.config_records.get(_COMPRESSOR_STATE)
    if saved is not None:
        state = state_from_bytes(as_bytes(saved["state"]))
        # a schedule (DGC's warm-up) may have left the compressor on another setting of the codec
        compressor.use_codec(state["codec"])
        compressor.load_state_dict(state)
    return compressor
