"""Wire format v1: one framed, versioned, checksummed payload per compressed delta.

Layout (all integers little-endian)::

    magic b"DPLN" | u8 version (=1) | u8 flags | u32 header_len | header | payload | u32 CRC32C

``flags`` bit 0 means the header is zlib-compressed, bit 2 that it is raw DEFLATE with the v1 preset
dictionary :data:`HEADER_DICT` (the writer picks the smallest); bit 1 means the payload is one zstd frame
that inflates to the buffers (the ``zstd`` pipeline stage). The header is UTF-8 JSON;
the (inflated) payload is every byte field of every tensor, concatenated in header order. The CRC32C covers everything
before it. Decoding is strict and bounded: magic, version, flags, lengths, checksum, header schema, limits,
offsets (fields must tile the payload exactly), shapes and finite values are all checked before a tensor is
handed back, and any failure is a :class:`~deltaplane.errors.DecodeError`. ``docs/wire-format.md`` is the
specification.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any

import crc32c
import torch
from torch import Tensor

from deltaplane.codecs.base import Encoded
from deltaplane.codecs.quantize import DTYPE_NAMES, DTYPES, Identity
from deltaplane.delta import BASE_SHA256_KEY, is_base_fingerprint
from deltaplane.errors import CodecError, DecodeError, VersionMismatch

__all__ = [
    "MAGIC",
    "VERSION",
    "Limits",
    "Table",
    "WireHeader",
    "check_containers",
    "check_header",
    "finalize",
    "json_containers",
    "pack",
    "read_body",
    "read_table",
    "unpack",
]

MAGIC = b"DPLN"
VERSION = 1
FLAG_ZLIB_HEADER = 0x01
FLAG_ZSTD_PAYLOAD = 0x02
FLAG_DICT_HEADER = 0x04
_KNOWN_FLAGS = FLAG_ZLIB_HEADER | FLAG_ZSTD_PAYLOAD | FLAG_DICT_HEADER
#: Preset DEFLATE dictionary of wire format v1 (flag bit 2): the strings every header repeats. Fixed forever
#: for v1 (a reader needs the same bytes); on a small model it halves the compressed header, which can be
#: half of a sparse payload. Later strings are cheaper to reference, so the commonest come last.
HEADER_DICT = (
    b'"m":{"dtype":"float32"},"f":{"data":'
    b'{"c":"quant(bits=4, stochastic=true, chunk=512, scale=norm)","s":['
    b'{"c":"quant(bits=2, stochastic=true, chunk=512, scale=max)","s":['
    b'{"c":"quant(bits=4, stochastic=false, chunk=512, scale=max)","s":['
    b'{"c":"quant(bits=8, stochastic=false, chunk=512, scale=max)","s":['
    b'"f":{"codes":'
    b',"scales":'
    b'{"c":"powersgd(rank=4, iters=1, min_size=4096, fallback=fp16)","s":['
    b'"f":{"p":{"c":"'
    b',"q":{"c":"'
    b'{"c":"randk(ratio=0.01, unbiased=false)","s":['
    b'"m":{"seed":'
    b'{"c":"threshold(tau='
    b'{"c":"topk(ratio=0.01, approx=true)","s":['
    b'{"c":"ternary(chunk=0)","s":[ {"c":"sign","s":[ {"c":"fp16","s":[ {"c":"bf16","s":['
    b'"m":{"ix":"bitmap"},"f":{"idx":'
    b'"m":{"ix":"varint"},"f":{"idx":'
    b'{"c":"stc(ratio=0.01)","s":['
    b',"signs":'
    b'{"c":"topk(ratio=0.01)","s":['
    b'"m":{"ix":"golomb"},"f":{"idx":'
    b',"values":{"c":"identity","s":['
    b',"values":{"c":"'
    b'{"c":"identity","s":['
    b'"float32",'
    b'.weight",'
    b'.bias",'
    b'{"base":["",0],"codec":"'
    b'"t":[["'
    b']}}],["'
)
_PREFIX = struct.Struct("<4sBBI")  # magic, version, flags, header_len
_CRC = struct.Struct("<I")
FRAME_OVERHEAD = _PREFIX.size + _CRC.size  # 14 bytes around header and payload


@dataclass(frozen=True)
class Limits:
    """Bounds enforced while decoding untrusted payloads (defaults suit models up to a few billion values)."""

    max_header_bytes: int = 16 << 20
    max_tensors: int = 100_000
    max_numel: int = 1 << 34
    max_depth: int = 8
    #: most bytes a zstd-compressed payload may inflate to (a decompression bomb beyond it is refused unread)
    max_inflated_bytes: int = 1 << 32
    #: decode budget without an expected layout: all nodes together may decode to at most
    #: ``min(max_decoded_bytes, max(min_decoded_bytes, max_expansion × payload bytes))`` (float32 counted
    #: 4 bytes a value), so a 200-byte payload cannot declare a 64 GiB tensor
    max_decoded_bytes: int = 1 << 32
    min_decoded_bytes: int = 1 << 26
    max_expansion: int = 4096
    #: decode budget with an expected layout: ``layout_factor ×`` the layout's decoded size (its tensors
    #: must match the layout exactly; nested nodes such as top-k's values or PowerSGD's factors are smaller).
    #: A zstd body (a compact frame's fields) may inflate to the same budget: a legitimate body can be larger
    #: than the model (top-k at density ~1 sends positions besides every value; 8-bit codes with small chunks
    #: a 4-byte scale every few values)
    layout_factor: int = 3
    #: ...plus this many bytes per layout tensor: a codec's fixed fields (sign's and STC's 4-byte scale,
    #: rand-k's 8-byte seed) do not shrink with the tensor, so a model of empty tensors (budget 3 × 0) refused
    #: every such codec; the allowance keeps the budget linear in the model (at most 6.4 MB at 100,000 tensors)
    tensor_overhead_bytes: int = 64
    #: header budget with an expected layout: the (inflated) header JSON may hold at most ``min_header_bytes +
    #: header_bytes_per_tensor`` a tensor plus its name (as JSON escapes it), never beyond ``max_header_bytes``.
    #: A zlib header inflates up to ~1000×: without this a 16 KB payload (CRC valid) inflated to the 16 MiB
    #: limit of ``[{},{},...]``, which ``json.loads`` made into ~420 MB of Python objects. An honest header
    #: carries ~200 bytes a tensor (a pipeline's nested nodes, codec specs, field lengths) and a few of metadata
    min_header_bytes: int = 1 << 20
    header_bytes_per_tensor: int = 4096
    #: header values (objects, arrays and commas, counted while the header inflates, before it is parsed):
    #: at most ``min(max_header_values, min_header_values + header_values_per_byte × payload bytes)``, with or
    #: without an expected layout. ``json.loads`` spends ~75 bytes of Python objects a value, so this bounds
    #: parsing by the payload's size where the byte limit alone did not: a standalone 16 KB payload inflating
    #: to 16 MiB of ``[{},{},...]`` made ~420 MB of objects. An honest header holds 9–22 values a tensor (a
    #: 5,000-tensor header ~105,000) and at most ~7 values a payload byte (20,000 empty tensors under
    #: ``topk | quant``); a tensor with any values to send has at most ~2.4
    min_header_values: int = 1 << 17
    header_values_per_byte: int = 16
    max_header_values: int = 1 << 22
    #: header containers (objects and arrays: the ``[`` and ``{`` bytes of the inflated JSON, inside strings
    #: too), at most ``min_header_containers + header bytes // header_bytes_per_container``, checked before
    #: parsing. Within the value limit an uncompressed header of ``[{},{},...]`` still cost ~26 bytes of Python
    #: objects (tracemalloc peak, parse and table) a header byte, against 12-18 for honest headers of every
    #: codec: a container is ~60-70 bytes of objects for 2-3 bytes of JSON, where an honest header spends >= 15
    #: bytes a container (``["a","float32",{"c":"sign","s":[],"f":{"signs":0,"scales":4}}]``: 4 in 63 bytes).
    #: The floor leaves sender ``meta`` of a few thousand small lists alone
    min_header_containers: int = 1 << 14
    header_bytes_per_container: int = 12
    #: a wire session's text (up to 64 MiB) holds at most ``min_session_containers + session_containers_per_tensor
    #: × its layout's rows`` objects and arrays (its ``[`` and ``{`` bytes, inside strings too), counted before it
    #: is parsed, the rows matched in its canonical text. An honest session spends ~12-34 bytes a container
    #: (denser than the header rule allows) but at most 10.4 containers a tensor (``topk``: the layout row and its
    #: shape, the node, its value and index sub-nodes), so the allowance follows the layout it describes; the floor
    #: lets small hand-written (non-canonical) sessions load
    min_session_containers: int = 1 << 12
    session_containers_per_tensor: int = 16

    def header_budget(self, tensors: int | None = None, name_chars: int = 0) -> int:
        """Most bytes a payload's (inflated) header may hold: ``max_header_bytes``, or for a receiver expecting
        ``tensors`` tensors whose names hold ``name_chars`` characters in all, a budget linear in those
        (see the fields; a name's character is at most 12 bytes of JSON, an escaped surrogate pair)."""
        if tensors is None:
            return self.max_header_bytes
        allowance = self.min_header_bytes + self.header_bytes_per_tensor * tensors + 12 * name_chars
        return min(self.max_header_bytes, allowance)

    def header_values(self, payload_bytes: int) -> int:
        """Most JSON values (objects, arrays and commas) a ``payload_bytes``-byte payload's header may hold."""
        return min(
            self.max_header_values, self.min_header_values + self.header_values_per_byte * payload_bytes
        )

    def header_containers(self, header_bytes: int, floor: int | None = None) -> int:
        """Most JSON objects and arrays a ``header_bytes``-byte (inflated) header may hold; ``floor`` replaces
        :attr:`min_header_containers` (a compact frame's node, which carries no sender metadata, takes less)."""
        base = self.min_header_containers if floor is None else floor
        return base + header_bytes // self.header_bytes_per_container

    def session_containers(self, tensors: int) -> int:
        """Most JSON objects and arrays a wire session text whose layout has ``tensors`` rows may hold."""
        return self.min_session_containers + self.session_containers_per_tensor * tensors

    def decode_budget(self, payload_bytes: int, layout_bytes: int | None = None, tensors: int = 0) -> int:
        """Most bytes a payload of ``payload_bytes`` may decode to, all nodes together (see the fields);
        ``tensors``: how many tensors the expected layout (of ``layout_bytes``) holds."""
        if layout_bytes is not None:
            return self.layout_factor * layout_bytes + self.tensor_overhead_bytes * tensors
        return min(self.max_decoded_bytes, max(self.min_decoded_bytes, self.max_expansion * payload_bytes))


@dataclass(frozen=True)
class WireHeader:
    """What a payload says about itself besides its tensors."""

    base_id: str = ""
    base_version: int = 0
    codec: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def finalize(e: Encoded) -> Encoded:
    """Serialize any float tensor a pipeline left in the tree as raw fp32 (an ``identity`` node)."""
    fields: dict[str, Any] = {}
    for k, v in e.fields.items():
        if isinstance(v, Tensor):
            v = Identity().encode(v.float(), torch.Generator())
        # bytes-like fields (a memoryview over a tensor's buffer) stay views: pack copies them once
        fields[k] = (
            finalize(v) if isinstance(v, Encoded) else v if isinstance(v, bytes | memoryview) else bytes(v)
        )
    return Encoded(e.codec, e.shape, e.meta, fields)


# -- encoding --------------------------------------------------------------------------------------------
def check_header(header: WireHeader) -> None:
    """Refuse (:class:`~deltaplane.errors.CodecError`) a header the reader would refuse or JSON cannot hold.

    The writer must never frame what :func:`read_table` refuses (a float or boolean base version), nor fail
    with a bare ``ValueError``/``TypeError`` from ``json`` (NaN or a tensor in ``meta``), nor change a
    value on the way (a non-string ``meta`` key would come back as a string).
    """
    if not isinstance(header.base_id, str) or not isinstance(header.codec, str):
        raise CodecError(f"payload header: base id and codec must be strings, got {header.base_id!r}")
    if type(header.base_version) is not int or header.base_version < 0:
        raise CodecError(
            f"payload header: base version must be a non-negative integer, got {header.base_version!r}"
        )
    if not isinstance(header.meta, Mapping) or not all(isinstance(k, str) for k in header.meta):
        raise CodecError("payload header: meta must map strings to JSON values")
    try:
        json.dumps(dict(header.meta), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CodecError(f"payload header: meta is not JSON without NaN/Inf ({exc})") from None
    if BASE_SHA256_KEY in header.meta and not is_base_fingerprint(header.meta[BASE_SHA256_KEY]):
        raise CodecError(
            f"payload header: meta {BASE_SHA256_KEY!r} must be a base fingerprint (64 lowercase hex digits, "
            f"what base_fingerprint returns), got {header.meta[BASE_SHA256_KEY]!r:.80}"
        )


def pack(
    tensors: Mapping[str, tuple[torch.dtype, Encoded]], header: WireHeader, *, zstd_level: int | None = None
) -> bytes:
    """Frame encoded tensors (name -> (original dtype, finalized tree)) into one payload.

    ``zstd_level`` compresses the payload buffers as one zstd frame (flag bit 1).
    """
    chunks: list[bytes | memoryview] = []
    offset = 0

    def node(e: Encoded) -> dict[str, Any]:
        nonlocal offset
        out: dict[str, Any] = {"c": e.codec, "s": list(e.shape)}
        if e.meta:
            out["m"] = e.meta
        fields: dict[str, Any] = {}
        for k, v in e.fields.items():
            if isinstance(v, Encoded):
                fields[k] = node(v)
            elif isinstance(v, bytes | memoryview):
                fields[k] = len(v)  # buffers tile the body in order: the length alone places them
                chunks.append(v)
                offset += len(v)
            else:
                raise TypeError(f"field '{k}' is not finalized ({type(v).__name__}); call finalize() first")
        out["f"] = fields
        return out

    check_header(header)
    table = [[name, DTYPE_NAMES[dtype], node(e)] for name, (dtype, e) in tensors.items()]
    doc: dict[str, object] = {
        "base": [header.base_id, header.base_version],
        "codec": header.codec,
        "t": table,
    }
    if header.meta:
        doc["meta"] = header.meta
    raw = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    packed = zlib.compress(raw, 9)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=HEADER_DICT)
    with_dict = deflater.compress(raw) + deflater.flush()
    # the smallest of: raw JSON, zlib, raw DEFLATE with the v1 preset dictionary
    flags, head = min(
        (0, raw), (FLAG_ZLIB_HEADER, packed), (FLAG_DICT_HEADER, with_dict), key=lambda c: len(c[1])
    )
    if zstd_level is not None:
        from deltaplane.codecs.lossless import zstd_compress

        flags |= FLAG_ZSTD_PAYLOAD
        chunks = [zstd_compress(b"".join(chunks), zstd_level)]
    parts = [_PREFIX.pack(MAGIC, VERSION, flags, len(head)), head, *chunks]
    crc = 0
    for part in parts:  # CRC over the pieces, so the payload is copied once, by the final join
        crc = crc32c.crc32c(part, crc)
    return b"".join([*parts, _CRC.pack(crc)])


# -- decoding --------------------------------------------------------------------------------------------
def _fail(msg: str) -> DecodeError:
    return DecodeError(f"invalid deltaplane payload: {msg}")


def _read_header(
    payload: bytes, limits: Limits, max_header_bytes: int | None = None
) -> tuple[dict[str, Any], memoryview, int]:
    cap = limits.max_header_bytes if max_header_bytes is None else max_header_bytes
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise _fail(f"expected bytes, got {type(payload).__name__}")
    buf = memoryview(payload)
    if len(buf) < FRAME_OVERHEAD:
        raise _fail(f"truncated: {len(buf)} bytes is shorter than the {FRAME_OVERHEAD}-byte frame")
    magic, version, flags, header_len = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise _fail(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}); not a deltaplane payload")
    if version != VERSION:
        raise _fail(f"unsupported format version {version}; this deltaplane reads version {VERSION}")
    if flags & ~_KNOWN_FLAGS:
        raise _fail(f"unknown flag bits {flags:#04x}")
    if header_len > cap:
        raise _fail(f"header of {header_len} bytes exceeds the {cap}-byte header limit")
    if _PREFIX.size + header_len + _CRC.size > len(buf):
        raise _fail(f"truncated: header claims {header_len} bytes but the payload has {len(buf)} in all")
    (crc,) = _CRC.unpack_from(buf, len(buf) - _CRC.size)
    if crc32c.crc32c(buf[: -_CRC.size]) != crc:
        raise _fail("checksum mismatch (corrupted or truncated in transit)")
    raw = bytes(buf[_PREFIX.size : _PREFIX.size + header_len])
    if flags & FLAG_ZLIB_HEADER and flags & FLAG_DICT_HEADER:
        raise _fail("flag bits 0 and 2 (two header compressions) are exclusive")
    count = _ValueCount(limits.header_values(len(buf)), len(buf))
    if flags & (FLAG_ZLIB_HEADER | FLAG_DICT_HEADER):
        raw = _inflate_header(raw, flags, cap, count)
    else:
        count.add(raw)
    check_containers(raw, limits, "header")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise _fail("header must be a JSON object")
    return doc, buf[_PREFIX.size + header_len : len(buf) - _CRC.size], flags


def json_containers(text: bytes) -> int:
    """The objects and arrays JSON ``text`` may hold, counted unparsed: its ``[`` and ``{`` bytes (one inside a
    string only overcounts). ``bytes.count`` scans at memory speed, so a refusal costs no parse."""
    return text.count(b"[") + text.count(b"{")


def check_containers(text: bytes, limits: Limits, where: str, floor: int | None = None) -> None:
    """Refuse JSON ``text`` holding more objects and arrays than its size allows (:meth:`Limits.header_containers`),
    before it is parsed (:func:`json_containers`): they are what makes ``json.loads`` cost ~26× the bytes (an
    honest header 12-18×)."""
    containers = json_containers(text)
    cap = limits.header_containers(len(text), floor)
    if containers > cap:
        raise _fail(
            f"{where} holds {containers} JSON objects and arrays in {len(text)} bytes, more than the {cap} its "
            f"size allows (Limits.header_containers: one per {limits.header_bytes_per_container} bytes beyond "
            "the floor); an honest header spends at least 15 bytes on each"
        )


#: the compressed header inflates in steps of this many bytes, each counted before the next is inflated
_INFLATE_STEP = 1 << 16


class _ValueCount:
    """Counts a header's JSON values as its bytes arrive, refusing it past ``cap`` before it is parsed.

    Every value but the first follows a ``,``, ``[`` or ``{`` (an object's first value, after ``{`` and
    its key), so ``1 + `` those bytes bound the values ``json.loads`` would build, whatever the nesting; the
    same bytes inside strings only overcount. ``bytes.count`` scans at memory speed: bounding the parse costs
    no parse.
    """

    __slots__ = ("cap", "payload_bytes", "values")

    def __init__(self, cap: int, payload_bytes: int) -> None:
        self.cap, self.payload_bytes, self.values = cap, payload_bytes, 1

    def add(self, chunk: bytes) -> None:
        self.values += chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")
        if self.values > self.cap:
            raise _fail(
                f"header holds more than {self.cap} JSON values (objects, arrays and commas, counted before "
                f"parsing), the limit for a {self.payload_bytes}-byte payload (Limits.header_values); an "
                "honest header holds 9-22 a tensor"
            )


def _inflate_header(raw: bytes, flags: int, cap: int, count: _ValueCount) -> bytes:
    """The compressed header ``raw`` inflated in bounded steps, within ``cap`` bytes and ``count``'s values.

    A zlib stream inflates up to ~1000×: stepping lets a bomb be refused after the step that crosses either
    limit, holding at most that much of it, never the whole header nor its parse.
    """
    d = zlib.decompressobj() if flags & FLAG_ZLIB_HEADER else zlib.decompressobj(-15, zdict=HEADER_DICT)
    parts: list[bytes] = []
    size, tail = 0, raw
    try:
        while not d.eof:
            step = d.decompress(tail, _INFLATE_STEP)
            if not step and len(d.unconsumed_tail) == len(tail):  # no progress: the input ended early
                raise _fail("compressed header is truncated (its stream does not end)")
            # what a full step left unread; empty while zlib may still hold output for the next step
            tail = d.unconsumed_tail
            size += len(step)
            if size > cap:
                raise _fail(f"compressed header inflates beyond the {cap}-byte header limit")
            count.add(step)
            parts.append(step)
    except zlib.error as exc:
        raise _fail(f"compressed header is corrupt ({exc})") from None
    if d.unused_data or tail:  # the declared header length must end with its stream (docs/wire-format.md §1)
        extra = len(d.unused_data) + len(tail)
        raise _fail(f"compressed header has {extra} bytes after its stream ends (a header must end exactly)")
    return b"".join(parts)


def _shape(v: Any, where: str, limits: Limits) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 16 or not all(type(d) is int and d >= 0 for d in v):
        raise _fail(f"{where}: shape must be a list of at most 16 non-negative integers, got {str(v)[:80]}")
    # each dimension too: [0, 2**63] has a product of 0 but no tensor can take that shape
    if math.prod(v) > limits.max_numel or any(d > limits.max_numel for d in v):
        raise _fail(f"{where}: shape {v} exceeds the {limits.max_numel}-value limit")
    return tuple(v)


class _Slice:
    """A byte field's place in the (inflated) payload, before the payload is read."""

    __slots__ = ("length", "offset")

    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.length = offset, length


class _Reader:
    """Walks the tensor table; byte fields must tile the payload in order, starting at offset 0."""

    def __init__(self, limits: Limits) -> None:
        self.limits, self.cursor = limits, 0

    def node(self, v: Any, where: str, depth: int) -> Encoded:
        if depth > self.limits.max_depth:
            raise _fail(f"{where}: codec tree deeper than {self.limits.max_depth}")
        if not isinstance(v, dict) or set(v) - {"c", "s", "m", "f"} or not {"c", "s", "f"} <= set(v):
            raise _fail(f"{where}: malformed tensor node")
        codec, meta, fields_in = v["c"], v.get("m", {}), v["f"]
        if not isinstance(codec, str) or not codec or len(codec) > 4000:
            raise _fail(f"{where}: codec must be a non-empty string")
        if not isinstance(meta, dict) or not all(
            isinstance(x, int | float | str | bool) and not isinstance(x, dict) for x in meta.values()
        ):
            raise _fail(f"{where}: meta must map names to scalars")
        if not isinstance(fields_in, dict):
            raise _fail(f"{where}: fields must be an object")
        fields: dict[str, Any] = {}
        for k, f in fields_in.items():
            if isinstance(f, dict):
                fields[k] = self.node(f, f"{where}.{k}", depth + 1)
                continue
            if type(f) is not int or f < 0:
                raise _fail(
                    f"{where}.{k}: field must be a byte length (a non-negative integer) or a nested node"
                )
            fields[k] = _Slice(self.cursor, f)
            self.cursor += f
        return Encoded(codec, _shape(v["s"], where, self.limits), meta, fields)


_NODE_KEYS = frozenset({"c", "s", "f"})
_NODE_KEYS_META = frozenset({"c", "s", "m", "f"})
_META_VALUE_TYPES = frozenset({int, float, str, bool})
_INT, _DICT, _LIST, _STR = frozenset({int}), frozenset({dict}), frozenset({list}), frozenset({str})
_codec_of, _shape_of, _fields_of = itemgetter("c"), itemgetter("s"), itemgetter("f")


def node_shapes_in_bulk(nodes: list[Any], limits: Limits, depth: int = 0) -> list[list[int]] | None:
    """The shapes (``"s"`` lists) of ``nodes`` if every node certainly passes :meth:`_Reader.node` at
    ``depth``, else ``None``: not sure, run the reader (which raises what is wrong).

    The reader spends ~10 µs of Python on a node; a wire session's template holds one node per tensor
    (71,000 in 4 MiB of tiny tensors), so the session reader decides them all at once instead, each rule a
    C-level pass (``map``, ``set``, ``min``) over every node's values of one kind: node keys, codec strings,
    meta value types, field kinds and lengths, shapes, then the nested nodes one level down. Only exact JSON
    types pass (a ``bool`` is no dimension, a subclass of ``dict`` or ``int`` goes to the reader), so what
    this accepts the reader accepts; the reader alone words the refusals.
    """
    if not nodes:
        return []
    if depth > limits.max_depth or set(map(type, nodes)) != _DICT:
        return None
    if not set(map(frozenset, nodes)) <= {_NODE_KEYS, _NODE_KEYS_META}:
        return None
    codecs = list(map(_codec_of, nodes))
    if set(map(type, codecs)) != _STR:
        return None
    sizes = set(map(len, set(codecs)))
    if min(sizes) < 1 or max(sizes) > 4000:
        return None
    metas = [n["m"] for n in nodes if "m" in n]
    if metas and (
        set(map(type, metas)) != _DICT
        or not set(map(type, chain.from_iterable(map(dict.values, metas)))) <= _META_VALUE_TYPES
    ):
        return None
    fields = list(map(_fields_of, nodes))
    if set(map(type, fields)) != _DICT:
        return None
    values = list(chain.from_iterable(map(dict.values, fields)))
    kinds = set(map(type, values))
    if kinds == _INT:
        if min(values) < 0:
            return None
    elif kinds:
        if not kinds <= {int, dict}:
            return None
        if min((v for v in values if type(v) is int), default=0) < 0:
            return None
        if node_shapes_in_bulk([v for v in values if type(v) is dict], limits, depth + 1) is None:
            return None
    shapes = list(map(_shape_of, nodes))
    if set(map(type, shapes)) != _LIST or max(map(len, shapes)) > 16:
        return None
    dims = list(chain.from_iterable(shapes))
    if dims and (set(map(type, dims)) != _INT or min(dims) < 0 or max(dims) > limits.max_numel):
        return None
    if max(map(math.prod, shapes)) > limits.max_numel:
        return None
    return shapes


def _materialize(e: Encoded, data: memoryview) -> Encoded:
    # zero-copy views of the (inflated) payload: a codec copies a field only while it decodes it
    fields = {
        k: _materialize(v, data) if isinstance(v, Encoded) else data[v.offset : v.offset + v.length]
        for k, v in e.fields.items()
    }
    return Encoded(e.codec, e.shape, e.meta, fields)


@dataclass(frozen=True)
class Table:
    """A payload whose frame and tensor table are validated but whose body is not read yet.

    Its trees carry shapes, codecs and metadata, and each byte field only its place in the body, so a
    receiver can check the layout and the decode budget before inflating or touching a byte of the body
    (:func:`read_body`).
    """

    header: WireHeader
    trees: dict[str, tuple[torch.dtype, Encoded]]
    body: memoryview
    zstd: bool
    #: bytes the tensor table claims (the body's length, or what its zstd frame must inflate to)
    size: int


def read_table(payload: bytes, *, limits: Limits | None = None, max_header_bytes: int | None = None) -> Table:
    """Validate a payload's frame, header and tensor table; the body is left unread (see :class:`Table`).

    ``max_header_bytes`` bounds the (inflated) header below ``limits.max_header_bytes``: a receiver holding
    the model passes :meth:`Limits.header_budget` of its layout, so parsing the header costs memory in
    proportion to the model, not to what a 16 KB zlib stream inflates to.
    """
    limits = limits or Limits()
    doc, body, flags = _read_header(payload, limits, max_header_bytes)
    if set(doc) - {"base", "codec", "t", "meta"} or "t" not in doc:
        raise _fail("header has unknown or missing keys")
    base = doc.get("base", ["", 0])
    if not (isinstance(base, list) and len(base) == 2 and isinstance(base[0], str) and type(base[1]) is int):
        raise _fail("header 'base' must be [model id, version]")
    codec, meta, table = doc.get("codec", ""), doc.get("meta", {}), doc["t"]
    if not isinstance(codec, str) or not isinstance(meta, dict) or not isinstance(table, list):
        raise _fail("header fields have the wrong types")
    # the one meta key the reader interprets: a damaged fingerprint must not pass as "no record" (which would
    # skip the base check) nor reach a message unbounded
    if BASE_SHA256_KEY in meta and not is_base_fingerprint(meta[BASE_SHA256_KEY]):
        raise _fail(f"meta {BASE_SHA256_KEY!r} is not a base fingerprint (64 lowercase hex digits)")
    if len(table) > limits.max_tensors:
        raise _fail(f"{len(table)} tensors exceed the {limits.max_tensors}-tensor limit")
    reader = _Reader(limits)
    nodes: dict[str, tuple[torch.dtype, Encoded]] = {}
    for row in table:
        if not (
            isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], str)
        ):
            raise _fail("tensor table rows must be [name, dtype, node]")
        name, dtype_name, node = row
        if name in nodes:
            raise _fail(f"tensor '{name}' appears twice")
        if dtype_name not in DTYPES:
            raise _fail(f"tensor '{name}': unknown dtype {dtype_name!r}")
        nodes[name] = (DTYPES[dtype_name], reader.node(node, f"tensor '{name}'", 0))
    size = reader.cursor  # bytes the tensor table claims, in order
    zstd = bool(flags & FLAG_ZSTD_PAYLOAD)
    if zstd and size > limits.max_inflated_bytes:
        raise _fail(
            f"payload would inflate to {size} bytes, beyond the {limits.max_inflated_bytes}-byte limit"
        )
    if not zstd and size > len(body):
        raise _fail(f"tensor table claims {size} payload bytes but the payload has {len(body)}")
    if not zstd and size != len(body):
        raise _fail(f"{len(body) - size} trailing payload bytes not claimed by any tensor")
    return Table(WireHeader(base[0], base[1], codec, meta), nodes, body, zstd, size)


def read_body(
    table: Table, *, max_inflated_bytes: int | None = None
) -> dict[str, tuple[torch.dtype, Encoded]]:
    """Read a :class:`Table`'s body: its trees with every byte field a view of the (inflated) body.

    ``max_inflated_bytes`` bounds what a zstd body may inflate to (checked before inflating), on top of
    :attr:`Limits.max_inflated_bytes`.
    """
    if table.zstd and max_inflated_bytes is not None and table.size > max_inflated_bytes:
        raise _fail(
            f"payload would inflate to {table.size} bytes, beyond its decode budget of {max_inflated_bytes}"
        )
    data = _inflated(table)
    return {name: (dtype, _materialize(tree, data)) for name, (dtype, tree) in table.trees.items()}


def _inflated(table: Table) -> memoryview:
    """``table``'s body as its fields are read: inflated from its zstd frame (which the decompressor reads in
    place, a view of the payload), or the body itself. The caller has checked the decode budget."""
    if not table.zstd:
        return table.body
    from deltaplane.codecs.lossless import zstd_decompress

    return memoryview(zstd_decompress(table.body, table.size))


def unpack(
    payload: bytes, *, limits: Limits | None = None
) -> tuple[WireHeader, dict[str, tuple[torch.dtype, Encoded]]]:
    """Parse and validate a payload's frame and header; returns the header and name -> (dtype, tree).

    Byte fields are zero-copy views of the payload (or of its inflated body).
    """
    table = read_table(payload, limits=limits)
    return table.header, read_body(table)


def check_base(header: WireHeader, expect_base: tuple[str, int] | None) -> None:
    """Refuse a payload made against another base model than ``expect_base`` (id, version)."""
    if expect_base is not None and (header.base_id, header.base_version) != tuple(expect_base):
        raise VersionMismatch(
            f"payload was made against base {header.base_id!r} v{header.base_version}, "
            f"but the receiver holds {expect_base[0]!r} v{expect_base[1]}; fetch the current model first"
        )
