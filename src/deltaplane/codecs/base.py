"""The codec protocol, the codec registry with its text specs, and pipelines.

A codec maps one tensor to an :class:`Encoded` tree and back. Its fields are either final ``bytes`` or
float tensors that a later pipeline stage may compress further (top-k's kept values, say); a pipeline such as
``"topk(0.01) | quant(bits=8)"`` feeds every tensor field of one stage into the next. What is left as a tensor
at the end is stored raw. The tree maps one-to-one onto the wire format (:mod:`deltaplane.codecs.wire`).

Codecs are small keyword-only objects whose constructor arguments are their hyperparameters (scikit-learn
style), so the canonical spec, ``repr`` and :func:`get_codec` round-trip:
``get_codec(repr(c)).spec == c.spec``.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from deltaplane.errors import CodecError, DecodeError, SpecError
from deltaplane.specs import Scalar, format_spec, parse_spec

# the grammar lives in deltaplane.specs (no torch); it stays importable from here, where codecs were built from it

__all__ = [
    "Codec",
    "Encoded",
    "Pipeline",
    "available_codecs",
    "encode_stages_ragged",
    "encode_stages_rows",
    "format_spec",
    "get_codec",
    "parse_spec",
    "register_codec",
    "split_lossless",
]

_REGISTRY: dict[str, type[Codec]] = {}


@dataclass(frozen=True)
class Encoded:
    """One encoded tensor: the codec stage that made it, the shape it decodes to, small metadata and fields.

    ``fields`` values are ``bytes`` (final) or, within a pipeline, a nested :class:`Encoded` (a float field
    compressed by the next stage) or a float ``Tensor`` (not yet serialized).
    """

    codec: str
    shape: tuple[int, ...]
    meta: dict[str, Scalar] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes of all field payloads in the tree (headers excluded)."""
        total = 0
        for v in self.fields.values():
            if isinstance(v, Encoded):
                total += v.nbytes()
            elif isinstance(v, bytes | bytearray | memoryview):
                total += len(v)
            elif isinstance(v, Tensor):
                total += v.numel() * v.element_size()
        return total


class Codec:
    """Base class of single-stage codecs. Subclasses set ``name`` and implement ``encode``/``decode``.

    ``encode`` takes a float tensor and a ``torch.Generator`` (the only source of randomness, so results are
    reproducible given a seed); ``decode`` receives an :class:`Encoded` whose nested fields are already decoded
    to tensors, validates every length against the shape and raises :class:`DecodeError` on any mismatch.
    """

    name: ClassVar[str] = ""
    #: positional order of parameters in specs like ``topk(0.01)``
    positional: ClassVar[tuple[str, ...]] = ()
    #: True for codecs that carry per-device, per-tensor state across rounds (PowerSGD's warm start);
    #: they implement :meth:`encode_stateful`. Plain codecs stay stateless.
    stateful: ClassVar[bool] = False
    #: True for a lossless stage that compresses the whole framed payload (``zstd``): it may only be the
    #: last stage of a pipeline and is applied by the wire format, not per tensor.
    lossless: ClassVar[bool] = False
    #: True for a stage whose decode gives back its input bit for bit (``identity``): error feedback then
    #: needs no trial decode, since nothing is lost.
    exact: ClassVar[bool] = False
    #: True for a stage that sends only some coordinates (top-k, rand-k, threshold, STC): most decoded values
    #: are zero, which coordinate-wise robust rules cannot tell from a vote for zero
    sparsifies: ClassVar[bool] = False
    #: True when :meth:`check` reads only a node's codec, shape, meta, nested nodes' shapes and its byte
    #: fields' kinds and lengths, never their bytes: its verdict is then the same for every payload of one
    #: compact skeleton, which a wire session checks once (:func:`~deltaplane.codecs.preflight.check_nodes`).
    #: False (the default) for a check that reads a field's content (an index stream's Golomb parameter).
    structural_check: ClassVar[bool] = False

    @property
    def contractive(self) -> bool:
        """False for a codec whose error can exceed the value it compresses: ``‖C(x) − x‖ ≥ ‖x‖``.

        Error feedback carries that error into the next round and only converges with a contraction
        (Karimireddy et al. 2019, https://arxiv.org/abs/1901.09847); unbiased, high-variance codecs (TernGrad,
        low-bit norm-scaled QSGD, rescaled rand-k) are not one. :class:`~deltaplane.codecs.Compressor` warns.
        """
        return True

    #: True for a codec that picks another codec per parameter name (:class:`~deltaplane.codecs.policy.Policy`)
    selects_by_name: ClassVar[bool] = False
    #: the fields a node of this codec carries on the wire: byte buffers, and float tensors (nested nodes,
    #: which a later pipeline stage may have encoded). A received node with any other field is refused.
    byte_fields: ClassVar[tuple[str, ...]] = ()
    tensor_fields: ClassVar[tuple[str, ...]] = ()

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        raise NotImplementedError

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """Encode every row of a stack ``x`` of shape ``(C, *shape)``: ``[encode(x[i], rngs[i]) for i ...]``.

        Many devices' updates of one tensor, stacked (the batched simulator trains them that way), can be
        encoded with one selection or one quantization over the whole ``(C, n)`` matrix instead of ``C``
        small ones. Every override must give exactly what this default gives, bytes and random draws included
        (``rngs[i]`` is row ``i``'s generator and is advanced exactly as ``encode`` would advance it); each
        row still becomes its own :class:`Encoded`, because each device sends its own payload.
        """
        if x.dim() < 1 or x.shape[0] != len(rngs):
            raise CodecError(
                f"{self.name}: encode_rows needs one generator per row; got {len(rngs)} for shape "
                f"{tuple(x.shape)}"
            )
        return [self.encode(x[i], rng) for i, rng in enumerate(rngs)]

    def encode_ragged(self, xs: Sequence[Tensor], rngs: Sequence[torch.Generator]) -> list[Encoded]:
        """Encode one tensor a row whose shapes differ (threshold's or approximate top-k's kept values, one
        count per device): ``[encode(xs[i], rngs[i]) for i ...]``.

        The ragged counterpart of :meth:`encode_rows`, with the same contract: every override gives exactly
        what this default gives, bytes and random draws included, and computes on all rows at once.
        """
        if len(xs) != len(rngs):
            raise CodecError(
                f"{self.name}: encode_ragged needs one generator per row; got {len(rngs)} for {len(xs)}"
            )
        return [self.encode(x, rng) for x, rng in zip(xs, rngs, strict=True)]

    def encode_stateful(self, x: Tensor, rng: torch.Generator, state: dict[str, Any]) -> Encoded:
        """Encode with this tensor's per-device state dict (read and updated in place).

        ``state`` belongs to one tensor of one device (it lives in a
        :class:`~deltaplane.codecs.compressor.CompressorState`); stateless codecs ignore it.
        """
        return self.encode(x, rng)

    def decode(self, e: Encoded) -> Tensor:
        raise NotImplementedError

    def check(self, e: Encoded) -> None:
        """Validate a received node before anything is decoded or allocated; raise :class:`DecodeError`.

        ``e`` comes straight off the wire: byte fields are ``bytes`` and tensor fields are undecoded nested
        :class:`Encoded` nodes (only their shapes are known). Every count and length the node implies is
        checked here against its shape, so :meth:`decode` never allocates or computes for a size the
        payload cannot back (see :func:`deltaplane.codecs.preflight.preflight`). Overrides call this one
        first: it checks that the node carries exactly the declared fields, each of the right kind.
        """
        declared = set(self.byte_fields) | set(self.tensor_fields)
        if set(e.fields) != declared:
            raise DecodeError(f"{e.codec}: fields {sorted(e.fields)}, expected exactly {sorted(declared)}")
        for k in self.byte_fields:
            if not isinstance(e.fields[k], bytes | bytearray | memoryview):
                raise DecodeError(f"{e.codec}: field '{k}' must be a byte buffer, not a nested node")
        for k in self.tensor_fields:
            if not isinstance(e.fields[k], Encoded):
                raise DecodeError(f"{e.codec}: field '{k}' must be a nested node, not a byte buffer")

    def max_field_bytes(self, e: Encoded) -> dict[str, int]:
        """The most bytes each byte field of ``e`` may hold, from its shape, meta and nested nodes' shapes only.

        Never reads a field's bytes, so a reader can bound a field before it has them: a compact frame's
        entropy-coded field (:mod:`~deltaplane.codecs.fieldcoding`) is refused when it declares more than
        this, before any of it is expanded (a 3-byte coded field may otherwise declare, and cost the
        receiver the decoding of, the whole decode budget). Each bound is at least what :meth:`check`
        accepts, so no payload it accepts is refused; a byte field left out is bounded only by the decode
        budget. Codecs with byte fields override it.
        """
        return {}

    @staticmethod
    def _child_shape(e: Encoded, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a nested node ``name`` of ``e`` unless it decodes to exactly ``shape``."""
        got = e.fields[name].shape
        if tuple(got) != tuple(shape):
            raise DecodeError(f"{e.codec}: field '{name}' has shape {list(got)}, expected {list(shape)}")

    def decode_rows(self, rows: Sequence[Encoded]) -> Tensor:
        """Decode nodes of one shape made by this codec into one ``(C, *shape)`` stack.

        Exactly ``torch.stack([decode(e) for e in rows])``, validation included; overrides run the
        arithmetic on the stack (error feedback needs what every device sent: see
        :func:`~deltaplane.codecs.compressor.compress_many`).
        """
        return torch.stack([self.decode(e) for e in rows])

    def decode_ragged(self, rows: Sequence[Encoded]) -> list[Tensor]:
        """Decode nodes made by this codec whose shapes differ (approximate top-k's or threshold's values,
        one count per device): exactly ``[decode(e) for e in rows]``, validation included.

        Overrides decode every row's data in one pass and hand back a tensor per row.
        """
        return [self.decode(e) for e in rows]

    # -- hyperparameters, sklearn style ------------------------------------------------------------
    def get_params(self) -> dict[str, Scalar]:
        """Constructor arguments, read back from attributes of the same name."""
        return {p: getattr(self, p) for p in _hyperparameters(type(self))}

    @property
    def spec(self) -> str:
        """Canonical text spec, e.g. ``"topk(ratio=0.01)"``.

        Every parameter is spelled out, defaults included: the spec travels in payloads, and a payload must
        decode the same even if a later release changes a default.
        """
        return format_spec(self.name, self.get_params())

    def __repr__(self) -> str:
        return self.spec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __or__(self, other: Codec) -> Pipeline:
        return Pipeline([self, other])

    # -- helpers for strict decoding ----------------------------------------------------------------
    @staticmethod
    def _field(e: Encoded, name: str, kind: type) -> Any:
        v = e.fields.get(name)
        if v is None:
            raise DecodeError(f"{e.codec}: missing field '{name}'")
        if kind is bytes and isinstance(v, bytes | bytearray | memoryview):
            return bytes(v)
        if kind is Tensor and isinstance(v, Tensor):
            return v
        raise DecodeError(f"{e.codec}: field '{name}' has the wrong kind ({type(v).__name__})")

    @staticmethod
    def _expect_len(e: Encoded, name: str, data: bytes, n: int) -> None:
        if len(data) != n:
            raise DecodeError(f"{e.codec}: field '{name}' holds {len(data)} bytes, expected {n}")


_HYPERPARAMETERS: dict[type[Codec], dict[str, inspect.Parameter]] = {}


def _hyperparameters(cls: type[Codec]) -> dict[str, inspect.Parameter]:
    """The keyword parameters of ``cls.__init__`` (a codec's hyperparameters); callers must not mutate it.

    Cached: ``inspect.signature`` costs ~1.5 ms (far more for a builtin ``__init__``), and every decode asks
    for each tensor's codec spec; uncached it was most of a simulated round's time. A dict, not
    ``functools.cache``: its wrapper types its arguments as ``Hashable``, which mypy denies a class whose
    instances define ``__hash__``.
    """
    params = _HYPERPARAMETERS.get(cls)
    if params is None:
        sig = inspect.signature(cls.__init__)
        params = _HYPERPARAMETERS[cls] = {
            k: p
            for k, p in sig.parameters.items()
            if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
    return params


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available to :func:`get_codec` under ``cls.name``."""
    if not cls.name or not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name):
        raise CodecError(f"invalid codec name {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available_codecs() -> dict[str, type[Codec]]:
    """Registered codec names and classes."""
    return dict(_REGISTRY)


def _build(name: str, args: list[Scalar], kwargs: dict[str, Scalar]) -> Codec:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise SpecError(f"unknown codec '{name}'; available: {', '.join(sorted(_REGISTRY))}")
    if len(args) > len(cls.positional):
        raise SpecError(f"{name}: takes at most {len(cls.positional)} positional value(s), got {len(args)}")
    params = dict(zip(cls.positional, args, strict=False))
    for k, v in kwargs.items():
        if k in params:
            raise SpecError(f"{name}: '{k}' given twice")
        params[k] = v
    allowed = list(_hyperparameters(cls))
    unknown = set(params) - set(allowed)
    if unknown:
        raise SpecError(f"{name}: unknown parameter(s) {sorted(unknown)}; allowed: {allowed}")
    try:
        return cls(**params)
    except SpecError:
        raise
    except (
        CodecError,
        TypeError,
        ValueError,
        ArithmeticError,
    ) as exc:  # a bad value in a spec is a spec error
        raise SpecError(f"{name}: {exc}" if isinstance(exc, ArithmeticError) else str(exc)) from exc


def get_codec(spec: str | Codec) -> Codec:
    """Build a codec (or a :class:`Pipeline`) from its text spec.

    Example:
        >>> from deltaplane.codecs import get_codec
        >>> get_codec("topk(0.01) | quant(bits=4)").spec
        'topk(ratio=0.01) | quant(bits=4, stochastic=false, chunk=512, scale=max)'
    """
    if isinstance(spec, Codec):
        return spec
    import deltaplane.codecs  # noqa: F401  (registers the built-in codecs)

    stages = [_build(*stage) for stage in parse_spec(spec)]
    if len(stages) == 1:
        return stages[0]
    try:
        return Pipeline(stages)
    except SpecError:
        raise
    except CodecError as exc:  # an impossible order of stages in a spec string is a spec error
        raise SpecError(str(exc)) from exc


# -- pipelines -------------------------------------------------------------------------------------------
class Pipeline(Codec):
    """Stages applied in order: every float field a stage leaves is encoded by the rest of the pipeline.

    A final lossless stage (``zstd``) is kept in the spec but not applied per tensor: the wire format applies
    it to the whole payload (see :func:`split_lossless`).
    """

    name = "pipeline"

    def __init__(self, stages: list[Codec]) -> None:
        flat: list[Codec] = []
        for s in stages:
            flat.extend(s.stages if isinstance(s, Pipeline) else [s])
        if not flat:
            raise CodecError("a pipeline needs at least one stage")
        for i, s in enumerate(flat):
            if s.lossless and i != len(flat) - 1:
                raise CodecError(f"'{s.spec}' compresses the whole payload: it must be the last stage")
            if s.selects_by_name and (i != 0 or any(not t.lossless for t in flat[1:])):
                raise CodecError(
                    f"'{s.name}' chooses a codec per tensor: it can only be followed by a lossless stage; "
                    "put the other stages inside its rules"
                )
            later = flat[i + 1] if i + 1 < len(flat) else None
            if later is not None and not later.lossless and not s.tensor_fields:
                # a stage only ever compresses the float fields the one before it leaves: after a stage that
                # leaves none (quant, sign, stc, identity...) it would silently never run
                raise CodecError(
                    f"'{s.spec}' leaves no float field for a later stage to compress, so '{later.spec}' would "
                    "never run; a stage that keeps float values (topk, randk, threshold, powersgd) comes first, "
                    "e.g. 'topk(0.01) | quant(bits=4)'"
                )
        self.stages: list[Codec] = flat

    @property
    def spec(self) -> str:
        return " | ".join(s.spec for s in self.stages)

    @property
    def stateful(self) -> bool:  # type: ignore[override]  # a class attribute on Codec, derived from the stages here
        return any(s.stateful for s in self.stages)

    @property
    def selects_by_name(self) -> bool:  # type: ignore[override]  # as stateful: derived from the first stage
        return self.stages[0].selects_by_name

    @property
    def contractive(self) -> bool:
        return all(s.contractive for s in self.stages)

    def get_params(self) -> dict[str, Scalar]:
        return {"stages": self.spec}

    def _tensor_stages(self) -> list[Codec]:
        return self.stages[:-1] if self.stages[-1].lossless and len(self.stages) > 1 else self.stages

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        return encode_stages(self._tensor_stages(), x, rng, None, "")

    def encode_stateful(self, x: Tensor, rng: torch.Generator, state: dict[str, Any]) -> Encoded:
        return encode_stages(self._tensor_stages(), x, rng, state, "")

    def encode_rows(self, x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
        if self.stateful:  # state is per device and per tensor: no stack to share
            return super().encode_rows(x, rngs)
        return encode_stages_rows(self._tensor_stages(), x, rngs)

    def decode(self, e: Encoded) -> Tensor:
        return decode_tree(e)


def split_lossless(codec: Codec) -> tuple[Codec, Codec | None]:
    """Split ``codec`` into its per-tensor part and its final whole-payload lossless stage (or ``None``)."""
    if isinstance(codec, Pipeline) and codec.stages[-1].lossless:
        rest = codec.stages[:-1]
        if not rest:
            return _identity(), codec.stages[-1]
        return (rest[0] if len(rest) == 1 else Pipeline(rest)), codec.stages[-1]
    if codec.lossless:
        return _identity(), codec
    return codec, None


def _identity() -> Codec:
    return get_codec("identity")


def encode_stages(
    stages: list[Codec], x: Tensor, rng: torch.Generator, state: dict[str, Any] | None, path: str = ""
) -> Encoded:
    """Run ``stages`` on ``x``: every tensor field of a stage goes through the rest of the stages.

    ``state`` (one tensor's per-device state, updated in place) gives each stateful stage a slot keyed by
    its place in the tree: ``"/"`` for the first stage, ``"/p"`` for a stage applied to field ``p``...
    """
    # each stage applied at each place in the tree gets its own state slot, keyed by that place
    first = stages[0]
    if state is not None and first.stateful:
        slot = state.get(path or "/", {})
        e = first.encode_stateful(x, rng, slot)
        if slot:  # a stage that fell back to a plain codec keeps no empty entries
            state[path or "/"] = slot
    else:
        e = first.encode(x, rng)
    if len(stages) == 1:
        return e
    fields = {
        k: encode_stages(stages[1:], v, rng, state, f"{path}/{k}") if isinstance(v, Tensor) else v
        for k, v in e.fields.items()
    }
    return Encoded(e.codec, e.shape, e.meta, fields)


def encode_stages_rows(stages: list[Codec], x: Tensor, rngs: Sequence[torch.Generator]) -> list[Encoded]:
    """Row-wise :func:`encode_stages` of stateless ``stages`` over a stack ``x`` of shape ``(C, *shape)``.

    Gives exactly ``[encode_stages(stages, x[i], rngs[i], None) for i ...]``: the first stage encodes all
    rows at once (:meth:`Codec.encode_rows`), and each tensor field the rows share (same name, shape and
    dtype in every row, e.g. top-k's ``values`` with the same ``k``) is stacked and sent through the rest
    of the stages together. Fields are visited in the order one row's encode visits them, so every row's
    generator sees the same draws; a field whose shape differs between rows (threshold's ``values``) goes
    through the rest of the stages ragged (:func:`encode_stages_ragged`). Rows sharing one generator object are encoded one after the other (their draws interleave by row, not by stage).
    """
    if x.dim() < 1 or x.shape[0] != len(rngs):
        raise CodecError(
            f"encode_rows needs one generator per row; got {len(rngs)} for shape {tuple(x.shape)}"
        )
    if len({id(g) for g in rngs}) != len(rngs):
        return [encode_stages(stages, x[i], g, None) for i, g in enumerate(rngs)]
    rows = stages[0].encode_rows(x, rngs)
    return _encode_fields(stages[1:], rows, rngs)


def encode_stages_ragged(
    stages: list[Codec], xs: Sequence[Tensor], rngs: Sequence[torch.Generator]
) -> list[Encoded]:
    """Row-wise :func:`encode_stages` of stateless ``stages`` over one tensor a row, of different shapes.

    Gives exactly ``[encode_stages(stages, xs[i], rngs[i], None) for i ...]``: the first stage encodes all
    rows at once (:meth:`Codec.encode_ragged`; a ``quant`` stage after threshold or approximate top-k), and
    their tensor fields go on through the rest of the stages as :func:`encode_stages_rows` sends them.
    """
    if len(xs) != len(rngs):
        raise CodecError(f"encode_ragged needs one generator per row; got {len(rngs)} for {len(xs)} rows")
    if len({id(g) for g in rngs}) != len(rngs):
        return [encode_stages(stages, x, g, None) for x, g in zip(xs, rngs, strict=True)]
    return _encode_fields(stages[1:], stages[0].encode_ragged(xs, rngs), rngs)


def _encode_fields(rest: list[Codec], rows: list[Encoded], rngs: Sequence[torch.Generator]) -> list[Encoded]:
    """Send each tensor field of one stage's row nodes through the ``rest`` of the stages, all rows together.

    Fields are visited in the order one row's encode visits them, so every row's generator sees the same
    draws. A field of one shape and dtype in every row (top-k's ``values`` with the same ``k``) is stacked
    (:func:`encode_stages_rows`); one of different shapes (threshold's ``values``) is encoded ragged
    (:func:`encode_stages_ragged`).
    """
    if not rest or not rows:
        return rows
    layout = [(k, isinstance(v, Tensor)) for k, v in rows[0].fields.items()]
    if any([(k, isinstance(v, Tensor)) for k, v in e.fields.items()] != layout for e in rows[1:]):
        return [  # rows laid out differently: one row at a time, as encode_stages would
            Encoded(
                e.codec,
                e.shape,
                e.meta,
                {
                    k: encode_stages(rest, v, g, None) if isinstance(v, Tensor) else v
                    for k, v in e.fields.items()
                },
            )
            for e, g in zip(rows, rngs, strict=True)
        ]
    fields: list[dict[str, Any]] = [{} for _ in rows]
    for k, is_tensor in layout:
        vals = [e.fields[k] for e in rows]
        if not is_tensor:
            encoded: list[Any] = vals
        elif all(v.shape == vals[0].shape and v.dtype == vals[0].dtype for v in vals):
            encoded = encode_stages_rows(rest, torch.stack(vals), rngs)
        else:
            encoded = encode_stages_ragged(rest, vals, rngs)
        for f, v in zip(fields, encoded, strict=True):
            f[k] = v
    return [Encoded(e.codec, e.shape, e.meta, f) for e, f in zip(rows, fields, strict=True)]


@functools.lru_cache(maxsize=1024)
def _decoder(spec: str) -> Codec:
    # Codecs are immutable, and a payload names the same few specs on every node: parse each once.
    return get_codec(spec)


def _node_codec(e: Encoded) -> Codec:
    try:
        codec = _decoder(e.codec)
    except SpecError as exc:
        raise DecodeError(f"cannot decode: {exc}") from exc
    if isinstance(codec, Pipeline):
        raise DecodeError(f"an encoded node must name one codec stage, got pipeline '{e.codec}'")
    if codec.selects_by_name or codec.lossless:
        # a policy names the codec it picked in each node, and zstd is a flag of the frame: a node naming
        # either is malformed (a policy node would otherwise decode itself forever)
        raise DecodeError(f"an encoded node must name a tensor codec, got '{codec.name}'")
    return codec


def decode_tree_rows(trees: Sequence[Encoded]) -> Tensor:
    """:func:`decode_tree` of many trees into one ``(C, *shape)`` stack, exactly.

    The trees must decode to one shape. Trees laid out alike (same codec and shape at every node, the same
    fields) are decoded level by level with :meth:`Codec.decode_rows`; where they differ (an approximate
    top-k keeps a different count per device), one tree at a time.
    """
    first = trees[0]
    if any(e.shape != first.shape for e in trees):
        raise DecodeError(f"cannot stack trees of shapes {sorted({e.shape for e in trees})}")
    if any(e.codec != first.codec or e.fields.keys() != first.fields.keys() for e in trees):
        return torch.stack([decode_tree(e) for e in trees])
    codec = _node_codec(first)
    fields: list[dict[str, Any]] = [{} for _ in trees]
    for k in first.fields:
        vals = [e.fields[k] for e in trees]
        if all(isinstance(v, Encoded) and v.shape == vals[0].shape for v in vals):
            decoded: Sequence[Any] = decode_tree_rows(vals).unbind(0)
        elif all(isinstance(v, Encoded) for v in vals):  # one node per row, of different shapes
            decoded = decode_tree_ragged(vals)
        else:
            decoded = [decode_tree(v) if isinstance(v, Encoded) else v for v in vals]
        for f, v in zip(fields, decoded, strict=True):
            f[k] = v
    out = codec.decode_rows(
        [Encoded(e.codec, e.shape, e.meta, f) for e, f in zip(trees, fields, strict=True)]
    )
    if tuple(out.shape) != (len(trees), *first.shape):
        raise DecodeError(f"{first.codec}: decoded shape {tuple(out.shape[1:])} != declared {first.shape}")
    return out


def decode_tree_ragged(trees: Sequence[Encoded]) -> list[Tensor]:
    """:func:`decode_tree` of each of many trees whose shapes differ, exactly (one tensor per tree).

    Leaf nodes of one codec and the same fields (a raw float node or a ``quant`` node per row, each of
    its own count) are decoded together (:meth:`Codec.decode_ragged`); any other trees one at a time.
    """
    first = trees[0]
    if any(
        e.codec != first.codec
        or e.fields.keys() != first.fields.keys()
        or any(isinstance(v, Encoded) for v in e.fields.values())
        for e in trees
    ):
        return [decode_tree(e) for e in trees]
    codec = _node_codec(first)
    out = codec.decode_ragged(trees)
    for e, t in zip(trees, out, strict=True):
        if tuple(t.shape) != tuple(e.shape):
            raise DecodeError(f"{e.codec}: decoded shape {tuple(t.shape)} != declared {e.shape}")
    return out


def decode_tree(e: Encoded) -> Tensor:
    """Decode an :class:`Encoded` tree bottom-up: nested fields first, then the node's own codec."""
    codec = _node_codec(e)
    fields = {k: decode_tree(v) if isinstance(v, Encoded) else v for k, v in e.fields.items()}
    out = codec.decode(Encoded(e.codec, e.shape, e.meta, fields))
    if tuple(out.shape) != tuple(e.shape):  # a codec bug, but never hand back a wrongly shaped tensor
        raise DecodeError(f"{e.codec}: decoded shape {tuple(out.shape)} != declared {e.shape}")
    return out
