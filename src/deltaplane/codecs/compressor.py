"""Turn a whole :class:`~deltaplane.delta.Delta` into wire bytes and back, with per-device error feedback.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, https://arxiv.org/abs/1901.09847) keeps what the
codec dropped this round and adds it to the next round's delta, so a biased codec such as top-k still
delivers the full update over time. The residual is per-device state, so it lives in an explicit
:class:`CompressorState` that can be checkpointed, not inside the (stateless) codec.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from deltaplane.codecs.base import (
    Codec,
    Encoded,
    Pipeline,
    decode_tree,
    decode_tree_rows,
    encode_stages,
    get_codec,
    split_lossless,
)
from deltaplane.codecs.layout import Layout
from deltaplane.codecs.preflight import check_budget, check_field_bytes, check_nodes, field_lengths
from deltaplane.codecs.quantize import Identity
from deltaplane.codecs.session import WireSession, check_session_layout, is_compact
from deltaplane.codecs.wire import (
    Limits,
    WireHeader,
    check_base,
    check_header,
    finalize,
    pack,
    read_body,
    read_table,
)
from deltaplane.delta import BASE_SHA256_KEY, Delta, all_finite, first_non_finite
from deltaplane.errors import (
    CodecError,
    ConfigError,
    DecodeError,
    DeltaplaneError,
    InvalidUpdate,
    ShapeMismatch,
    VersionMismatch,
)

__all__ = [
    "Compressor",
    "CompressorState",
    "compress_many",
    "compress_many_sent",
    "decode_delta",
    "decompress",
    "decompress_many",
    "encode_delta",
]


def encode_delta(
    delta: Delta,
    codec: Codec,
    rng: torch.Generator,
    states: dict[str, dict[str, Any]] | None = None,
) -> dict[str, tuple[torch.dtype, Encoded]]:
    """Encode every tensor of ``delta`` (floating ones with ``codec``, others raw) into finalized trees.

    A per-layer policy picks each tensor's codec by name. ``states`` (tensor name -> state dict, updated in
    place) feeds stateful codecs such as PowerSGD their per-tensor warm start; without it they start cold.
    A trailing lossless stage (``zstd``) is not applied here but by :func:`~deltaplane.codecs.wire.pack`.
    """
    body, _ = split_lossless(codec)
    out: dict[str, tuple[torch.dtype, Encoded]] = {}
    for name, t in delta.items():
        try:
            if not t.is_floating_point():
                c: Codec = Identity()
            else:
                c = body.select(name, t) if body.selects_by_name else body  # type: ignore[attr-defined]  # only a selecting codec has select
            x = t.detach().cpu()
            if states is not None and c.stateful:
                slot = states.get(name, {})
                e = encode_stages(c.stages if isinstance(c, Pipeline) else [c], x, rng, slot)
                if slot:
                    states[name] = slot
            else:
                e = c.encode(x, rng)
            out[name] = (t.dtype, finalize(e))
        except DeltaplaneError as exc:
            raise type(exc)(f"tensor '{name}': {exc}") from exc
    return out


def decode_delta(trees: Mapping[str, tuple[torch.dtype, Encoded]]) -> Delta:
    """Decode finalized trees into a delta with each tensor's original dtype; refuses NaN/Inf.

    Every node is checked first (:func:`~deltaplane.codecs.preflight.check_nodes`: its codec, fields and
    counts), so no codec works on a size its fields cannot back; the layout and the decode budget are
    :func:`decompress`'s (it knows the payload and the receiver).
    """
    check_nodes(trees)
    out = {}
    for name, (dtype, tree) in trees.items():
        try:
            t = decode_tree(tree)
        except DecodeError as exc:
            raise DecodeError(f"tensor '{name}': {exc}") from exc
        out[name] = t.to(dtype)
    delta = Delta(out)
    try:
        delta.check_finite()  # remembered: the aggregator's own check of this delta is then free
    except InvalidUpdate as exc:
        raise DecodeError(f"decoded values: {exc}") from exc
    return delta


def decompress(
    payload: bytes,
    *,
    expect_base: tuple[str, int] | None = None,
    expect_layout: Layout | Mapping[str, torch.Tensor] | None = None,
    limits: Limits | None = None,
    session: WireSession | None = None,
) -> Delta:
    """Decode a payload made by :meth:`Compressor.compress`, strictly and within a memory budget.

    With ``session`` the payload must be a compact frame of that :class:`~deltaplane.codecs.WireSession`
    (the session's layout is then the expected layout; ``expect_layout``, if given, must equal it); any
    other session is refused with :class:`~deltaplane.errors.SessionMismatch`. Without it the payload must
    be self-describing.

    A receiver that holds the model should pass ``expect_layout`` (a :class:`~deltaplane.codecs.Layout`,
    or the model's state dict / a delta of it, whose layout is taken): a payload whose tensor names,
    shapes or dtypes differ is refused before anything is decoded, and decoding may use at most
    ``Limits.layout_factor`` times the model's float32 size. Without it (a standalone file), the payload
    may decode to at most ``max(Limits.min_decoded_bytes, Limits.max_expansion × len(payload))`` bytes,
    capped at ``Limits.max_decoded_bytes``. Either way every codec's counts and lengths are checked
    against the declared shapes before any tensor is allocated (:func:`~deltaplane.codecs.preflight.preflight`).

    Raises :class:`~deltaplane.errors.DecodeError` on anything malformed or over budget,
    :class:`~deltaplane.errors.ShapeMismatch` if the tensors differ from ``expect_layout``, and
    :class:`~deltaplane.errors.VersionMismatch` if ``expect_base`` (model id, version) differs from the
    payload's base: an update for another model version is refused, never applied.
    """
    if session is not None:
        return _decompress_compact(payload, session, expect_base, expect_layout, limits)
    if is_compact(payload):
        raise DecodeError(
            "this is a compact payload: decode it with the wire session it was made in "
            "(decompress(payload, session=...))"
        )
    layout = Layout.of(expect_layout) if expect_layout is not None else None
    # the header, inflated and parsed before anything else, within a budget linear in the receiver's model
    header_bytes = (
        (limits or Limits()).header_budget(len(layout), sum(map(len, layout))) if layout is not None else None
    )
    table = read_table(payload, limits=limits, max_header_bytes=header_bytes)
    check_base(table.header, expect_base)
    # layout and budget from the table alone, before the body is inflated or read
    budget = check_budget(table.trees, payload_bytes=len(payload), layout=layout, limits=limits)
    # the body may inflate to the decode budget, not to the model's size: a legitimate body can exceed the
    # model (top-k at density ~1 adds its positions to every value, 8-bit codes with small chunks their
    # scales, and a tiny model's fields their fixed overhead), and the codecs' checks then bound each field
    if table.zstd and table.size <= budget:  # each field no longer than its node allows, before inflating
        lengths = [n for _, tree in table.trees.values() for n in field_lengths(tree)]
        check_field_bytes(table.trees, lengths, [True] * len(lengths))
    trees = read_body(table, max_inflated_bytes=budget)
    delta = decode_delta(trees)
    recorded = table.header.meta.get(BASE_SHA256_KEY)  # validated by read_table
    return delta if recorded is None else delta.with_base_sha256(recorded)


def _decompress_compact(
    payload: bytes,
    session: WireSession,
    expect_base: tuple[str, int] | None,
    expect_layout: Layout | Mapping[str, torch.Tensor] | None,
    limits: Limits | None,
) -> Delta:
    _check_receiver(session, expect_base, expect_layout)
    return decode_delta(_compact_trees(payload, session, expect_base, limits))


def _check_receiver(
    session: WireSession,
    expect_base: tuple[str, int] | None,
    expect_layout: Layout | Mapping[str, torch.Tensor] | None,
) -> None:
    """Refuse a session for another base model or layout than the receiver's, before any payload is read."""
    if expect_base is not None and expect_base[0] != session.base_id:
        raise VersionMismatch(
            f"wire session is for base {session.base_id!r}, but the receiver holds {expect_base[0]!r}"
        )
    if expect_layout is not None:
        check_session_layout(session, Layout.of(expect_layout))


def _compact_trees(
    payload: bytes,
    session: WireSession,
    expect_base: tuple[str, int] | None,
    limits: Limits | None,
    *,
    check: bool = False,
) -> dict[str, tuple[torch.dtype, Encoded]]:
    """A compact frame's trees, read strictly and within budget (the session and base checked by the caller
    of :meth:`WireSession.read_table`), and with ``check`` every node checked (:func:`check_nodes`); nothing
    decoded yet.

    What depends on the frame's skeleton alone (the layout and decode budget of its tensor table, its
    fields' lengths, structural node checks) is checked for the first payload of a skeleton the session
    remembers and then known for the others (:meth:`WireSession.read_frame`); everything a payload carries
    beyond its skeleton (checksum, session id, base version, data length) is checked on every payload.
    """
    layout = session.layout
    table, stored, facts = session.read_frame(
        payload, expect_base_version=expect_base[1] if expect_base is not None else None, limits=limits
    )
    # with the layout given, the budget does not depend on the payload's size: it holds for the skeleton.
    # Fields may expand to the decode budget (as a self-describing body may inflate to it, see decompress)
    inflate = facts.get("max_inflated_bytes")
    if inflate is None:
        budget = check_budget(table.trees, payload_bytes=len(payload), layout=layout, limits=limits)
        inflate = facts["max_inflated_bytes"] = budget
    trees = session.read_body(table, stored, max_inflated_bytes=inflate, facts=facts)
    if check:
        check_nodes(trees, memo=facts)
    return trees


def decompress_many(
    payloads: Sequence[bytes],
    *,
    session: WireSession,
    expect_base: tuple[str, int] | None = None,
    expect_layout: Layout | Mapping[str, torch.Tensor] | None = None,
    limits: Limits | None = None,
) -> list[Delta | DeltaplaneError]:
    """Decode many compact payloads of one wire session: exactly ``[decompress(p, session=session, ...)
    for p in payloads]``, with each payload's error in its place instead of raised.

    A server receives a round's updates together; decoding them one at a time costs a few dozen small tensor
    operations per tensor per payload, which for a small model is most of the server's time. Here each
    payload's frame is still read and checked on its own (checksum, session, base version, skeleton, budget,
    every node's counts: the same strict reader), but the tensors are decoded on the stack, one
    :func:`~deltaplane.codecs.base.decode_tree_rows` per tensor for all payloads, and checked for NaN/Inf
    with one reduction per tensor. The returned deltas are row views of those stacks (memory: the decoded
    payloads, as when decoded one by one). A payload whose stacked decode fails sends every payload back
    to the one-by-one decoder, so each error is the one :func:`decompress` raises.

    Raises:
        VersionMismatch: the session is for another base model (every payload would be refused).
        ShapeMismatch: ``expect_layout`` differs from the session's layout.
    """
    _check_receiver(session, expect_base, expect_layout)
    out: list[Delta | DeltaplaneError | None] = [None] * len(payloads)
    good: list[int] = []
    trees: list[dict[str, tuple[torch.dtype, Encoded]]] = []
    for i, payload in enumerate(payloads):
        try:
            t = _compact_trees(payload, session, expect_base, limits, check=True)
        except DeltaplaneError as exc:
            out[i] = exc
            continue
        trees.append(t)
        good.append(i)
    if good:
        for i, delta in zip(good, _decode_stacked(trees), strict=True):
            out[i] = delta
    return out  # type: ignore[return-value]  # every None was replaced: by an error or by a stacked delta


def _decode_stacked(trees: list[dict[str, tuple[torch.dtype, Encoded]]]) -> list[Delta | DeltaplaneError]:
    """:func:`decode_delta` of every tree set (nodes already checked), on the stack where they are alike."""

    def one(t: dict[str, tuple[torch.dtype, Encoded]]) -> Delta | DeltaplaneError:
        try:
            return decode_delta(t)
        except DeltaplaneError as exc:
            return exc

    if len(trees) == 1:
        return [one(trees[0])]
    try:
        stacks = {
            name: decode_tree_rows([t[name][1] for t in trees]).to(dtype)
            for name, (dtype, _) in trees[0].items()
        }
    except DeltaplaneError:  # one malformed payload: decode each alone, so each gets its own error
        return [one(t) for t in trees]
    floats = [s.reshape(len(trees), -1) for s in stacks.values() if s.is_floating_point() and s[0].numel()]
    finite = (
        torch.stack([f.sum(1, dtype=torch.float32) for f in floats]).sum(0).isfinite()
        if floats
        else torch.ones(len(trees), dtype=torch.bool)
    )
    result: list[Delta | DeltaplaneError] = []
    for row, (ok, t) in enumerate(zip(finite.tolist(), trees, strict=True)):
        if not ok:  # NaN/Inf, or a sum that overflowed: the exact per-payload check decides
            result.append(one(t))
            continue
        delta = Delta({name: s[row] for name, s in stacks.items()})
        delta.mark_finite()
        result.append(delta)
    return result


def read_header(payload: bytes, *, limits: Limits | None = None) -> WireHeader:
    """The validated header of a payload (base model, codec, metadata) without reading its tensors."""
    return read_table(payload, limits=limits).header


@dataclass
class CompressorState:
    """Per-device compression state: the error-feedback residual, the RNG state and a round counter.

    ``codec`` holds stateful codecs' per-tensor state (tensor name -> that tensor's state dict, e.g.
    PowerSGD's warm-start ``Q``); ``extra`` is free for callers.
    """

    residual: Delta | None = None
    rng_state: torch.Tensor | None = None
    rounds: int = 0
    codec: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Compressor:
    """One device's encoder: a codec, optional error feedback, and a seeded random generator.

    Example:
        >>> import torch, deltaplane as dp
        >>> c = dp.Compressor("topk(0.25) | quant(bits=8)", error_feedback=True, seed=0)
        >>> d = dp.Delta({"w": torch.tensor([1.0, -2.0, 0.1, 0.0])})
        >>> payload = c.compress(d, base_id="cnn", base_version=3)
        >>> dp.decompress(payload, expect_base=("cnn", 3))["w"].tolist()
        [0.0, -2.0, 0.0, 0.0]
        >>> round(c.state.residual["w"][0].item(), 3)  # what was not sent waits for the next round
        1.0
    """

    def __init__(self, codec: str | Codec, *, error_feedback: bool = True, seed: int = 0) -> None:
        self.codec = get_codec(codec)
        per_tensor, self._lossless = split_lossless(self.codec)
        self._exact = per_tensor.exact
        if error_feedback and not self.codec.contractive:
            warnings.warn(
                f"codec '{self.codec.spec}' is not a contraction (its error can exceed the update), so error "
                "feedback accumulates and usually diverges (on the digits federation: chance accuracy, against "
                "0.96 without it); pass error_feedback=False (deltaplane run: --no-error-feedback)",
                UserWarning,
                stacklevel=2,
            )
        self.error_feedback = error_feedback
        # torch takes any 64-bit seed, signed or not; beyond that it raises an untyped "Overflow" ValueError
        if not isinstance(seed, numbers.Integral) or not -(2**63) <= int(seed) < 2**64:
            raise CodecError(f"seed must be an integer from -2**63 to 2**64 - 1 (64 bits). Found {seed!r}")
        self.seed: int = seed
        self._rng: torch.Generator = torch.Generator().manual_seed(seed)
        self.state: CompressorState = CompressorState()

    def __repr__(self) -> str:
        return f"Compressor({self.codec.spec!r}, error_feedback={self.error_feedback}, seed={self.seed})"

    def use_codec(self, codec: str | Codec) -> None:
        """Encode with ``codec`` from now on, keeping the residual, the generator and the codec state.

        For schedules that change a codec's parameters between rounds (DGC's sparsity warm-up lowers a
        sparsifier's density round by round); what the old codec left unsent stays in the residual.
        """
        new = get_codec(codec)
        if new.spec == self.codec.spec:
            return
        self.codec = new
        per_tensor, self._lossless = split_lossless(new)
        self._exact = per_tensor.exact

    @property
    def memoryless(self) -> bool:
        """Whether encoding an update changes nothing here but the round count: an exact codec (which draws
        no randomness), not a stateful one, and no residual or codec state carried in. Any copy of such a
        compressor then encodes this device's next update to the very bytes this one would: the simulator's
        forked workers encode their clients' updates with copies (:mod:`deltaplane.sim.worker_encoding`),
        and :meth:`count_encoded_copy` leaves this one as its own :meth:`compress` would have."""
        return (
            self._exact and not self.codec.stateful and self.state.residual is None and not self.state.codec
        )

    def count_encoded_copy(self) -> None:
        """Leave this compressor as :meth:`compress` leaves it, for an update a copy of it compressed while it
        was :attr:`memoryless` (one round more; nothing else changes)."""
        if not self.memoryless:
            raise CodecError(
                f"this compressor ({self.codec.spec}) carries state that compressing changes; compress its "
                "updates itself"
            )
        self.state.rounds += 1

    def encode(
        self, delta: Delta | Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, tuple[torch.dtype, Encoded]], Delta]:
        """Encode ``delta`` (plus the carried residual); returns the trees and the delta the receiver will see."""
        trees, sent = self._encode(delta, want_sent=True)
        assert sent is not None
        return trees, sent

    def _encode(
        self, delta: Delta | Mapping[str, torch.Tensor], *, want_sent: bool
    ) -> tuple[dict[str, tuple[torch.dtype, Encoded]], Delta | None]:
        # a plain state-dict-like mapping is taken as a Delta: adding the residual to it needs one
        target = delta = delta if isinstance(delta, Delta) else Delta(delta)
        if self.error_feedback and self.state.residual is not None:
            try:
                target = delta + self.state.residual
            except ShapeMismatch as exc:
                raise ShapeMismatch(
                    f"delta does not match this device's error-feedback state: {exc}"
                ) from exc
        trees = encode_delta(target, self.codec, self._rng, self.state.codec)
        # decoding what was sent costs as much as the receiver's decode: only done when it is needed, and an
        # exact codec sends the target itself
        sent = None
        if want_sent or self.error_feedback:
            sent = target if self._exact else decode_delta(trees)
        if self.error_feedback and self._exact:
            self.state.residual = None  # everything was sent: nothing to carry into the next round
        elif sent is not None and self.error_feedback:
            self.state.residual = Delta(
                {
                    k: (target[k] - sent[k]) if v.is_floating_point() else torch.zeros_like(v)
                    for k, v in target.items()
                }
            )
        self.state.rounds += 1
        return trees, sent

    def compress(
        self,
        delta: Delta | Mapping[str, torch.Tensor],
        *,
        base_id: str = "",
        base_version: int = 0,
        meta: Mapping[str, Any] | None = None,
        session: WireSession | None = None,
    ) -> bytes:
        """Encode ``delta`` (a :class:`~deltaplane.delta.Delta`, or a mapping of names to tensors taken as
        one) into one framed wire payload (see :mod:`deltaplane.codecs.wire`).

        A delta that records its base (:attr:`~deltaplane.delta.Delta.base_sha256`) carries the
        fingerprint in ``meta["deltaplane.base_sha256"]``, and :func:`decompress` gives it back to the
        decoded delta, whose :meth:`~deltaplane.delta.Delta.apply` then checks the base; ``meta`` may not
        name another one (:class:`~deltaplane.errors.CodecError`).

        With ``session`` (a :class:`~deltaplane.codecs.WireSession` of this compressor's codec) the payload
        is a compact frame of that session instead: its base id is the session's, and ``meta`` is refused
        (a compact frame carries none; the session's base id and the frame's base version name the base).
        """
        delta = delta if isinstance(delta, Delta) else Delta(delta)
        delta.check_finite()
        meta = dict(meta or {})
        if session is not None:
            _check_session(self, session, base_id, meta or None)
            # before encoding, as the header below: refused after it, the residual would take this delta's
            # layout and every later update of the session's layout would be refused against it
            _check_session_delta(session, delta)
        elif delta.base_sha256 is not None:
            if meta.get(BASE_SHA256_KEY, delta.base_sha256) != delta.base_sha256:
                raise CodecError(
                    f"meta {BASE_SHA256_KEY!r} names another base than the delta records "
                    f"({delta.base_sha256}); leave it out, the delta's record is sent"
                )
            meta[BASE_SHA256_KEY] = delta.base_sha256
        header = WireHeader(
            session.base_id if session is not None else base_id, base_version, self.codec.spec, meta
        )
        # before encoding: a header refused after it would leave the residual and generator moved on for a
        # payload that was never made
        check_header(header)
        trees, _ = self._encode(delta, want_sent=False)
        if session is not None:
            return session.pack(trees, base_version)
        level = getattr(self._lossless, "level", None)
        return pack(trees, header, zstd_level=level)

    # -- checkpointing ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this device's compressor exactly."""
        return {
            "codec": self.codec.spec,
            "error_feedback": self.error_feedback,
            "seed": self.seed,
            "rounds": self.state.rounds,
            "rng_state": self._rng.get_state(),
            "residual": dict(self.state.residual) if self.state.residual is not None else None,
            "codec_state": {k: dict(v) for k, v in self.state.codec.items()},
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (the codec spec must match).

        Raises:
            ConfigError: the state was saved by a compressor of another codec (nothing is restored).
        """
        if sd.get("codec") != self.codec.spec:
            raise ConfigError(
                f"state is for codec {sd.get('codec')!r}, this compressor uses {self.codec.spec!r}: restore it "
                "into a compressor of the same codec, or start this one afresh"
            )
        self.state.rounds = int(sd["rounds"])
        self._rng.set_state(sd["rng_state"])
        self.state.residual = Delta(sd["residual"]) if sd.get("residual") is not None else None
        self.state.codec = {k: dict(v) for k, v in (sd.get("codec_state") or {}).items()}


def _check_session(
    compressor: Compressor, session: WireSession, base_id: str, meta: Mapping[str, Any] | None
) -> None:
    """Refuse to frame in ``session`` what it cannot carry (another codec, base id or sender metadata)."""
    if session.codec != compressor.codec.spec:
        raise CodecError(
            f"wire session is for codec '{session.codec}', this compressor uses '{compressor.codec.spec}'"
        )
    if base_id and base_id != session.base_id:
        raise CodecError(f"wire session is for base {session.base_id!r}, not {base_id!r}")
    if meta:
        raise CodecError("a compact frame carries no metadata; send it in the self-describing format")


def _check_session_delta(session: WireSession, delta: Delta) -> None:
    """Refuse a delta whose tensors (names, order, shapes, dtypes) are not the session layout's, naming the
    first difference."""
    layout = Layout.of(delta)
    if layout != session.layout:
        session.layout.check({k: (t.dtype, t.shape) for k, t in layout.items()})  # names what differs
        raise ShapeMismatch(
            f"update tensors {list(layout)[:5]} are in another order than the session layout's "
            f"{list(session.layout)[:5]}; agree on a new session for another model"
        )


def compress_many(
    compressors: Sequence[Compressor],
    stacked: Mapping[str, torch.Tensor],
    *,
    base_id: str = "",
    base_version: int = 0,
    meta: Mapping[str, Any] | None = None,
    return_exceptions: bool = False,
    session: WireSession | None = None,
) -> list[bytes | DeltaplaneError]:
    """Compress many devices' deltas, given stacked as ``{name: (C, *shape)}``, into one payload each.

    Exactly ``[compressors[i].compress(Delta({k: v[i] ...}), ...) for i ...]``, byte for byte, leaving every
    compressor in the state that loop leaves it in (residual, generator, round count, codec state), but the
    arithmetic runs on the stack: error feedback adds the residuals to all rows at once, and codecs with a
    batched :meth:`~deltaplane.codecs.base.Codec.encode_rows` (every stateless per-tensor codec and
    pipelines of them) select, quantize or cast all rows together; other codecs encode row by row (the
    default ``encode_rows``). The new residual is ``target - decode(what was sent)``, as in
    :meth:`Compressor.compress`, decoded from each device's encoded fields and dequantized / scattered on
    the stack (:func:`~deltaplane.codecs.base.decode_tree_rows`). Index coding and bit-packing run on the
    stack too, and with a ``session`` the round's frames are made together
    (:meth:`~deltaplane.codecs.session.WireSession.pack_many`); each device still gets its own payload.

    The stacked path needs compressors sharing one codec spec and error-feedback setting, each with its own
    generator, a codec that is neither stateful (PowerSGD) nor a per-layer policy, finite deltas, and
    residuals laid out like the deltas; otherwise each device is compressed on its own
    (:meth:`Compressor.compress`), which gives the same bytes, just slower.

    Args:
        compressors: one per row of the stack, each with its own generator (not shared between rows).
        stacked: tensor name -> ``(C, *shape)`` tensor, row ``i`` being device ``i``'s delta.
        base_id, base_version, meta, session: the payload header (or the compact frame's session), as in
            :meth:`Compressor.compress`.
        return_exceptions: a device whose compression fails gets its
            :class:`~deltaplane.errors.DeltaplaneError` in the result, and the others go on (a simulator
            refuses one bad update, not the round); otherwise the first failure is raised.

    Example:
        >>> import torch, deltaplane as dp
        >>> from deltaplane.codecs import compress_many
        >>> devices = [dp.Compressor("topk(0.5)", seed=s) for s in range(3)]
        >>> stack = {"w": torch.arange(12.0).reshape(3, 4)}
        >>> payloads = compress_many(devices, stack, base_id="cnn", base_version=1)
        >>> dp.decompress(payloads[2], expect_base=("cnn", 1))["w"].tolist()
        [0.0, 0.0, 10.0, 11.0]
    """
    payloads, _ = compress_many_sent(
        compressors,
        stacked,
        base_id=base_id,
        base_version=base_version,
        meta=meta,
        return_exceptions=return_exceptions,
        session=session,
        want_sent=False,
    )
    return payloads


def compress_many_sent(
    compressors: Sequence[Compressor],
    stacked: Mapping[str, torch.Tensor],
    *,
    base_id: str = "",
    base_version: int = 0,
    meta: Mapping[str, Any] | None = None,
    return_exceptions: bool = False,
    session: WireSession | None = None,
    want_sent: bool = True,
) -> tuple[list[bytes | DeltaplaneError], dict[str, torch.Tensor] | None]:
    """:func:`compress_many`, and, when it took the stacked path, what every payload decodes to, stacked.

    The second item is ``{name: (C, *shape)}``, row ``i`` being exactly what ``decompress(payloads[i])``
    gives (each tensor in its own dtype, decoded from the very trees that were framed, with NaN/Inf
    refused), or ``None`` when the devices were compressed one by one (a caller then decodes each payload
    itself; and always with ``want_sent=False``, which spares the decode where error feedback does not
    need it). DGC's momentum factor masking reads it (:meth:`~deltaplane.engine.ClientStep.uplink_stacked`).
    """
    n = len(compressors)
    for name, t in stacked.items():
        if t.dim() < 1 or t.shape[0] != n:
            raise ShapeMismatch(
                f"tensor '{name}': stacked shape {tuple(t.shape)} has no row per compressor ({n})"
            )
    if session is not None:
        for c in compressors:
            _check_session(c, session, base_id, meta)
    if n and _stackable(compressors, stacked):
        snapshot = [(c._rng.get_state(), c.state.rounds) for c in compressors]
        try:
            payloads, sent = _compress_stacked(
                compressors, stacked, base_id, base_version, meta, session, want_sent=want_sent
            )
            # the stacked path raises rather than hands back an error: its list holds bytes only
            return cast("list[bytes | DeltaplaneError]", payloads), sent
        except Exception as exc:
            # nothing but the generators was touched yet: rewind them; then the per-device loop says which
            # device failed, and leaves the states that loop leaves
            for c, (rng_state, rounds) in zip(compressors, snapshot, strict=True):
                c._rng.set_state(rng_state)
                c.state.rounds = rounds
            if not isinstance(exc, DeltaplaneError):
                raise
    out: list[bytes | DeltaplaneError] = []
    for i, c in enumerate(compressors):
        delta = Delta({k: v[i] for k, v in stacked.items()})
        try:
            out.append(
                c.compress(delta, base_id=base_id, base_version=base_version, meta=meta, session=session)
            )
        except DeltaplaneError as exc:
            if not return_exceptions:
                raise
            out.append(exc)
    return out, None


def _stackable(compressors: Sequence[Compressor], stacked: Mapping[str, torch.Tensor]) -> bool:
    """Whether :func:`compress_many` may take the stacked path (see its docstring)."""
    first = compressors[0]
    codec = first.codec
    if codec.stateful or codec.selects_by_name:
        return False
    if len({id(c._rng) for c in compressors}) != len(compressors):
        return False
    for c in compressors:
        if c.codec.spec != codec.spec or c.error_feedback != first.error_feedback:
            return False
        r = c.state.residual
        if c.error_feedback and r is not None:
            if r.keys() != stacked.keys():
                return False
            if any(r[k].shape != v.shape[1:] or r[k].dtype != v.dtype for k, v in stacked.items()):
                return False
    # one finiteness check for the whole stack; a bad row goes through the loop, which names it
    return first_non_finite(stacked) is None


def _compress_stacked(
    compressors: Sequence[Compressor],
    stacked: Mapping[str, torch.Tensor],
    base_id: str,
    base_version: int,
    meta: Mapping[str, Any] | None,
    session: WireSession | None = None,
    want_sent: bool = False,
) -> tuple[list[bytes], dict[str, torch.Tensor] | None]:
    first = compressors[0]
    body, _ = split_lossless(first.codec)
    rngs = [c._rng for c in compressors]
    feedback = first.error_feedback
    carried = [i for i, c in enumerate(compressors) if feedback and c.state.residual is not None]
    targets: dict[str, torch.Tensor] = {}
    trees: list[dict[str, tuple[torch.dtype, Encoded]]] = [{} for _ in compressors]
    for name, t in stacked.items():
        # target = delta + residual, as Compressor._encode adds them; a device without a residual sends its
        # delta untouched (adding zeros would turn -0.0 into 0.0)
        if len(carried) == len(compressors):
            x = t + torch.stack([compressors[i].state.residual[name] for i in carried])  # type: ignore[index]  # carried: has a residual
        elif carried:
            x = t.clone()
            rows = torch.tensor(carried)
            x[rows] = t[rows] + torch.stack([compressors[i].state.residual[name] for i in carried])  # type: ignore[index]  # as above
        else:
            x = t
        targets[name] = x
        try:
            tensor_codec: Codec = body if x.is_floating_point() else Identity()
            xs = x.detach().cpu()
            encoded = tensor_codec.encode_rows(xs, rngs)
        except DeltaplaneError as exc:
            raise type(exc)(f"tensor '{name}': {exc}") from exc
        for tree, e in zip(trees, encoded, strict=True):
            tree[name] = (x.dtype, finalize(e))
    residuals: list[Delta | None] = [None] * len(compressors)
    lossy_feedback = feedback and not first._exact
    sents: dict[str, torch.Tensor] | None = None
    if lossy_feedback or want_sent:
        sents = {}
        for name, x in targets.items():
            if not x.is_floating_point() or first._exact:
                sents[name] = x  # sent raw, or by an exact codec: the receiver decodes the target itself
                continue
            # what every device's receiver will decode (decode_delta, on the stack)
            try:
                sent = decode_tree_rows([tree[name][1] for tree in trees]).to(x.dtype)
            except DecodeError as exc:
                raise DecodeError(f"tensor '{name}': {exc}") from exc
            if not all_finite(sent):
                raise DecodeError(f"decoded values: tensor '{name}' holds NaN or Inf values")
            sents[name] = sent
    if lossy_feedback:
        assert sents is not None
        carry: dict[str, list[torch.Tensor]] = {}
        for name, x in targets.items():
            if not x.is_floating_point():
                carry[name] = [torch.zeros_like(x[i]) for i in range(len(compressors))]
                continue
            # one tensor per device (a view into the stack would keep, and checkpoint, every device's rows)
            carry[name] = [r.clone() for r in (x - sents[name]).unbind(0)]
        residuals = [Delta({k: v[i] for k, v in carry.items()}) for i in range(len(compressors))]
    if session is not None:  # the round's frames together (their fields' codings chosen in one pass)
        payloads = session.pack_many(trees, base_version)
    else:
        payloads = [
            pack(
                tree,
                WireHeader(base_id, base_version, c.codec.spec, dict(meta or {})),
                zstd_level=getattr(c._lossless, "level", None),
            )
            for c, tree in zip(compressors, trees, strict=True)
        ]
    # only now, with every payload made, the states move on: a failure above leaves them as they were
    for c, residual in zip(compressors, residuals, strict=True):
        if feedback:
            c.state.residual = residual
        c.state.rounds += 1
    return payloads, sents if want_sent else None
