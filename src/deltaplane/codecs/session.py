"""Compact wire frames: agree once on what updates look like, then send only what varies.

A self-describing payload (:mod:`deltaplane.codecs.wire`) repeats its tensor table in every update: names,
dtypes, codec specs, shapes, metadata and field lengths, ~150 bytes on the digits CNN, which at 0.3% density
is half of each payload. Within a federated session the device and the server already agree on all of that
except a few numbers, so they fix it once in a :class:`WireSession` — the model's
:class:`~deltaplane.codecs.layout.Layout`, the uplink codec spec, the base model id, and a **template**: the
tensor table of one reference update (a seeded random delta of the layout encoded with the codec). Each
update then travels as a *compact frame*::

    magic b"DQ" | u8 version (=1) | session id (6 bytes) | varint base version | varint skeleton length
    | skeleton | data | u32 CRC32C of everything before it

The **skeleton** holds, per tensor in layout order, only the values in which the update's table differs from
the template's (an index stream's length, the index coder top-k chose, rand-k's seed, an approximate top-k's
count, the lossless coding of a field): ``varint h``; ``h = 0`` is followed by the tensor's node as
self-describing JSON (``varint length | JSON``: a tree shaped unlike the template); ``h = d + 1`` by ``d``
changes, each ``varint gap | typed value`` (the gap counts the unchanged values since the previous change; an
integer is a zig-zag varint difference from the template's value, a string its index in the session's small
vocabulary — the template's strings and the index coders — or else its UTF-8 bytes). The *data*
holds every byte field in table order, each in the lossless coding the skeleton names for it
(:mod:`deltaplane.codecs.fieldcoding`; raw unless the session codes entropy), or one zstd frame of them when
the codec ends in ``zstd``. Decoding rebuilds the self-describing table from template and skeleton and then
runs exactly the self-describing reader's checks (node schema, the session layout, the decode budget, every
codec's counts) before the data is read, so a compact payload is as strict as a self-describing one and never
makes the receiver allocate beyond its model's size; on top of that, a payload of another session
(:class:`~deltaplane.errors.SessionMismatch`) or base version (:class:`~deltaplane.errors.VersionMismatch`)
is refused from its first bytes. The session id is the first 6 bytes of the SHA-256 of the session's
canonical JSON (:meth:`WireSession.to_json`), so both sides holding equal sessions derive equal ids and any
difference in layout, codec, base id, coding or template changes it.

Example:
    >>> import torch, deltaplane as dp
    >>> from deltaplane.codecs import WireSession
    >>> model = {"fc.weight": torch.zeros(64, 256), "fc.bias": torch.zeros(64)}
    >>> session = WireSession.create(dp.Layout.of(model), "topk(0.003) | quant(bits=4)", base_id="cnn")
    >>> update = dp.Delta({k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    ...                    for k, v in model.items()})
    >>> compact = dp.Compressor(session.codec, seed=0).compress(update, base_version=3, session=session)
    >>> full = dp.Compressor(session.codec, seed=0).compress(update, base_id="cnn", base_version=3)
    >>> len(compact), len(full)  # bytes: the tensor table travels once, in the session
    (115, 209)
    >>> got = dp.decompress(compact, session=session, expect_base=("cnn", 3))
    >>> torch.equal(got["fc.weight"], dp.decompress(full)["fc.weight"])
    True
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from operator import itemgetter
from typing import Any

import crc32c
import torch

from deltaplane.codecs.base import Codec, Encoded, _decoder, get_codec, split_lossless
from deltaplane.codecs.entropy import INDEX_CODERS
from deltaplane.codecs.layout import Layout
from deltaplane.codecs.lowrank import PowerSGD
from deltaplane.codecs.preflight import check_field_bytes
from deltaplane.codecs.preflight import field_lengths as _field_lengths
from deltaplane.codecs.wire import (
    Limits,
    Table,
    WireHeader,
    _Reader,
    check_containers,
    json_containers,
    node_shapes_in_bulk,
)
from deltaplane.errors import (
    CodecError,
    DecodeError,
    DeltaplaneError,
    SessionMismatch,
    ShapeMismatch,
    SpecError,
    VersionMismatch,
)

__all__ = [
    "COMPACT_MAGIC",
    "COMPACT_VERSION",
    "SESSION_ID_BYTES",
    "WireSession",
    "check_session_layout",
    "is_compact",
]

COMPACT_MAGIC = b"DQ"
COMPACT_VERSION = 1
SESSION_ID_BYTES = 6
_CRC = struct.Struct("<I")
#: smallest possible frame: magic, version, id, base version, skeleton length, CRC
#: skeletons up to this size are remembered, the most recent this many per session (WireSession.read_table)
_SKELETON_CACHE_BYTES = 4096
_SKELETON_CACHE_SIZE = 64
#: ...and at most this many tensors' tables in all: a remembered table holds ~750 bytes per tensor, so a layout
#: of thousands of tiny tensors remembers fewer skeletons (64 of a 4,000-tensor layout held ~190 MB; now ≤ ~12 MB)
_SKELETON_CACHE_TENSORS = 16_384
#: skeleton parts :meth:`WireSession.pack` remembers per session (see _tree_key)
_PACK_MEMO_SIZE = 1024
#: guards the two caches' evictions: a service decodes uploads in several threads with one session, and
#: ``next(iter(cache))`` raises if another thread changes the dict between the two calls
_CACHE_LOCK = threading.Lock()
_F64 = struct.Struct("<d")
_MIN_FRAME = len(COMPACT_MAGIC) + 1 + SESSION_ID_BYTES + 1 + 1 + _CRC.size
#: the template's reference update: a seeded normal delta, scaled like a small training step
_TEMPLATE_SEED = 20261202
_TEMPLATE_SCALE = 1e-2
#: most bytes a session's canonical JSON may hold (a session is fetched from the server once)
MAX_SESSION_BYTES = 64 << 20
#: objects and arrays a compact frame's whole JSON node may hold besides one per ``Limits.header_bytes_per_container``
#: bytes: a node has no sender metadata, and the deepest honest one (8 nested nodes of 4) holds 32
NODE_CONTAINER_FLOOR = 64
#: a wire session's text up to its template, in canonical form (keys sorted, no spaces) or as the server sends
#: :meth:`WireSession.to_json` (``"v"`` first, compact, UTF-8): the scalar keys, then each layout row
#: ``["name","dtype",[d0,d1,...]]`` (:meth:`Layout.to_json`); a string holds no unescaped quote, so a row
#: matched here is a row of the text, never bytes inside a string
_JSON_STR = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_LAYOUT_ROW = re.compile(rb"\[" + _JSON_STR + rb',"[a-z0-9]++",\[(?:\d++(?:,\d++)*+)?+\]\]')
_SESSION_HEAD = re.compile(
    rb'\{(?:"v":\d++,)?"base_id":'
    + _JSON_STR
    + rb',"codec":'
    + _JSON_STR
    + rb',"entropy":(?:true|false),"layout":\[((?:'
    + _LAYOUT_ROW.pattern
    + rb"(?:,"
    + _LAYOUT_ROW.pattern
    + rb')*+)?+)\],"template":\['
)


def _layout_rows(text: bytes) -> int:
    """How many layout rows a session text holds, read from its compact head without parsing it (0 when the
    text is spaced or its keys in another order: only :attr:`Limits.min_session_containers` applies then)."""
    head = _SESSION_HEAD.match(text)
    return 0 if head is None else _LAYOUT_ROW.subn(b"", head.group(1))[1]


def is_compact(payload: bytes | bytearray | memoryview) -> bool:
    """Whether ``payload`` starts like a compact frame (``b"DQ"``), not a self-describing one (``b"DPLN"``)."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        return False
    return bytes(payload[: len(COMPACT_MAGIC)]) == COMPACT_MAGIC


def _fail(msg: str) -> DecodeError:
    return DecodeError(f"invalid compact payload: {msg}")


# -- varints ---------------------------------------------------------------------------------------------
def _put_varint(out: bytearray, v: int) -> None:
    if v < 0:
        raise CodecError(f"compact frame: cannot write negative varint {v}")
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


class _Cursor:
    """Reads varints and byte strings from a bounded view; any overrun is a :class:`DecodeError`."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def varint(self, what: str) -> int:
        v = shift = 0
        while True:
            if self.pos >= self.end:
                raise _fail(f"truncated in {what}")
            b = self.buf[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                if shift and b == 0:
                    raise _fail(f"{what}: varint has a redundant trailing byte")
                return v
            shift += 7
            if shift > 63:
                raise _fail(f"{what}: varint longer than 64 bits")

    def take(self, n: int, what: str) -> memoryview:
        if n > self.end - self.pos:
            raise _fail(f"{what}: {n} bytes declared, {self.end - self.pos} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


def _zigzag(v: int) -> int:
    return (v << 1) if v >= 0 else ((-v << 1) - 1)


def _unzigzag(v: int) -> int:
    return (v >> 1) if not v & 1 else -((v + 1) >> 1)


# -- trees as (signature, values) ------------------------------------------------------------------------
#: codecs whose fields are plain floats (or a raw tensor), not codes or positions: never entropy-coded, so an
#: fp32 baseline stays exactly its raw size
_PLAIN = frozenset({"identity", "fp16", "bf16"})


def _plain(codec: str, field_name: str) -> bool:
    """Whether a byte field holds plain floats (raw tensors, fp16/bf16, fp32 scales): never entropy-coded;
    only codes, signs, trits and index streams are."""
    return codec.split("(")[0] in _PLAIN or field_name == "scales"


def _node_doc(e: Encoded, codings: list[tuple[bool, Any]] | None = None) -> dict[str, Any]:
    """The self-describing JSON node of a finalized tree (byte fields as lengths), as :func:`wire.pack` writes;
    collects ``(plain float field?, bytes)`` of each byte field into ``codings``."""
    out: dict[str, Any] = {"c": e.codec, "s": list(e.shape)}
    if e.meta:
        out["m"] = dict(sorted(e.meta.items()))
    fields: dict[str, Any] = {}
    for k, v in sorted(e.fields.items()):
        if isinstance(v, Encoded):
            fields[k] = _node_doc(v, codings)
        elif isinstance(v, bytes | bytearray | memoryview):
            fields[k] = len(v)
            if codings is not None:
                codings.append((_plain(e.codec, k), v))
        else:
            raise CodecError(f"field '{k}' is not finalized ({type(v).__name__}); call finalize() first")
    out["f"] = fields
    return out


def _signature(doc: dict[str, Any], sig: list[Any]) -> None:
    """What must match the template for a node to travel as changes: codecs, ranks, meta keys, field kinds."""
    fields = doc["f"]
    sig.append(
        (
            doc["c"],
            len(doc["s"]),
            tuple(sorted(doc.get("m", {}))),
            tuple((k, isinstance(v, dict)) for k, v in sorted(fields.items())),
        )
    )
    for _, v in sorted(fields.items()):
        if isinstance(v, dict):
            _signature(v, sig)


def _rank(spec: str) -> int:
    """The PowerSGD rank a node's codec spec asks for (0 for any other codec, or a spec the node checks
    refuse anyway)."""
    try:
        codec = _decoder(spec)
    except SpecError:
        return 0
    return codec.rank if isinstance(codec, PowerSGD) else 0


def _check_rank(e: Encoded, agreed: int, where: str) -> None:
    """Refuse a node (or nested node) of ``e`` asking for a PowerSGD rank above the session's ``agreed`` one:
    decoding costs ``m·n·rank``, and an honest sender's nodes name the template's codecs."""
    rank = _rank(e.codec)
    if rank > agreed:
        raise _fail(
            f"{where}: '{e.codec}' asks for PowerSGD rank {rank}, above the session codec's "
            + (f"rank {agreed}" if agreed else "none (it uses no PowerSGD)")
        )
    for child in e.fields.values():
        if isinstance(child, Encoded):
            _check_rank(child, agreed, where)


def _values(doc: dict[str, Any], out: list[Any], codings: Iterator[tuple[int, int]] | None) -> None:
    """The node's values in order: shape, meta values, then per byte field ``length, coding, stored − length``
    (a raw field: ``length, 0, 0``)."""
    out.extend(doc["s"])
    out.extend(v for _, v in sorted(doc.get("m", {}).items()))
    for _, v in sorted(doc["f"].items()):
        if isinstance(v, dict):
            _values(v, out, codings)
        else:
            coding, stored = next(codings) if codings is not None else (0, v)
            out.extend((v, coding, stored - v))


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, size: int) -> None:
    """``cache[key] = value``, first dropping the oldest entries so that at most ``size`` remain."""
    with _CACHE_LOCK:
        while len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[key] = value


def _tree_key(e: Encoded, raw: list[tuple[bool, Any]]) -> tuple[Any, ...] | None:
    """Everything of a finalized tree its compact skeleton part depends on, as a type-exact hashable key:
    codecs, shapes, meta (a float by its 8 bytes, so -0.0 and NaN payloads stay apart; bool and int apart),
    field names, kinds and byte lengths; collects ``(plain float field?, bytes)`` of each byte field into
    ``raw`` as :func:`_node_doc` does. ``None`` (and ``raw`` unusable) for anything unusual: such a tree is
    framed from scratch, and :func:`_node_doc` says what is wrong with it."""
    codec, shape = e.codec, e.shape
    if type(codec) is not str or type(shape) is not tuple:
        return None
    for d in shape:
        if type(d) is not int:
            return None
    meta = []
    for k, v in sorted(e.meta.items()):
        t = type(v)
        if type(k) is not str or t not in _META_TYPES:
            return None
        meta.append((k, t, _F64.pack(v) if t is float else v))
    fields: list[tuple[str, object]] = []  # a byte field's length or a subtree's key
    plain = _plain_codec(codec)
    for k, v in sorted(e.fields.items()):
        if type(k) is not str:
            return None
        t = type(v)
        if t is bytes or t is memoryview or t is bytearray:
            fields.append((k, len(v)))
            raw.append((plain or k == "scales", v))  # _plain(codec, k)
        elif isinstance(v, Encoded):
            sub = _tree_key(v, raw)
            if sub is None:
                return None
            fields.append((k, sub))
        elif isinstance(v, bytes | bytearray | memoryview):
            fields.append((k, len(v)))
            raw.append((_plain(codec, k), v))
        else:
            return None
    return (codec, shape, tuple(meta), tuple(fields))


#: meta value types a skeleton key holds as they are (exact types: bool and int apart)
_META_TYPES = (int, bool, str, float)


@lru_cache(maxsize=256)
def _plain_codec(codec: str) -> bool:
    """Whether every field of ``codec`` holds plain floats (:func:`_plain`), remembered per spec."""
    return codec.split("(")[0] in _PLAIN


def _rebuild(
    template: dict[str, Any], values: list[Any], pos: list[int], stored: list[tuple[int, int]]
) -> Any:
    """The template node with its values replaced by ``values`` (read from ``pos[0]``); collects field codings."""
    nd = len(template["s"])
    doc: dict[str, Any] = {"c": template["c"], "s": values[pos[0] : pos[0] + nd]}
    pos[0] += nd
    if "m" in template:
        keys = sorted(template["m"])
        doc["m"] = dict(zip(keys, values[pos[0] : pos[0] + len(keys)], strict=True))
        pos[0] += len(keys)
    fields: dict[str, Any] = {}
    for k, v in sorted(template["f"].items()):
        if isinstance(v, dict):
            fields[k] = _rebuild(v, values, pos, stored)
        else:
            length, coding, extra = values[pos[0] : pos[0] + 3]
            pos[0] += 3
            fields[k] = length
            if type(length) is not int or type(coding) is not int or type(extra) is not int:
                raise _fail(f"field '{k}': length, coding and stored size must be integers")
            if coding and _plain(template["c"], k):
                raise _fail(f"field '{k}' of '{template['c']}' holds plain floats: it is never entropy-coded")
            stored.append((coding, length + extra))
    doc["f"] = fields
    return doc


def _put_value(out: bytearray, new: Any, old: Any, vocab: tuple[str, ...] = ()) -> None:
    """One changed value: ``varint (payload << 2 | kind)``; kind 0 int (zig-zag difference from an int
    template value, else the value itself), 1 string (its UTF-8 bytes follow), 2 float (payload 0, 8 bytes
    follow) or a string of the session's vocabulary (payload = its index + 1), 3 bool."""
    if isinstance(new, bool):
        _put_varint(out, (int(new) << 2) | 3)
    elif isinstance(new, int):
        base = old if isinstance(old, int) and not isinstance(old, bool) else 0
        _put_varint(out, (_zigzag(new - base) << 2) | 0)
    elif isinstance(new, str) and new in vocab:
        _put_varint(out, ((vocab.index(new) + 1) << 2) | 2)
    elif isinstance(new, str):
        raw = new.encode()
        _put_varint(out, (len(raw) << 2) | 1)
        out += raw
    elif isinstance(new, float):
        _put_varint(out, 2)
        out += struct.pack("<d", new)
    else:
        raise CodecError(f"compact frame: cannot write a {type(new).__name__} value")


def _get_value(cur: _Cursor, old: Any, vocab: tuple[str, ...] = ()) -> Any:
    v = cur.varint("a changed value")
    kind, payload = v & 3, v >> 2
    if kind == 0:
        base = old if isinstance(old, int) and not isinstance(old, bool) else 0
        return base + _unzigzag(payload)
    if kind == 1:
        if payload > 4000:
            raise _fail(f"a string value of {payload} bytes (at most 4000)")
        try:
            return bytes(cur.take(payload, "a string value")).decode("utf-8")
        except UnicodeDecodeError:
            raise _fail("a string value is not UTF-8") from None
    if kind == 2:
        if payload:
            if payload > len(vocab):
                raise _fail(f"string {payload - 1} of a {len(vocab)}-string vocabulary")
            return vocab[payload - 1]
        (f,) = struct.unpack("<d", cur.take(8, "a float value"))
        return f
    if payload > 1:
        raise _fail(f"a boolean value of {payload}")
    return bool(payload)


# -- the session ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class WireSession:
    """What a device and a server agree on once, so each update needs only a compact frame.

    Build one with :meth:`create` (the server, or both sides from the same model and config) or
    :meth:`from_json` (a device that fetched the server's :meth:`to_json`). ``entropy`` lets the encoder code
    each byte field losslessly (:mod:`deltaplane.codecs.fieldcoding`) when that makes it smaller. Equal
    sessions have equal :attr:`id`. Pass ``session=`` to :meth:`~deltaplane.codecs.Compressor.compress`
    (and :func:`~deltaplane.codecs.compress_many`) to frame, and to :func:`~deltaplane.codecs.decompress`
    (or call :meth:`decompress`) to decode.
    """

    layout: Layout
    codec: str
    base_id: str = ""
    entropy: bool = True
    #: per tensor (layout order), the self-describing node of the reference update
    template: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if len(self.template) != len(self.layout):
            raise CodecError(
                f"wire session: {len(self.template)} template nodes for {len(self.layout)} layout tensors"
            )

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        layout: Layout | Mapping[str, torch.Tensor],
        codec: str | Codec,
        *,
        base_id: str = "",
        entropy: bool = True,
    ) -> WireSession:
        """The session of ``layout`` (or a state dict's) and ``codec``: its template is the tensor table of
        a seeded normal delta of the layout encoded with ``codec`` (deterministic, so two parties that build
        it from the same model and codec get the same session and id)."""
        from deltaplane.codecs.compressor import encode_delta
        from deltaplane.delta import Delta

        layout = Layout.of(layout)
        spec = get_codec(codec).spec
        g = torch.Generator().manual_seed(_TEMPLATE_SEED)
        ref = {
            name: (torch.randn(t.shape, generator=g) * _TEMPLATE_SCALE).to(t.dtype)
            if t.dtype.is_floating_point
            else torch.zeros(t.shape, dtype=t.dtype)
            for name, t in layout.items()
        }
        trees = encode_delta(Delta(ref), get_codec(spec), torch.Generator().manual_seed(_TEMPLATE_SEED), {})
        template = tuple(_node_doc(trees[name][1]) for name in layout)
        return cls(layout, spec, base_id, entropy, template)

    def to_json(self) -> dict[str, Any]:
        """The canonical text form a server hands its devices (what :attr:`id` is the digest of)."""
        return {
            "v": COMPACT_VERSION,
            "base_id": self.base_id,
            "codec": self.codec,
            "entropy": self.entropy,
            "layout": self.layout.to_json(),
            "template": list(self.template),
        }

    @classmethod
    def from_json(cls, doc: Any, *, limits: Limits | None = None) -> WireSession:
        """Inverse of :meth:`to_json`, strict: anything malformed is a :class:`~deltaplane.errors.DecodeError`."""
        limits = limits or Limits()
        if not isinstance(doc, dict) or set(doc) != {
            "v",
            "base_id",
            "codec",
            "entropy",
            "layout",
            "template",
        }:
            raise DecodeError(
                "wire session must be an object with v, base_id, codec, entropy, layout, template"
            )
        if doc["v"] != COMPACT_VERSION:
            raise DecodeError(f"wire session version {doc['v']!r}; this deltaplane reads {COMPACT_VERSION}")
        if not isinstance(doc["base_id"], str) or not isinstance(doc["codec"], str):
            raise DecodeError("wire session: base_id and codec must be strings")
        if not isinstance(doc["entropy"], bool) or not isinstance(doc["template"], list):
            raise DecodeError("wire session: entropy must be a boolean and template a list")
        layout = Layout.from_json(doc["layout"])
        try:
            spec = get_codec(doc["codec"]).spec
        except SpecError as exc:
            raise DecodeError(f"wire session: {exc}") from None
        if len(doc["template"]) != len(layout):
            raise DecodeError(
                f"wire session: {len(doc['template'])} template nodes for {len(layout)} tensors"
            )
        # every node through the self-describing reader's node schema, with the layout's shape: decided for
        # all nodes at once, and node by node (the reader words the refusal) only if that is not sure
        shapes = node_shapes_in_bulk(doc["template"], limits)
        # the layout rows' own shape lists, when they are lists (of integers: the layout took them)
        rows = list(map(itemgetter(2), doc["layout"]))
        if shapes is None or set(map(type, rows)) - {list} or shapes != rows:
            reader = _Reader(limits)
            for (name, t), node in zip(layout.items(), doc["template"], strict=True):
                tree = reader.node(node, f"template of '{name}'", 0)
                if tree.shape != t.shape:
                    raise DecodeError(f"wire session: template of '{name}' has shape {list(tree.shape)}")
        try:
            return cls(layout, spec, doc["base_id"], doc["entropy"], tuple(doc["template"]))
        except CodecError as exc:
            raise DecodeError(str(exc)) from None

    def to_bytes(self) -> bytes:
        """Canonical UTF-8 JSON of :meth:`to_json`."""
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, limits: Limits | None = None) -> WireSession:
        """Inverse of :meth:`to_bytes` (at most :data:`MAX_SESSION_BYTES`)."""
        if len(data) > MAX_SESSION_BYTES:
            raise DecodeError(f"wire session of {len(data)} bytes exceeds {MAX_SESSION_BYTES}")
        limits = limits or Limits()
        text = bytes(data)
        # json.loads spends ~60-190 bytes of objects a container: bound them by the layout described, unparsed
        containers = json_containers(text)
        rows = _layout_rows(text)
        if containers > limits.session_containers(rows):
            raise DecodeError(
                f"wire session holds {containers} JSON objects and arrays for {rows} layout rows, more than the "
                f"{limits.session_containers(rows)} they allow (Limits.session_containers: "
                f"{limits.session_containers_per_tensor} a tensor beyond the floor); an honest session holds at "
                "most ~11 a tensor, in the compact text WireSession.to_bytes() writes"
            )
        try:
            doc = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DecodeError(f"wire session is not valid JSON ({type(exc).__name__})") from None
        return cls.from_json(doc, limits=limits)

    @cached_property
    def id(self) -> bytes:
        """First :data:`SESSION_ID_BYTES` bytes of the SHA-256 of :meth:`to_bytes`."""
        return hashlib.sha256(self.to_bytes()).digest()[:SESSION_ID_BYTES]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WireSession) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return (
            f"WireSession(id={self.id.hex()}, {len(self.layout)} tensors, codec={self.codec!r}, "
            f"base_id={self.base_id!r}, entropy={self.entropy})"
        )

    @cached_property
    def _signatures(self) -> tuple[tuple[Any, ...], ...]:
        out = []
        for node in self.template:
            sig: list[Any] = []
            _signature(node, sig)
            out.append(tuple(sig))
        return tuple(out)

    @cached_property
    def _agreed_rank(self) -> int:
        """The largest PowerSGD rank any template node uses (0 if none): what a frame's node may ask for."""
        return max((_rank(sig[0]) for node in self._signatures for sig in node), default=0)

    @cached_property
    def _template_values(self) -> tuple[tuple[Any, ...], ...]:
        out = []
        for node in self.template:
            vals: list[Any] = []
            _values(node, vals, None)
            out.append(tuple(vals))
        return tuple(out)

    @cached_property
    def _vocab(self) -> tuple[str, ...]:
        """Strings a changed value names by index: the template's string values and the index coders
        (sorted, so both sides derive the same list)."""
        strings = {v for vals in self._template_values for v in vals if isinstance(v, str)}
        return tuple(sorted(strings | set(INDEX_CODERS)))

    @cached_property
    def _zstd_level(self) -> int | None:
        return getattr(split_lossless(get_codec(self.codec))[1], "level", None)

    # -- encoding ----------------------------------------------------------------------------------------
    def pack(self, trees: Mapping[str, tuple[torch.dtype, Encoded]], base_version: int) -> bytes:
        """Frame finalized trees (name -> (dtype, tree), the layout's tensors) as one compact payload."""
        return self._pack_all([trees], base_version)[0]

    def pack_many(
        self, trees: Sequence[Mapping[str, tuple[torch.dtype, Encoded]]], base_version: int
    ) -> list[bytes]:
        """``[self.pack(t, base_version) for t in trees]``, byte for byte, and the same error if one fails.

        The in-process engines frame a round's devices together (:func:`~deltaplane.codecs.compress_many`):
        each device still gets its own frame (skeleton, fields, CRC), but the lossless coding of every
        device's byte fields is chosen in one pass (:func:`~deltaplane.codecs.fieldcoding.encode_fields`)
        instead of a few dozen numpy calls per field. A failure sends the devices through :meth:`pack` one
        by one, so the error raised is the first failing device's own.
        """
        try:
            return self._pack_all(trees, base_version)
        except DeltaplaneError:
            for t in trees:  # the first failing device raises what pack raises for it
                self._pack_all([t], base_version)
            raise

    def _pack_all(
        self, devices: Sequence[Mapping[str, tuple[torch.dtype, Encoded]]], base_version: int
    ) -> list[bytes]:
        """:meth:`pack_many`'s work: every device's skeleton parts, then all fields' codings, then the frames."""
        if type(base_version) is not int or base_version < 0:
            raise CodecError(
                f"compact frame: base version must be a non-negative integer, got {base_version!r}"
            )
        from deltaplane.codecs.fieldcoding import encode_fields

        memo = self._packed
        # per device, per tensor: (i, key, doc, tree, whole-node text, its byte fields, first slot in `coded`)
        plans: list[list[tuple[Any, ...]]] = []
        to_code: list[bytes | memoryview] = []
        for trees in devices:
            if trees.keys() != self.layout.keys() or list(trees) != list(self.layout):
                raise ShapeMismatch(
                    f"update tensors {list(trees)[:5]} differ from the session layout {list(self.layout)[:5]} "
                    "(names and order); agree on a new session for another model"
                )
            plan = []
            for i, (name, (dtype, tree)) in enumerate(trees.items()):
                want = self.layout[name]
                if dtype != want.dtype or tuple(tree.shape) != want.shape:
                    raise ShapeMismatch(
                        f"tensor '{name}' differs from the session layout ({want.shape}, {want.dtype})"
                    )
                # A node's skeleton part depends only on its _tree_key and its fields' codings: a round's
                # updates (every update of a dense codec) share a few, which are remembered, not worked out
                # again.
                raw: list[tuple[bool, Any]] = []  # a field's buffer, as _tree_key collects it
                key = _tree_key(tree, raw)
                doc: dict[str, Any] | None = None
                text: bytes | None
                if key is None:
                    raw = []
                    doc = _node_doc(tree, raw)
                    text = self._whole_node(i, doc)
                else:
                    text = memo.get((i, key))
                    if text is None:
                        doc = _node_doc(tree)
                        text = self._whole_node(i, doc)
                        self._remember((i, key), text)
                plan.append((i, key, doc, tree, text, raw, len(to_code)))
                if not text:  # a tree shaped unlike the template is sent whole, its fields raw
                    to_code.extend(data for plain, data in raw if self.entropy and not plain)
            plans.append(plan)
        coded = encode_fields(to_code)
        out = []
        for plan in plans:
            skeleton = bytearray()
            chunks: list[bytes | memoryview] = []
            for i, key, doc, tree, text, raw, slot in plan:
                if text:
                    skeleton += text
                    chunks.extend(data for _, data in raw)
                    continue
                codings: list[tuple[int, int]] = []
                for plain, data in raw:
                    if self.entropy and not plain:
                        coding, stored = coded[slot]
                        slot += 1
                    else:
                        coding, stored = 0, data
                    codings.append((coding, len(stored)))
                    chunks.append(stored)
                part = memo.get((i, key, tuple(codings))) if key is not None else None
                if part is None:
                    part = self._changed_values(i, doc if doc is not None else _node_doc(tree), codings)
                    if key is not None:
                        self._remember((i, key, tuple(codings)), part)
                skeleton += part
            out.append(self._frame(base_version, skeleton, chunks))
        return out

    def _frame(self, base_version: int, skeleton: bytearray, chunks: list[bytes | memoryview]) -> bytes:
        """Magic, version, session id, base version, skeleton, the data (one zstd frame of it if the codec
        ends in ``zstd``) and the CRC32C of it all."""
        head = bytearray(COMPACT_MAGIC)
        head.append(COMPACT_VERSION)
        head += self.id
        _put_varint(head, base_version)
        _put_varint(head, len(skeleton))
        head += skeleton
        if self._zstd_level is not None:
            from deltaplane.codecs.lossless import zstd_compress

            chunks = [zstd_compress(b"".join(chunks), self._zstd_level)]
        crc = crc32c.crc32c(head)
        for c in chunks:
            crc = crc32c.crc32c(c, crc)
        return b"".join([bytes(head), *chunks, _CRC.pack(crc)])

    def _whole_node(self, i: int, doc: dict[str, Any]) -> bytes:
        """Tensor ``i``'s skeleton part if its node is shaped unlike the template (``h = 0``, the node as JSON),
        else ``b""`` (it travels as changes: :meth:`_changed_values`)."""
        sig: list[Any] = []
        _signature(doc, sig)
        if tuple(sig) == self._signatures[i]:
            return b""
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        out = bytearray()
        _put_varint(out, 0)
        _put_varint(out, len(text))
        return bytes(out + text)

    def _changed_values(self, i: int, doc: dict[str, Any], codings: list[tuple[int, int]]) -> bytes:
        """Tensor ``i``'s skeleton part as changes from the template (``h = d + 1``), its byte fields coded as
        ``codings`` says."""
        vals: list[Any] = []
        _values(doc, vals, iter(codings))
        old = self._template_values[i]
        changes = [
            j for j, (a, b) in enumerate(zip(vals, old, strict=True)) if a != b or type(a) is not type(b)
        ]
        out = bytearray()
        _put_varint(out, len(changes) + 1)
        prev = -1
        for j in changes:
            _put_varint(out, j - prev - 1)
            _put_value(out, vals[j], old[j], self._vocab)
            prev = j
        return bytes(out)

    @cached_property
    def _packed(self) -> dict[tuple[Any, ...], bytes]:
        """Skeleton parts :meth:`pack` worked out recently, by tensor and :func:`_tree_key` (and codings)."""
        return {}

    def _remember(self, key: tuple[Any, ...], part: bytes) -> None:
        _bounded_put(self._packed, key, part, _PACK_MEMO_SIZE)

    # -- decoding ----------------------------------------------------------------------------------------
    def read_table(
        self,
        payload: bytes | bytearray | memoryview,
        *,
        expect_base_version: int | None = None,
        limits: Limits | None = None,
    ) -> tuple[Table, list[tuple[int, int]]]:
        """Validate a compact frame and rebuild its self-describing tensor table; the data is left unread.

        Returns the :class:`~deltaplane.codecs.wire.Table` (byte fields placed at their decoded offsets)
        and each byte field's ``(coding, stored length)`` in order, for :meth:`read_body`.
        """
        table, stored, _ = self.read_frame(payload, expect_base_version=expect_base_version, limits=limits)
        return table, stored

    def read_frame(
        self,
        payload: bytes | bytearray | memoryview,
        *,
        expect_base_version: int | None = None,
        limits: Limits | None = None,
    ) -> tuple[Table, list[tuple[int, int]], dict[str, Any]]:
        """:meth:`read_table`, and the facts known about the frame's skeleton: a dict that every payload of
        the same (remembered) skeleton shares, where checks that depend on the skeleton alone record that
        they passed (the decode budget, the fields' lengths, every node's check: see
        :func:`~deltaplane.codecs.compressor.decompress_many`); a fresh dict for a skeleton not remembered."""
        limits = limits or Limits()
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise _fail(f"expected bytes, got {type(payload).__name__}")
        if isinstance(payload, memoryview) and not payload.c_contiguous:
            payload = payload.tobytes()  # cast() below takes contiguous views only
        buf = memoryview(payload).cast("B") if isinstance(payload, memoryview) else memoryview(payload)
        if len(buf) < _MIN_FRAME:
            raise _fail(f"truncated: {len(buf)} bytes is shorter than the {_MIN_FRAME}-byte frame")
        if bytes(buf[:2]) != COMPACT_MAGIC:
            raise _fail(f"bad magic {bytes(buf[:2])!r} (expected {COMPACT_MAGIC!r}); not a compact payload")
        if buf[2] != COMPACT_VERSION:
            raise _fail(f"unsupported compact version {buf[2]}; this deltaplane reads {COMPACT_VERSION}")
        (crc,) = _CRC.unpack_from(buf, len(buf) - _CRC.size)
        if crc32c.crc32c(buf[: -_CRC.size]) != crc:
            raise _fail("checksum mismatch (corrupted or truncated in transit)")
        sid = bytes(buf[3 : 3 + SESSION_ID_BYTES])
        if sid != self.id:
            raise SessionMismatch(
                f"compact payload belongs to wire session {sid.hex()}, the receiver's is {self.id.hex()}; "
                "fetch the current session (model layout and codec) and compress again"
            )
        cur = _Cursor(buf, 3 + SESSION_ID_BYTES, len(buf) - _CRC.size)
        base_version = cur.varint("the base version")
        if expect_base_version is not None and base_version != expect_base_version:
            raise VersionMismatch(
                f"payload was made against base {self.base_id!r} v{base_version}, but the receiver holds "
                f"v{expect_base_version}; fetch the current model first"
            )
        skel_len = cur.varint("the skeleton length")
        skel_view = cur.take(skel_len, "the skeleton")
        skel_end = cur.pos
        # The skeleton alone decides the tensor table: a skeleton read before (a round's updates of a
        # dense or fixed-count codec usually share one) is not parsed and checked again.
        key = (bytes(skel_view), limits) if skel_len <= _SKELETON_CACHE_BYTES else None
        cached = self._skeletons.get(key) if key is not None else None
        remember = False
        if cached is None:
            t, st = self._read_skeleton(_Cursor(buf, skel_end - skel_len, skel_end), limits)
            cached = (t, st, sum(s for _, s in st), {})
            remember = key is not None
        trees, stored, size, facts = dict(cached[0]), list(cached[1]), cached[2], cached[3]
        body = buf[skel_end : len(buf) - _CRC.size]
        zstd = self._zstd_level is not None
        if zstd and size > limits.max_inflated_bytes:
            raise _fail(
                f"data would inflate to {size} bytes, beyond the {limits.max_inflated_bytes}-byte limit"
            )
        if not zstd and size != len(body):
            raise _fail(f"the skeleton claims {size} data bytes but the payload has {len(body)}")
        if remember:  # only a frame that passed the checks above: refused ones must not push out good entries
            room = min(_SKELETON_CACHE_SIZE, _SKELETON_CACHE_TENSORS // max(1, len(trees)))
            _bounded_put(self._skeletons, key, cached, max(1, room))
        header = WireHeader(self.base_id, base_version, self.codec, {})
        return Table(header, trees, body, zstd, size), stored, facts

    @cached_property
    def _skeletons(
        self,
    ) -> dict[
        tuple[bytes, Limits],
        tuple[dict[str, tuple[torch.dtype, Encoded]], list[tuple[int, int]], int, dict[str, Any]],
    ]:
        """Recently read skeletons: the tensor tables they decode to, their fields' codings and stored sizes,
        and the facts checked about them (see :meth:`read_frame`)."""
        return {}

    def _read_skeleton(
        self, skel: _Cursor, limits: Limits
    ) -> tuple[dict[str, tuple[torch.dtype, Encoded]], list[tuple[int, int]]]:
        """Parse and check a compact frame's skeleton: each tensor's node, rebuilt from the template and its
        changes, through the self-describing reader's checks; and each byte field's (coding, stored length)."""
        reader = _Reader(limits)
        trees: dict[str, tuple[torch.dtype, Encoded]] = {}
        stored: list[tuple[int, int]] = []
        for i, (name, want) in enumerate(self.layout.items()):
            where = f"tensor '{name}'"
            h = skel.varint(f"{where}: its header")
            if h == 0:
                text = skel.take(skel.varint(f"{where}: node length"), f"{where}: node")
                # a node carries no sender metadata: a small floor, the same density as a header
                check_containers(bytes(text), limits, f"{where}: node", floor=NODE_CONTAINER_FLOOR)
                try:
                    doc = json.loads(bytes(text).decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                    raise _fail(f"{where}: node is not valid JSON ({type(exc).__name__})") from None
                tree = reader.node(doc, where, 0)
                # a node sent whole may name any codec: not a larger decode (m·n·rank) than the session's
                _check_rank(tree, self._agreed_rank, where)
                # a node sent whole carries its fields raw: stored lengths are the declared ones
                stored.extend((0, n) for n in _field_lengths(tree))
            else:
                old = self._template_values[i]
                vals = list(old)
                j = -1
                for _ in range(h - 1):
                    j += skel.varint(f"{where}: a change's position") + 1
                    if j >= len(vals):
                        raise _fail(f"{where}: a change at value {j} of {len(vals)}")
                    vals[j] = _get_value(skel, old[j], self._vocab)
                node_stored: list[tuple[int, int]] = []
                doc = _rebuild(self.template[i], vals, [0], node_stored)
                tree = reader.node(doc, where, 0)  # the self-describing reader's checks on the rebuilt node
                for coding, size in node_stored:
                    if coding < 0 or size < 0:
                        raise _fail(f"{where}: field coding and stored length must be non-negative")
                stored.extend(node_stored)
            if tree.shape != want.shape:
                raise ShapeMismatch(
                    f"{where}: shape {list(tree.shape)}, the session layout has {list(want.shape)}"
                )
            trees[name] = (want.dtype, tree)
        if skel.pos != skel.end:
            raise _fail(f"{skel.end - skel.pos} trailing skeleton bytes")
        return trees, stored

    def read_body(
        self,
        table: Table,
        stored: list[tuple[int, int]],
        *,
        max_inflated_bytes: int | None = None,
        facts: dict[str, Any] | None = None,
    ) -> dict[str, tuple[torch.dtype, Encoded]]:
        """The trees of a :meth:`read_table` result, every byte field decoded to its declared length.

        ``facts``: :meth:`read_frame`'s facts of the frame's skeleton, where the fields' declared lengths
        and, for raw fields, their agreement with the stored lengths are remembered (they depend on the
        skeleton alone)."""
        from deltaplane.codecs.fieldcoding import decode_field
        from deltaplane.codecs.wire import _inflated, _materialize

        if table.zstd and max_inflated_bytes is not None and table.size > max_inflated_bytes:
            raise _fail(
                f"data would inflate to {table.size} bytes, beyond its budget of {max_inflated_bytes}"
            )
        known = facts.get("lengths") if facts is not None else None
        if known is None:
            lengths = [n for _, (_, tree) in table.trees.items() for n in _field_lengths(tree)]
            if len(lengths) != len(stored):  # a reader bug, never a payload's
                raise DecodeError("compact payload: field count differs between table and skeleton")
            known = (lengths, sum(lengths))
        lengths, declared = known
        if max_inflated_bytes is not None and declared > max_inflated_bytes:
            # coded fields expand to their declared lengths: bounded before any is decoded
            raise _fail(f"fields declare {declared} bytes, beyond the decode budget of {max_inflated_bytes}")
        if facts is not None:
            facts["lengths"] = known
        expanded = [table.zstd or c != 0 for c, _ in stored]
        if any(expanded) and (facts is None or not facts.get("fields_within_nodes")):
            # each field that is expanded (entropy-decoded, or inflated from a zstd frame) no longer than its
            # node allows, before any is: what a few stored bytes can cost is what an honest field can
            check_field_bytes(table.trees, lengths, expanded)
            if facts is not None:  # codings and lengths are the skeleton's: one verdict for all its payloads
                facts["fields_within_nodes"] = True
        data = _inflated(table)
        if all(c == 0 for c, _ in stored):
            if facts is None or not facts.get("raw_lengths_agree"):
                for n, (_, s) in zip(lengths, stored, strict=True):
                    if n != s:
                        raise _fail(f"a raw field stores {s} bytes but declares {n}")
                if facts is not None:
                    facts["raw_lengths_agree"] = True
            return {name: (dtype, _materialize(tree, data)) for name, (dtype, tree) in table.trees.items()}
        # each field its own buffer (a coded one decoded to its declared length): no joined copy of them all
        parts, at = [], 0
        for n, (coding, s) in zip(lengths, stored, strict=True):
            parts.append(memoryview(decode_field(coding, data[at : at + s], n)))
            at += s
        it = iter(parts)
        return {name: (dtype, _attach(tree, it)) for name, (dtype, tree) in table.trees.items()}

    # -- conveniences ------------------------------------------------------------------------------------
    def decompress(
        self,
        payload: bytes,
        *,
        expect_base_version: int | None = None,
        limits: Limits | None = None,
    ) -> Any:
        """Decode a compact payload of this session into a :class:`~deltaplane.delta.Delta` (strict)."""
        from deltaplane.codecs.compressor import decompress

        base = (self.base_id, expect_base_version) if expect_base_version is not None else None
        return decompress(payload, session=self, expect_base=base, limits=limits)


def _attach(e: Encoded, parts: Iterator[memoryview]) -> Encoded:
    """``e`` with each byte field (in order) replaced by the next of ``parts``."""
    fields = {
        k: _attach(v, parts) if isinstance(v, Encoded) else next(parts) for k, v in sorted(e.fields.items())
    }
    return Encoded(e.codec, e.shape, e.meta, fields)


def check_session_layout(session: WireSession, layout: Layout) -> None:
    """Refuse a session whose layout is not ``layout`` (the receiver's model): a session is per model."""
    if session.layout != layout:
        raise ShapeMismatch(
            f"wire session {session.id.hex()} is for another layout ({len(session.layout)} tensors) than the "
            f"model's ({len(layout)} tensors); agree on a new session"
        )
