"""A structure-aware fuzzer for wire-format readers: mutate what a payload *means*, keep its checksum valid.

Byte-level fuzzing of a checksummed format almost never gets past the CRC. This fuzzer parses a valid payload
into its header (JSON) and its byte fields, mutates the structure — shapes, counts, field lengths, codec
specs and their parameters, metadata, dtypes, nesting, whole nodes spliced in from payloads of other codecs,
huge declared sizes — and serializes the result as a well-formed frame (fields tiled, CRC recomputed, header
raw, zlib or dictionary-DEFLATE, body optionally zstd), so every mutation reaches the decoder's semantic
checks. :func:`check_decode` then holds the reader to its contract: each outcome is a well-formed delta (of
the expected layout, finite) or a :class:`~deltaplane.errors.DeltaplaneError`, within a time and memory
budget; mutations that keep the meaning (an index stream re-coded with another coder, another header
compression) must decode to exactly the original delta.

Used by ``tests/codecs/test_fuzz_structure.py`` (a few thousand mutations in CI) and
``benchmarks/fuzz_decode.py`` (tens of thousands, with peak memory measured per decode).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import random
import re
import resource
import signal
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np
import torch
from torch import Tensor

from deltaplane.codecs.base import available_codecs, get_codec
from deltaplane.codecs.compressor import Compressor, decompress
from deltaplane.codecs.entropy import bitmap_encode, decode_indices, golomb_encode, varint_encode
from deltaplane.codecs.layout import Layout
from deltaplane.codecs.lossless import zstd_decompress
from deltaplane.codecs.quantize import DTYPES
from deltaplane.codecs.session import WireSession
from deltaplane.codecs.wire import HEADER_DICT, MAGIC, VERSION, Limits, _read_header, read_table
from deltaplane.delta import Delta
from deltaplane.errors import CodecError, DeltaplaneError

__all__ = [
    "FEWER",
    "SPECS",
    "STACKABLE_KINDS",
    "FuzzReport",
    "Mutator",
    "StackReport",
    "address_space_cap",
    "check_decode",
    "fuzz",
    "fuzz_model",
    "fuzz_stacked",
    "peak_memory",
    "serialize_compact",
]

#: every registered codec, alone and in pipelines, policies and the zstd stage; all three index coders
#: appear (bitmap at high density, Golomb-Rice at low, varint through re-coding mutations)
SPECS = [
    "identity",
    "fp16",
    "bf16",
    "quant(bits=8)",
    "quant(bits=3, stochastic=true, chunk=64)",
    "quant(bits=1, stochastic=true, chunk=32, scale=norm)",
    "sign",
    "ternary",
    "ternary(chunk=16)",
    "topk(0.05)",
    "topk(0.5)",
    "topk(0.05) | quant(bits=4)",
    "topk(0.1, approx=true) | fp16",
    "randk(0.1) | quant(bits=8)",
    "randk(0.2, unbiased=true)",
    "threshold(tau=0.02)",
    "stc(0.02)",
    "stc(0.4)",
    "powersgd(rank=2)",
    "powersgd(rank=4) | quant(bits=8, chunk=8)",
    "powersgd(rank=1, min_size=0, fallback=sign) | bf16",
    "topk(0.05) | quant(bits=8) | zstd(level=3)",
    "quant(bits=4) | zstd",
    "policy(rules='*.bias: fp16; fc1.*: stc(0.05); emb.*: topk(0.02) | quant(bits=4); "
    "*: powersgd(rank=2, fallback=ternary)')",
]

_INTERESTING_INTS = [
    0,
    1,
    2,
    3,
    7,
    8,
    255,
    256,
    4096,
    2**31 - 1,
    2**31,
    2**32,
    2**34,
    2**40,
    2**53 + 1,
    2**63 - 1,
]
_INTERESTING_VALUES = [
    "0",
    "-1",
    "1",
    "2",
    "9",
    "2147483648",
    "9223372036854775807",
    "9223372036854775808",
    "1" + "0" * 400,
    "-" + "9" * 40,
    "1e308",
    "1e309",
    "1e-320",
    "-0.0",
    "0.5",
    "1.0",
    "1.0000001",
    "nan",
    "inf",
    "true",
    "false",
    "x",
    "'fp16'",
    "'policy(rules=\"*: fp16\")'",
    "''",
]


def fuzz_model(seed: int = 0) -> dict[str, Tensor]:
    """The delta the fuzzer mutates payloads of (~200k values, ~0.8 MB): matrices PowerSGD factors, a bf16
    and a float16 tensor, biases, and integer tensors (which always travel raw)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    return {
        "conv.weight": r(16, 1, 3, 3),
        "fc1.weight": r(256, 512),
        "fc1.bias": r(256),
        "emb.weight": r(1000, 64),
        "head.weight": r(10, 256).to(torch.bfloat16),
        "norm.weight": r(256).to(torch.float16),
        "steps": torch.tensor(3, dtype=torch.int64),
        "counts": torch.tensor([1, -2, 3], dtype=torch.int32),
    }


# -- a payload taken apart ---------------------------------------------------------------------------------
class Buf:
    """A byte field carried with its bytes, so a mutated tree still tiles the body exactly."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def __deepcopy__(self, memo: dict[int, Any]) -> Buf:
        return self  # immutable: mutations replace a Buf, never edit one


@dataclass
class Parsed:
    """A payload as header document (byte lengths replaced by :class:`Buf`) plus its framing choices."""

    doc: dict[str, Any]
    zstd: bool


def parse(payload: bytes) -> Parsed:
    """Take a valid payload apart (the inverse of :func:`serialize` with the same framing).

    The pool a :class:`Mutator` starts from may be any payloads (a corpus from elsewhere), so they are read
    by the wire reader itself: frame, checksum, bounded header inflation and tensor table are checked, and a
    zstd body is inflated with :func:`~deltaplane.codecs.lossless.zstd_decompress`, which refuses a frame
    declaring another size than the table's before allocating it. Anything malformed is a
    :class:`~deltaplane.errors.DecodeError`.
    """
    table = read_table(payload)  # every check of the frame and table, the body left unread
    doc, _, _ = _read_header(payload, Limits())  # the header document the table was read from
    body = zstd_decompress(bytes(table.body), table.size) if table.zstd else bytes(table.body)
    offset = 0

    def walk(node: dict[str, Any]) -> None:
        nonlocal offset
        for k, v in node["f"].items():
            if isinstance(v, dict):
                walk(v)
            else:
                node["f"][k] = Buf(body[offset : offset + v])
                offset += v

    for row in doc["t"]:
        walk(row[2])
    return Parsed(doc, table.zstd)


def serialize(doc: Any, *, header: str = "raw", zstd: bool = False, trailing: bytes = b"") -> bytes:
    """Frame a (possibly mutated) document: fields tiled in reader order, CRC-32C recomputed.

    ``header`` is ``raw``, ``zlib`` or ``dict`` (the v1 preset dictionary); ``zstd`` compresses the body as
    one frame; ``trailing`` appends bytes no field claims.
    """
    chunks: list[bytes] = []

    def walk(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = dict(node)
        f = node.get("f")
        if isinstance(f, dict):
            fields = {}
            for k, v in f.items():
                if isinstance(v, Buf):
                    fields[k] = len(v.data)
                    chunks.append(v.data)
                else:
                    fields[k] = walk(v)
            out["f"] = fields
        return out

    doc = copy.copy(doc)
    if isinstance(doc, dict) and isinstance(doc.get("t"), list):
        doc["t"] = [
            [*row[:2], walk(row[2])] if isinstance(row, list) and len(row) == 3 else row for row in doc["t"]
        ]
    raw = json.dumps(doc, separators=(",", ":")).encode()
    flags = 0
    if header == "zlib":
        raw, flags = zlib.compress(raw), 1
    elif header == "dict":
        c = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=HEADER_DICT)
        raw, flags = c.compress(raw) + c.flush(), 4
    body = b"".join(chunks) + trailing
    if zstd:
        from deltaplane.codecs.lossless import zstd_compress

        body, flags = zstd_compress(body, 1), flags | 2
    framed = MAGIC + bytes([VERSION, flags]) + struct.pack("<I", len(raw)) + raw + body
    return framed + struct.pack("<I", crc32c.crc32c(framed))


def serialize_compact(
    doc: Any,
    session: WireSession,
    *,
    base_version: int = 1,
    rnd: random.Random | None = None,
    lie: str | None = None,
) -> tuple[bytes, bool]:
    """Frame a (possibly mutated) document as a compact payload of ``session``, as an adversary would.

    Table rows map onto the session's tensors by position (names and dtypes do not travel); a node shaped
    like the template travels as changes, any other (or anything not a node) whole, as JSON. Byte fields are
    entropy-coded where the session codes and that wins. ``lie`` (with ``rnd``) makes one field's coding
    (``coding``: another coding id over the same bytes), stored length (``stored``: bytes added or cut,
    the declared length unchanged) or stored bytes (``stream``: a bit flipped) lie; returns the payload and
    whether a lie was told (a document without a byte field has nowhere to tell one).
    """
    from deltaplane.codecs.fieldcoding import CODINGS, encode_field
    from deltaplane.codecs.session import (
        COMPACT_MAGIC,
        COMPACT_VERSION,
        _plain,
        _put_varint,
        _signature,
    )

    rows = doc.get("t") if isinstance(doc, dict) else None
    rows = rows if isinstance(rows, list) else []
    fields: list[list[Any]] = []  # [coding, stored bytes, raw bytes] per byte field, in order

    def put_field(b: Buf, codec: Any, name: str) -> int:
        # a sender codes what it likes; the fuzzer codes the fields of honest sizes (a bomb goes raw)
        small = len(b.data) <= 1 << 20
        honest = session.entropy and small and not (isinstance(codec, str) and _plain(codec, name))
        coding, stored = encode_field(b.data) if honest else (0, b.data)
        if rnd is not None and small and rnd.random() < 0.05:  # code even a plain float field (refused)
            coding, stored = encode_field(b.data)
            forced[0] |= coding != 0
        fields.append([coding, bytes(stored), b.data])
        return len(b.data)

    odd = [False]  # a field that is neither bytes nor a node: only a whole node can carry it
    forced = [False]  # a field coded whatever it holds (a plain float field so coded is refused)

    def plain(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = dict(node)
        f = node.get("f")
        if isinstance(f, dict):
            odd[0] |= any(not isinstance(v, Buf | dict) for v in f.values())
            c = node.get("c")
            # byte fields in the order a frame carries them: sorted by name (the session's canonical order)
            out["f"] = {
                k: put_field(v, c, k) if isinstance(v, Buf) else plain(v) for k, v in sorted(f.items())
            }
        return out

    nodes: list[tuple[Any, int, int, bool]] = []
    for i, row in enumerate(rows):
        start = len(fields)
        odd[0] = False
        node = plain(row[2] if isinstance(row, list) and len(row) == 3 else row)
        try:
            sig: list[Any] = []
            _signature(node, sig)
            same = i < len(session.template) and tuple(sig) == session._signatures[i] and not odd[0]
        except (TypeError, KeyError, AttributeError):
            same = False
        if not same:  # a node sent whole carries its fields raw
            for f in fields[start:]:
                f[0], f[1] = 0, f[2]
        nodes.append((node, start, len(fields), same))
    told = forced[0]
    if lie is not None and rnd is not None and fields:
        f = fields[rnd.randrange(len(fields))]
        told = True
        if lie == "coding":
            f[0] = rnd.choice([c for c in [*CODINGS, len(CODINGS), 255] if c != f[0]])
        elif lie == "stored" and (rnd.random() < 0.5 or not f[1]):
            f[1] = f[1] + bytes(rnd.randint(1, 4))
        elif lie == "stored":
            f[1] = f[1][: -rnd.randint(1, len(f[1]))]
        else:
            b = bytearray(f[1] or b"\0")
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
            f[1] = bytes(b)
    skeleton = bytearray()
    for i, (node, start, end, same) in enumerate(nodes):
        if same:
            try:  # the encoder's own changes from the template, with the (possibly lying) field codings
                part = session._changed_values(i, node, [(f[0], len(f[1])) for f in fields[start:end]])
            except CodecError:  # a value no change can carry (an object, a list, null): the node goes whole
                same = False
                for f in fields[start:end]:
                    f[0], f[1] = 0, f[2]
            else:
                skeleton += part
        if not same:
            text = json.dumps(node, separators=(",", ":")).encode()
            _put_varint(skeleton, 0)
            _put_varint(skeleton, len(text))
            skeleton += text
    head = bytearray(COMPACT_MAGIC) + bytes([COMPACT_VERSION]) + session.id
    _put_varint(head, base_version)
    _put_varint(head, len(skeleton))
    body = b"".join(f[1] for f in fields)
    if session._zstd_level is not None:
        from deltaplane.codecs.lossless import zstd_compress

        body = zstd_compress(body, 1)
    framed = bytes(head) + bytes(skeleton) + body
    return framed + struct.pack("<I", crc32c.crc32c(framed)), told


def _mutate_frame(payload: bytes, how: str, rnd: random.Random) -> bytes:
    """A compact frame lied about at the frame level (session id, base version, bytes cut, added or
    flipped), then given a valid CRC again."""
    from deltaplane.codecs.session import COMPACT_MAGIC, SESSION_ID_BYTES

    b = bytearray(payload[:-4])
    at = len(COMPACT_MAGIC) + 1
    if how == "session":
        b[at + rnd.randrange(SESSION_ID_BYTES)] ^= 1 << rnd.randrange(8)
    elif how == "base":
        b[at + SESSION_ID_BYTES] = (b[at + SESSION_ID_BYTES] + rnd.randint(1, 120)) & 0x7F
    elif how == "cut":
        del b[rnd.randrange(at, len(b)) :]
    elif how == "extra":
        b += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
    else:
        b[rnd.randrange(at + SESSION_ID_BYTES, len(b))] ^= 1 << rnd.randrange(8)
    return bytes(b) + struct.pack("<I", crc32c.crc32c(bytes(b)))


# -- mutations ---------------------------------------------------------------------------------------------
def _nodes(doc: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any] | None, str | None]]:
    """Every node of the table as (node, parent's field dict or None, field name or None)."""
    out: list[tuple[dict[str, Any], dict[str, Any] | None, str | None]] = []

    def walk(node: Any, parent: dict[str, Any] | None, key: str | None) -> None:
        if not isinstance(node, dict):
            return
        out.append((node, parent, key))
        f = node.get("f")
        if isinstance(f, dict):
            for k, v in list(f.items()):
                walk(v, f, k)

    rows = doc.get("t")
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, list) and len(row) == 3:
            walk(row[2], None, None)
    return out


def _bufs(doc: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    return [
        (n["f"], k)
        for n, _, _ in _nodes(doc)
        if isinstance(n.get("f"), dict)
        for k, v in n["f"].items()
        if isinstance(v, Buf)
    ]


_PARAMS = re.compile(r"(\w+)=([^,()]+|'[^']*')")


class Mutator:
    """Random structure-aware mutations of a pool of valid payloads (see the module docstring)."""

    def __init__(self, payloads: list[bytes], rnd: random.Random) -> None:
        self.pool = [parse(p) for p in payloads]
        self.rnd = rnd
        self.kinds: dict[str, Callable[[dict[str, Any]], bool]] = {
            "shape": self._shape,
            "length": self._length,
            "field_bytes": self._field_bytes,
            "spec": self._spec,
            "param": self._param,
            "meta": self._meta,
            "dtype": self._dtype,
            "nesting": self._nesting,
            "splice": self._splice,
            "huge": self._huge,
            "bomb": self._bomb,
            "table": self._table,
            "header": self._header,
        }

    # each mutation edits ``doc`` in place; True if it keeps the payload's meaning (exact decode expected)
    def mutate(self, source: int | None = None) -> tuple[bytes, str, bool, int]:
        """A mutated payload, the mutation kind, whether it keeps the meaning, and the source payload index."""
        doc, kind, preserving, src = self.mutate_doc(source)
        rnd, parsed = self.rnd, self.pool[src]
        header = rnd.choice(["raw", "zlib", "dict"])
        zstd = parsed.zstd if rnd.random() < 0.9 else not parsed.zstd
        trailing = b""
        if rnd.random() < 0.02:
            trailing, preserving = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8))), False
        return serialize(doc, header=header, zstd=zstd, trailing=trailing), kind, preserving, src

    def mutate_compact(
        self, sessions: list[WireSession], source: int | None = None, kind: str | None = None
    ) -> tuple[bytes, str, bool, int]:
        """:meth:`mutate`, framed as a compact payload of the source's session (``sessions[src]``), with
        compact-only mutations on top: field codings and stored lengths that lie, entropy-coded streams
        corrupted, and frames of another session or base version or with bytes cut or added (every one
        with a valid CRC). ``kind``: the first mutation's kind (see :meth:`mutate_doc`)."""
        doc, kind, preserving, src = self.mutate_doc(source, kind)
        rnd = self.rnd
        if "table" in kind:  # names do not travel: rows map onto the session's tensors by position
            preserving = False
        lie = rnd.choice(["coding", "stored", "stream"]) if rnd.random() < 0.15 else None
        payload, lied = serialize_compact(doc, sessions[src], rnd=rnd, lie=lie)
        if lied:
            kind, preserving = f"{kind}+{lie}", False
        if rnd.random() < 0.08:
            frame = rnd.choice(["session", "base", "cut", "extra", "flip"])
            payload = _mutate_frame(payload, frame, rnd)
            kind, preserving = f"{kind}+frame_{frame}", False
        return payload, kind, preserving, src

    def mutate_doc(
        self, source: int | None = None, kind: str | None = None
    ) -> tuple[dict[str, Any], str, bool, int]:
        """A mutated copy of a pool payload's document, the mutation kind, whether it keeps the meaning and
        the source payload index (what :meth:`mutate` and :meth:`mutate_compact` frame). ``kind``: the
        first mutation's kind (one of :attr:`kinds` or ``"recode_index"``; default: drawn at random)."""
        rnd = self.rnd
        if kind is not None and kind != "recode_index" and kind not in self.kinds:
            raise ValueError(f"unknown mutation kind {kind!r}: one of {sorted(self.kinds)} or 'recode_index'")
        src = rnd.randrange(len(self.pool)) if source is None else source
        parsed = self.pool[src]
        doc = copy.deepcopy(parsed.doc)
        if kind == "recode_index" or (kind is None and rnd.random() < 0.15):
            kind, preserving = "recode_index", self._recode_index(doc)
            if not preserving:
                kind = "field_bytes"
                self._field_bytes(doc)
        else:
            kind = kind or rnd.choice(list(self.kinds))
            preserving = self._apply(kind, doc)
            if rnd.random() < 0.2:  # a second mutation on top
                second = rnd.choice(list(self.kinds))
                preserving = self._apply(second, doc) and preserving
                kind = f"{kind}+{second}"
        return doc, kind, preserving, src

    def _apply(self, kind: str, doc: dict[str, Any]) -> bool:
        try:
            return self.kinds[kind](doc)
        except (TypeError, KeyError, IndexError, AttributeError, ValueError):
            return False  # an earlier mutation left no place for this one: the document stays as it is

    def _node(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        nodes = _nodes(doc)
        return self.rnd.choice(nodes)[0] if nodes else None

    def _int(self) -> int:
        rnd = self.rnd
        return (
            rnd.choice(_INTERESTING_INTS)
            if rnd.random() < 0.5
            else rnd.randrange(0, 1 << rnd.randrange(1, 40))
        )

    def _shape(self, doc: dict[str, Any]) -> bool:
        node, rnd = self._node(doc), self.rnd
        if node is None or not isinstance(node.get("s"), list):
            return False
        s: Any = list(node["s"])  # some mutations make it no list at all
        choice = rnd.randrange(9)
        if choice == 0 and s:
            i = rnd.randrange(len(s))
            s[i] = max(0, s[i] + rnd.choice([-1, 1, -2, 2, s[i], -s[i]]))
        elif choice == 1 and len(s) > 1:
            i, j = rnd.sample(range(len(s)), 2)
            s[i], s[j] = s[j], s[i]
        elif choice == 2:
            s.insert(rnd.randrange(len(s) + 1), rnd.choice([1, 2, 0]))
        elif choice == 3 and s:
            s.pop(rnd.randrange(len(s)))
        elif choice == 4:
            s = [rnd.choice([0, 1]), rnd.choice([2**63, 2**64, 2**35, 10**20])]
        elif choice == 5:
            s = [self._int() for _ in range(rnd.randint(0, 3))]
        elif choice == 6:
            s = rnd.choice([[-1], [1.5], ["3"], [[2]], [True], "x", None, [1] * 17, {}])
        elif choice == 7 and s:
            s = [int(torch.tensor(s).prod())]  # flattened: same numel, other shape
        else:
            s = [d * 2 for d in s] or [2]
        node["s"] = s
        return False

    def _length(self, doc: dict[str, Any]) -> bool:
        bufs, rnd = _bufs(doc), self.rnd
        if not bufs:
            return False
        f, k = rnd.choice(bufs)
        data = f[k].data
        choice = rnd.randrange(5)
        if choice == 0:  # shorter, the body still tiled
            f[k] = Buf(data[: rnd.randrange(len(data) + 1)])
        elif choice == 1:
            f[k] = Buf(data + bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16))))
        elif choice == 2:
            f[k] = Buf(b"")
        elif choice == 3:  # a lying length: no bytes behind it
            f[k] = rnd.choice([len(data) + 1, len(data) - 1, 2**40, -1, 1.5, "8", None, True])
        else:  # move bytes between two consecutive fields: the total is unchanged
            others = [(g, j) for g, j in bufs if (g, j) != (f, k)]
            if others:
                g, j = rnd.choice(others)
                cut = rnd.randint(1, 8)
                f[k], g[j] = Buf(data[:-cut] if cut <= len(data) else b""), Buf(data[-cut:] + g[j].data)
        return False

    def _field_bytes(self, doc: dict[str, Any]) -> bool:
        bufs, rnd = _bufs(doc), self.rnd
        if not bufs:
            return False
        f, k = rnd.choice(bufs)
        b = bytearray(f[k].data)
        if not b:
            return False
        choice = rnd.randrange(5)
        if choice == 0:
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        elif choice == 1:
            b[-1] = rnd.choice([0xFF, 0x80, 0x7F, 0x00])
        elif choice == 2:
            b[:] = bytes(len(b)) if rnd.random() < 0.5 else b"\xff" * len(b)
        elif choice == 3 and len(b) >= 4:  # a float32 NaN / Inf / huge value somewhere aligned
            i = 4 * rnd.randrange(len(b) // 4)
            b[i : i + 4] = rnd.choice(
                [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f", b"\x00\x00\x80\xff"]
            )
        else:
            b[0] = rnd.randrange(256)
        f[k] = Buf(bytes(b))
        return False

    def _spec(self, doc: dict[str, Any]) -> bool:
        node, rnd = self._node(doc), self.rnd
        if node is None:
            return False
        names = sorted(available_codecs())
        choice = rnd.randrange(4)
        if choice == 0:
            node["c"] = rnd.choice([s.split("|")[0].strip() for s in SPECS] + [f"{n}" for n in names])
        elif choice == 1:
            node["c"] = rnd.choice(
                [
                    "topk(0.5) | quant(bits=8)",
                    "policy(rules='*: fp16')",
                    "zstd(level=3)",
                    "pipeline",
                    "nosuchcodec",
                    "quant(bits=8",
                    "quant(bits=8, bits=4)",
                    "quant(nosuch=1)",
                    "topk(0.1, 0.2)",
                    "",
                    "é" * 3,
                    "identity" * 600,
                    "quant(bits=8) extra",
                ]
            )
        elif choice == 2:
            node["c"] = rnd.choice([None, 7, ["fp16"], {"c": "fp16"}])
        else:
            return self._param(doc)
        return False

    def _param(self, doc: dict[str, Any]) -> bool:
        node, rnd = self._node(doc), self.rnd
        if node is None or not isinstance(node.get("c"), str):
            return False
        spec = node["c"]
        params = _PARAMS.findall(spec)
        value = rnd.choice(_INTERESTING_VALUES)
        if params and rnd.random() < 0.85:
            key, old = rnd.choice(params)
            node["c"] = spec.replace(f"{key}={old}", f"{key}={value}", 1)
        else:
            name = spec.split("(")[0]
            node["c"] = f"{name}({value})" if rnd.random() < 0.5 else f"{name}(nosuch={value})"
        return False

    def _meta(self, doc: dict[str, Any]) -> bool:
        node, rnd = self._node(doc), self.rnd
        if node is None:
            return False
        m = node.get("m")
        meta: dict[str, Any] = m if isinstance(m, dict) else {}
        choice = rnd.randrange(6)
        if choice == 0:
            meta["ix"] = rnd.choice(["bitmap", "varint", "golomb", "gzip", 3, None, ""])
        elif choice == 1:
            meta["seed"] = rnd.choice([0, 1, 2**62, 2**63 - 1, 2**63, -1, 1.5, True, "7", 10**30])
        elif choice == 2:
            meta["dtype"] = rnd.choice([*DTYPES, "complex64", 4, None])
        elif choice == 3:
            meta["extra"] = rnd.choice([1, "x", True])
            node["m"] = meta
            return True  # unknown metadata keys are ignored: the meaning is kept
        elif choice == 4:
            node.pop("m", None)
            return False
        else:
            node["m"] = rnd.choice([[1], "ix", 3, {"ix": {"a": 1}}])
            return False
        node["m"] = meta
        return False

    def _dtype(self, doc: dict[str, Any]) -> bool:
        table = doc.get("t")
        rows = [r for r in table if isinstance(r, list) and len(r) == 3] if isinstance(table, list) else []
        if not rows:
            return False
        self.rnd.choice(rows)[1] = self.rnd.choice([*DTYPES, "complex128", "float8", 7])
        return False

    def _nesting(self, doc: dict[str, Any]) -> bool:
        rnd = self.rnd
        nodes = _nodes(doc)
        if not nodes:
            return False
        node, parent, key = rnd.choice(nodes)
        choice = rnd.randrange(7)
        numel = node["s"] if isinstance(node.get("s"), list) else [1]
        if choice == 0:  # wrap the node in a sparsifier that keeps everything
            wrapper = {
                "c": rnd.choice(["topk(ratio=1.0)", "topk(ratio=1.0, approx=true)", "threshold(tau=1e-30)"]),
                "s": numel,
                "m": {"ix": "bitmap"},
                "f": {"idx": Buf(b"\xff" * rnd.randint(0, 8)), "values": node},
            }
            self._replace(doc, node, parent, key, wrapper)
        elif choice == 1 and isinstance(node.get("f"), dict):  # unwrap: a nested child takes its place
            children = [v for v in node["f"].values() if isinstance(v, dict)]
            if children:
                self._replace(doc, node, parent, key, rnd.choice(children))
        elif choice == 2 and parent is not None and key is not None:  # a nested node becomes raw bytes
            parent[key] = Buf(bytes(rnd.randrange(0, 64)))
        elif choice == 3:  # a byte field becomes a nested node
            bufs = _bufs(doc)
            if bufs:
                f, k = rnd.choice(bufs)
                n = rnd.choice([1, 4, len(f[k].data) // 4, 2**20])
                f[k] = {
                    "c": "identity",
                    "s": [n],
                    "m": {"dtype": "float32"},
                    "f": {"data": Buf(bytes(4 * min(n, 64)))},
                }
        elif choice == 4:  # a deep chain
            deep: dict[str, Any] = node
            for _ in range(rnd.randint(7, 12)):
                deep = {
                    "c": "topk(ratio=1.0)",
                    "s": numel,
                    "m": {"ix": "bitmap"},
                    "f": {"idx": Buf(b""), "values": deep},
                }
            self._replace(doc, node, parent, key, deep)
        elif choice == 5 and isinstance(node.get("f"), dict):  # extra, missing or renamed fields
            f = node["f"]
            op = rnd.randrange(3)
            if op == 0:
                f[rnd.choice(["extra", "values", "idx", "p"])] = rnd.choice(
                    [Buf(b"\x00" * 4), copy.deepcopy(node)]
                )
            elif op == 1 and f:
                f.pop(rnd.choice(list(f)))
            elif f:
                old = rnd.choice(list(f))
                f[rnd.choice(["data", "codes", "values", "q", "x"])] = f.pop(old)
        elif isinstance(node.get("f"), dict) and len(node["f"]) > 1:  # fields in another order
            items = list(node["f"].items())
            rnd.shuffle(items)
            node["f"] = dict(items)
        return False

    @staticmethod
    def _replace(
        doc: dict[str, Any], node: dict[str, Any], parent: dict[str, Any] | None, key: str | None, new: Any
    ) -> None:
        if parent is not None and key is not None:
            parent[key] = new
            return
        for row in doc["t"]:
            if isinstance(row, list) and len(row) == 3 and row[2] is node:
                row[2] = new

    def _splice(self, doc: dict[str, Any]) -> bool:
        """A node from another payload (another codec) takes the place of one of this payload's nodes."""
        rnd = self.rnd
        other = copy.deepcopy(rnd.choice(self.pool).doc)
        theirs = _nodes(other)
        ours = _nodes(doc)
        if not theirs or not ours:
            return False
        if rnd.random() < 0.5:  # a whole tensor's node, by name, so the layout still matches
            rows = {r[0]: r for r in other["t"]}
            for row in doc["t"] if isinstance(doc.get("t"), list) else []:
                if isinstance(row, list) and len(row) == 3 and row[0] in rows and rnd.random() < 0.5:
                    row[1], row[2] = rows[row[0]][1], rows[row[0]][2]
            return False
        node, parent, key = rnd.choice(ours)
        self._replace(doc, node, parent, key, rnd.choice(theirs)[0])
        return False

    def _huge(self, doc: dict[str, Any]) -> bool:
        """Declare a huge size somewhere while the bytes stay small."""
        node, rnd = self._node(doc), self.rnd
        if node is None:
            return False
        big = rnd.choice([2**24, 2**30, 2**33, 2**34, 2**34 + 1, 2**40])
        choice = rnd.randrange(4)
        if choice == 0:
            node["s"] = [big]
        elif choice == 1:
            node["s"] = [2**17, 2**17] if rnd.random() < 0.5 else [1 << 12, 1 << 22]
        elif choice == 2 and isinstance(node.get("f"), dict):  # a nested values node claiming many values
            for v in node["f"].values():
                if isinstance(v, dict):
                    v["s"] = [big]
        else:
            node["c"] = rnd.choice(
                [
                    "topk(ratio=1e-09, approx=true)",
                    "randk(ratio=0.5, unbiased=false)",
                    "stc(ratio=1e-09)",
                    "threshold(tau=0.5)",
                    "powersgd(rank=1, iters=1, min_size=0, fallback=fp16)",
                ]
            )
            node["s"] = [big] if rnd.random() < 0.5 else [1 << 17, 1 << 17]
        return False

    def _bomb(self, doc: dict[str, Any]) -> bool:
        """A size bomb whose fields stay consistent: a sparse node declaring a huge tensor, or PowerSGD
        factors that multiply out to one; only a size budget or an expected layout can refuse it."""
        rnd = self.rnd
        big = rnd.choice([2**26, 2**30, 2**34])
        sparse = [
            n
            for n, _, _ in _nodes(doc)
            if isinstance(n.get("c"), str) and n["c"].split("(")[0] in ("topk", "threshold", "stc", "randk")
        ]
        if sparse and rnd.random() < 0.8:
            node = rnd.choice(sparse)
            name = node["c"].split("(")[0]
            values = node["f"].get("values") if isinstance(node.get("f"), dict) else None
            k = values["s"][0] if isinstance(values, dict) else 1
            if name == "topk":
                node["c"] = "topk(ratio=0.01, approx=true)"
            elif name == "stc":  # the same count of a far larger tensor
                node["c"] = f"stc(ratio={max(k, 1) / big!r})"
            node["s"] = [big]
            return False
        m = rnd.choice([1 << 12, 1 << 15, 1 << 17])
        n = big // m
        factor = {"c": "identity", "s": [m, 1], "m": {"dtype": "float32"}, "f": {"data": Buf(bytes(4 * m))}}
        bomb = {
            "c": "powersgd(rank=1, iters=1, min_size=0, fallback=fp16)",
            "s": [m, n],
            "f": {"p": factor, "q": {**factor, "s": [n, 1], "f": {"data": Buf(bytes(4 * n))}}},
        }
        rows = [r for r in doc.get("t", []) if isinstance(r, list) and len(r) == 3]
        if rows:
            rnd.choice(rows)[2] = bomb
        return False

    def _table(self, doc: dict[str, Any]) -> bool:
        rnd, rows = self.rnd, doc.get("t")
        if not isinstance(rows, list) or not rows:
            return False
        choice = rnd.randrange(6)
        if choice == 0:
            rows.pop(rnd.randrange(len(rows)))
        elif choice == 1:
            rows.append(copy.deepcopy(rnd.choice(rows)))
        elif choice == 2:
            row = copy.deepcopy(rnd.choice(rows))
            row[0] = rnd.choice(["new", "", "fc1.weight", "x" * 300])
            rows.append(row)
        elif choice == 3 and len(rows) > 1:  # two tensors swap names (shapes then differ from the layout)
            i, j = rnd.sample(range(len(rows)), 2)
            rows[i][0], rows[j][0] = rows[j][0], rows[i][0]
        elif choice == 4:
            rows[rnd.randrange(len(rows))] = rnd.choice([["w", "float32"], "w", None, ["w", "float32", 3, 4]])
        else:
            rnd.shuffle(rows)  # the same tensors in another order
            return True
        return False

    def _header(self, doc: dict[str, Any]) -> bool:
        rnd = self.rnd
        choice = rnd.randrange(5)
        if choice == 0:
            doc["base"] = rnd.choice([["other", 1], ["m", -1], ["m", 2**70], "m", ["m"], [1, 1], None])
        elif choice == 1:
            doc["codec"] = rnd.choice(["", "anything", 7, None, "policy(rules='*: fp16')"])
            return isinstance(doc["codec"], str)  # informative only
        elif choice == 2:
            doc["meta"] = rnd.choice([{"round": 1}, {"x": [1, 2]}, [], "m"])
            return isinstance(doc["meta"], dict)
        elif choice == 3:
            doc[rnd.choice(["extra", "version", "T"])] = 1
        else:
            doc["t"] = rnd.choice([[], {}, None, "t"])
        return False

    def _recode_index(self, doc: dict[str, Any]) -> bool:
        """Re-code an index stream with another coder (and Golomb parameter): the meaning is unchanged."""
        rnd = self.rnd
        cands = []
        for node, _, _ in _nodes(doc):
            f, m = node.get("f"), node.get("m")
            if isinstance(f, dict) and isinstance(m, dict) and isinstance(f.get("idx"), Buf) and "ix" in m:
                cands.append(node)
        if not cands:
            return False
        node = rnd.choice(cands)
        n = math.prod(node["s"])
        values = node["f"].get("values")  # stc has none: its count follows from its ratio
        k = values["s"][0] if values is not None else get_codec(node["c"]).k_for(n)  # type: ignore[attr-defined]  # no values field: an stc node
        idx = decode_indices(node["m"]["ix"], node["f"]["idx"].data, n, k)
        gaps = np.diff(idx, prepend=-1) - 1
        coder = rnd.choice(["bitmap", "varint", "golomb"])
        if coder == "bitmap":
            data = bitmap_encode(idx, n)
        elif coder == "varint":
            data = varint_encode(gaps)
        else:
            data = golomb_encode(gaps, rnd.randint(0, 12))
        node["m"]["ix"], node["f"]["idx"] = coder, Buf(data)
        return True


# -- the decoder's contract --------------------------------------------------------------------------------
class FuzzFailure(AssertionError):
    """A decode broke the contract: an untyped exception, a malformed result, or a changed meaning."""


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"{field}:\s+(\d+)", f.read())
    return int(m.group(1)) if m else 0


#: glibc's mallopt parameter number for the size from which blocks are mapped on their own
_M_MMAP_THRESHOLD = -3
#: blocks from this size up are mapped on their own while peaks are measured (see _trim_heap)
_MEASURED_MMAP_THRESHOLD = 64 * 1024


def _trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``), where available.

    It also fixes glibc's mmap threshold at 64 KiB (for the rest of the process: glibc cannot restore its
    moving default): every block from that size up is then mapped when allocated and unmapped when freed,
    so a measured peak counts the decode's own live blocks. With the moving default (it rises to the
    largest block freed, up to 32 MiB) large blocks land in the heap, where they land depends on its
    fragmentation, and the same fuzz run's worst peak swung between 0.48 and 1.006 of its bound from one
    process to the next (0.37-0.46 with the threshold fixed; measured over 8 runs of
    tests/codecs/test_fuzz_structure.py each).
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt, _LIBC.malloc_trim  # noqa: B018 (glibc, or not)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MEASURED_MMAP_THRESHOLD)
        _LIBC.malloc_trim(0)


_LIBC: Any = None


#: the fixed part of the fuzzer's memory bound: RSS granularity (pages, allocator arenas), not input-dependent
RSS_ALLOWANCE = 1 << 20


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Measure the resident-set peak above the current RSS during the block (Linux: resets VmHWM).

    The C heap is trimmed first, so memory the block allocates shows up as new resident pages.

    Yields a list that holds the peak in bytes after the block; ``[-1]`` where the kernel cannot reset it.
    """
    out: list[int] = []
    _trim_heap()  # freed heap pages would otherwise be reused unseen, hiding the block's own allocations
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        ok = True
    except OSError:
        ok = False
    before = _rss_kib("VmRSS")
    try:
        yield out
    finally:
        out.append(max(0, _rss_kib("VmHWM") - before) * 1024 if ok else -1)


@contextlib.contextmanager
def address_space_cap(extra_bytes: int) -> Iterator[None]:
    """Cap the process's address space at its current size + ``extra_bytes`` during the block.

    A decoder that attempts a huge allocation then fails at once (an untyped ``RuntimeError`` or
    ``MemoryError``, which the contract counts as a failure) instead of exhausting the machine.
    """
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra_bytes if hard == resource.RLIM_INFINITY else min(vm + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def fire(*_: object) -> None:
        raise TimeoutError(f"decode still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _same(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@dataclass
class Outcome:
    """One decode: ``exact``, ``decoded`` (well formed, another delta) or ``refused:<ErrorClass>``."""

    result: str
    seconds: float
    cpu_seconds: float
    peak_bytes: int


def check_decode(
    payload: bytes,
    *,
    layout: Layout | None,
    original: Delta | None = None,
    preserving: bool = False,
    measure_memory: bool = False,
    kill_after: float = 30.0,
    limits: Limits | None = None,
    session: WireSession | None = None,
    expect_base: tuple[str, int] | None = None,
) -> Outcome:
    """Decode ``payload`` and hold the result to the contract; raises :class:`FuzzFailure` if broken.

    ``layout``: the receiver's expected layout (``None``: a standalone decode). A decoded delta must have
    that layout (or, without one, a dtype per tensor and finite values); with ``preserving`` it must equal
    ``original`` exactly. ``kill_after`` interrupts a runaway decode (reported as a failure). ``session``:
    decode as a compact frame of that wire session; ``expect_base``: the receiver's base (id, version).
    """
    peak: list[int] = [0]
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with _alarm(kill_after), peak_memory() if measure_memory else contextlib.nullcontext([0]) as peak:
            out = decompress(
                payload, expect_layout=layout, limits=limits, session=session, expect_base=expect_base
            )
    except DeltaplaneError as exc:
        result = f"refused:{type(exc).__name__}"
        if preserving:
            raise FuzzFailure(f"a meaning-preserving mutation was refused: {exc}") from exc
    except Exception as exc:  # the contract: nothing but DeltaplaneError escapes
        raise FuzzFailure(f"untyped {type(exc).__name__}: {exc}") from exc
    else:
        got = Layout.of(out)
        if layout is not None and (got.keys() != layout.keys() or any(got[k] != layout[k] for k in got)):
            raise FuzzFailure(f"decoded a delta of another layout: {got.to_json()[:3]}")
        if layout is None and got.decoded_bytes > (limits or Limits()).decode_budget(len(payload)):
            raise FuzzFailure(f"decoded {got.decoded_bytes} bytes from a {len(payload)}-byte payload")
        for k, v in out.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise FuzzFailure(f"decoded non-finite values in '{k}'")
        if preserving and original is not None and not _same(dict(out), dict(original)):
            raise FuzzFailure("a meaning-preserving mutation decoded to another delta")
        exact = original is not None and _same(dict(out), dict(original))
        result = "exact" if exact else "decoded"
    return Outcome(
        result, time.perf_counter() - t0, time.process_time() - c0, (peak or [0])[-1] if measure_memory else 0
    )


@dataclass
class FuzzReport:
    """What :func:`fuzz` saw."""

    mutations: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    #: decodes that took more than ``hang_seconds`` of CPU time
    hangs: int = 0
    max_seconds: float = 0.0
    max_cpu_seconds: float = 0.0
    #: worst ratio of peak memory to the bound 4 × model bytes + 10 × payload bytes + 1 MiB (measured decodes)
    max_memory_ratio: float = 0.0
    max_peak_bytes: int = 0
    worst_memory: str = ""
    #: decodes whose first peak exceeded 0.8 of the bound and came out lower when decoded again
    remeasured: int = 0
    model_bytes: int = 0
    specs: list[str] = field(default_factory=list)


def fuzz(
    mutations: int,
    *,
    seed: int = 0,
    specs: list[str] | None = None,
    measure_memory: bool = False,
    hang_seconds: float = 1.0,
    standalone_share: float = 0.25,
    kill_after: float = 30.0,
    progress: Callable[[int], None] | None = None,
    compact: bool = False,
) -> FuzzReport:
    """Run ``mutations`` structure-aware mutations of payloads of every spec in ``specs`` (default :data:`SPECS`).

    Each payload of :func:`fuzz_model`'s delta is decoded with the model's expected layout (a receiver), or
    for ``standalone_share`` of them without (a standalone file). Failures are collected, not raised.
    ``compact``: every mutation is framed as a compact payload of its spec's
    :class:`~deltaplane.codecs.WireSession` (entropy coding on) and decoded in that session, always with
    the session's layout (:meth:`Mutator.mutate_compact`).
    """
    specs = specs or SPECS
    rnd = random.Random(seed)
    model = fuzz_model(seed)
    delta = Delta(model)
    layout = Layout.of(model)
    payloads, originals = [], []
    for i, spec in enumerate(specs):
        p = Compressor(spec, error_feedback=False, seed=seed + i).compress(
            delta, base_id="fuzz", base_version=1
        )
        payloads.append(p)
        originals.append(decompress(p, expect_layout=layout))
    mutator = Mutator(payloads, rnd)
    sessions = [WireSession.create(layout, spec, base_id="fuzz") for spec in specs] if compact else []
    if compact:
        standalone_share = 0.0  # a compact frame is only ever decoded in its session, with its layout
    report = FuzzReport(model_bytes=layout.nbytes, specs=list(specs))
    # a standalone decode may use its whole budget: keep it small, so the address-space cap can be tight
    standalone_limits = Limits(max_decoded_bytes=16 * layout.decoded_bytes)
    cap = 4 * layout.nbytes + 10 * max(len(p) for p in payloads) + 3 * standalone_limits.max_decoded_bytes
    cap += 512 << 20  # the interpreter's own growth
    with address_space_cap(cap):
        for p, o in zip(payloads, originals, strict=True):  # warm-up: imports and caches before measuring
            check_decode(p, layout=layout, original=o, preserving=True)
        for i, s in enumerate(sessions):  # each session's lazy tables and the rANS coder, before measuring
            c = Compressor(specs[i], error_feedback=False, seed=seed + i)
            p = c.compress(delta, base_version=1, session=s)
            check_decode(p, layout=layout, original=originals[i], preserving=True, session=s)
        for i in range(mutations):
            if compact:
                payload, kind, preserving, src = mutator.mutate_compact(sessions)
            else:
                payload, kind, preserving, src = mutator.mutate()
            standalone = rnd.random() < standalone_share
            report.kinds[kind.split("+")[0]] += 1
            try:
                out = check_decode(
                    payload,
                    layout=None if standalone else layout,
                    original=originals[src],
                    preserving=preserving and not standalone,
                    measure_memory=measure_memory,
                    limits=standalone_limits if standalone else None,
                    kill_after=kill_after,
                    session=sessions[src] if compact else None,
                    expect_base=("fuzz", 1) if compact else None,
                )
            except FuzzFailure as exc:
                report.failures.append(f"{kind} on '{specs[src]}': {exc}")
                report.outcomes["failure"] += 1
                continue
            finally:
                report.mutations += 1
            report.outcomes[out.result] += 1
            report.max_seconds = max(report.max_seconds, out.seconds)
            report.max_cpu_seconds = max(report.max_cpu_seconds, out.cpu_seconds)
            if out.cpu_seconds > hang_seconds:  # CPU time: a loaded machine stretches wall time, not work
                report.hangs += 1
            if measure_memory and out.peak_bytes >= 0 and not standalone:
                # a compact frame's coded fields are decoded into buffers of their own (at most the model's
                # size in all) before the codec reads them: one more model size than a self-describing payload
                # plus a fixed MiB: resident memory moves in pages and allocator arenas, so a decode of a few KB
                # can show a few hundred KB of RSS (a CI run saw 0.4 MB over 3.2 MB); the allowance does not grow
                # with the input, so a decode that allocates in proportion to a forged size still exceeds it
                bound = (5 if compact else 4) * layout.nbytes + 10 * len(payload) + RSS_ALLOWANCE
                peak = out.peak_bytes
                for _ in range(2 if peak > 0.8 * bound else 0):
                    # a decode is deterministic, so a real excess repeats; a one-off page-fault burst of
                    # the allocator or the garbage collector does not: the smallest of three peaks counts
                    again = check_decode(
                        payload,
                        layout=layout,
                        measure_memory=True,
                        session=sessions[src] if compact else None,
                    )
                    peak = min(peak, again.peak_bytes)
                report.remeasured += peak != out.peak_bytes
                if peak / bound > report.max_memory_ratio:
                    report.max_memory_ratio = peak / bound
                    report.worst_memory = f"{kind} on '{specs[src]}' ({out.result}, {len(payload)} bytes)"
                report.max_peak_bytes = max(report.max_peak_bytes, peak)
            if progress is not None:
                progress(i)
    return report


# -- stacked decoding: damaged payloads among good ones ------------------------------------------------------
#: mutations that keep a node's codec, shape and field names (only its bytes or metadata lie), so a damaged
#: row still stacks with the good rows and reaches the codecs' ``decode_rows`` fast paths
STACKABLE_KINDS = ("field_bytes", "meta", "length", "recode_index")
#: the :attr:`StackReport.stacked` key that counts stacks (not tensors) with under two frames past the checks
FEWER = "fewer than 2 frames past the frame checks"


@dataclass
class StackReport:
    """What :func:`fuzz_stacked` saw."""

    stacks: int = 0
    payloads: int = 0
    #: each payload decoded alone (:func:`decompress`): ``decoded`` or ``refused:<ErrorClass>``
    outcomes: Counter[str] = field(default_factory=Counter)
    #: the first mutation's kind of each damaged payload (``valid``: an undamaged row)
    kinds: Counter[str] = field(default_factory=Counter)
    #: per tensor of each stack with two or more payloads past the frame checks, what
    #: :func:`~deltaplane.codecs.base.decode_tree_rows` did: ``decoded`` (row for row what
    #: :func:`~deltaplane.codecs.base.decode_tree` gives), ``refused`` (a row refused alone, the same error
    #: class), ``refused, rows decode alone`` (allowed: :func:`decompress_many` then decodes each alone);
    #: and per stack, :data:`FEWER`
    stacked: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    #: :func:`decompress_many` calls that took more than ``hang_seconds`` of CPU time
    hangs: int = 0
    max_seconds: float = 0.0
    max_cpu_seconds: float = 0.0
    #: worst ratio of a stack's peak memory to rows × 5 × model bytes + 10 × its payloads' bytes + 1 MiB
    max_memory_ratio: float = 0.0
    max_peak_bytes: int = 0
    seconds: float = 0.0
    model_bytes: int = 0
    specs: list[str] = field(default_factory=list)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal shape, dtype and values, NaN where the other has NaN (a damaged row may decode to NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _outcome(x: Delta | DeltaplaneError) -> str:
    return f"refused:{type(x).__name__}" if isinstance(x, DeltaplaneError) else "decoded"


def fuzz_stacked(
    stacks: int,
    *,
    seed: int = 0,
    specs: list[str] | None = None,
    max_rows: int = 6,
    seconds: float | None = None,
    measure_memory: bool = False,
    hang_seconds: float = 1.0,
    kill_after: float = 30.0,
    progress: Callable[[int], None] | None = None,
) -> StackReport:
    """Decode stacks of compact payloads, some damaged, together and one by one, and compare.

    Each stack holds 2 to ``max_rows`` compact payloads of one codec's
    :class:`~deltaplane.codecs.WireSession`: good payloads of different deltas (one layout) and, in 90% of
    the stacks, at least one damaged by the structure-aware mutations of :meth:`Mutator.mutate_compact`
    (70% of them of a kind that keeps the stack alike: :data:`STACKABLE_KINDS`; 10% repeat an earlier
    damaged payload of the stack). Holds :func:`decompress_many` to its contract — exactly each payload's
    :func:`decompress` outcome in its place: the same delta, or the same error class and message — and
    :func:`~deltaplane.codecs.base.decode_tree_rows` (the codecs' ``decode_rows``) on the payloads past the
    frame checks, tensor by tensor, to :func:`~deltaplane.codecs.base.decode_tree` of each row: the same
    values, or a :class:`~deltaplane.errors.DeltaplaneError` of a class some row raises alone; nothing else
    may escape. ``seconds``: stop after this long (the stacks done are reported). Failures are collected.
    """
    from deltaplane.codecs.base import decode_tree, decode_tree_rows
    from deltaplane.codecs.compressor import _compact_trees, decompress_many

    specs = specs or SPECS
    rnd = random.Random(seed)
    model = fuzz_model(seed)
    layout = Layout.of(model)
    sessions = [WireSession.create(layout, spec, base_id="fuzz") for spec in specs]
    pool = [
        Compressor(spec, error_feedback=False, seed=seed + i).compress(
            Delta(model), base_id="fuzz", base_version=1
        )
        for i, spec in enumerate(specs)
    ]
    mutator = Mutator(pool, rnd)
    # good rows: four deltas of one layout per codec, each framed in its codec's session
    deltas = [Delta(fuzz_model(seed + 1 + j)) for j in range(4)]
    good = [
        [
            Compressor(spec, error_feedback=False, seed=seed + 7 * i + j).compress(
                d, base_version=1, session=s
            )
            for j, d in enumerate(deltas)
        ]
        for i, (spec, s) in enumerate(zip(specs, sessions, strict=True))
    ]
    base = ("fuzz", 1)
    report = StackReport(model_bytes=layout.nbytes, specs=list(specs))
    cap = 4 * max_rows * layout.nbytes + 10 * max_rows * max(len(p) for p in pool) + (512 << 20)
    t_start = time.perf_counter()
    with address_space_cap(cap):
        for spec, p, s in zip(specs, (g[0] for g in good), sessions, strict=True):  # warm-up: lazy tables
            try:
                decompress_many([p, p], session=s, expect_base=base, expect_layout=layout)
            except Exception as exc:  # a good stack: nothing may be raised
                report.failures.append(
                    f"good stack on '{spec}': decompress_many raised {type(exc).__name__}: {exc}"
                )
        for n in range(stacks):
            if seconds is not None and time.perf_counter() - t_start > seconds:
                break
            src = rnd.randrange(len(specs))
            session, rows = sessions[src], rnd.randint(2, max_rows)
            damaged = set(rnd.sample(range(rows), rnd.randint(1, rows))) if rnd.random() < 0.9 else set()
            stack: list[bytes] = []
            names: list[str] = []
            for j in range(rows):
                if j not in damaged:
                    stack.append(rnd.choice(good[src]))
                    names.append("valid")
                elif names and names[-1] != "valid" and rnd.random() < 0.1:
                    stack.append(stack[-1])  # the same damage twice: a skeleton the session now remembers
                    names.append(names[-1])
                else:
                    kind = rnd.choice(STACKABLE_KINDS) if rnd.random() < 0.7 else None
                    payload, kind, _, _ = mutator.mutate_compact(sessions, source=src, kind=kind)
                    stack.append(payload)
                    names.append(kind)
            report.kinds.update(k.split("+")[0] for k in names)
            where = f"stack {n} of {rows} on '{specs[src]}' ({', '.join(names)})"
            _check_stack(
                stack, session, layout, base, where, report, rnd, measure_memory, hang_seconds, kill_after
            )
            _check_rows(stack, session, base, where, report, _compact_trees, decode_tree, decode_tree_rows)
            report.stacks += 1
            report.payloads += rows
            if progress is not None:
                progress(n)
    report.seconds = time.perf_counter() - t_start
    return report


def _check_stack(
    stack: list[bytes],
    session: WireSession,
    layout: Layout,
    base: tuple[str, int],
    where: str,
    report: StackReport,
    rnd: random.Random,
    measure_memory: bool,
    hang_seconds: float,
    kill_after: float,
) -> None:
    """:func:`decompress_many` of the stack against each payload's :func:`decompress` (in a random order:
    the session remembers the skeletons it has checked, so either may see a skeleton first)."""
    from deltaplane.codecs.compressor import decompress_many

    def alone() -> list[Delta | DeltaplaneError] | None:
        out: list[Delta | DeltaplaneError] = []
        for p in stack:
            try:
                out.append(decompress(p, session=session, expect_base=base, expect_layout=layout))
            except DeltaplaneError as exc:
                out.append(exc)
            except Exception as exc:  # the one-by-one decoder's own contract (fuzz() covers it too)
                report.failures.append(f"{where}: decoded alone, untyped {type(exc).__name__}: {exc}")
                return None
        return out

    def together() -> list[Delta | DeltaplaneError] | None:
        peak: list[int] = [0]
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            with _alarm(kill_after), peak_memory() if measure_memory else contextlib.nullcontext([0]) as peak:
                out = decompress_many(stack, session=session, expect_base=base, expect_layout=layout)
        except Exception as exc:  # errors go in their payload's place; nothing may be raised for a stack
            report.failures.append(f"{where}: decompress_many raised {type(exc).__name__}: {exc}")
            return None
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        report.max_seconds, report.max_cpu_seconds = (
            max(report.max_seconds, wall),
            max(report.max_cpu_seconds, cpu),
        )
        report.hangs += cpu > hang_seconds
        if measure_memory and peak and peak[-1] >= 0:
            bound = len(stack) * 5 * layout.nbytes + 10 * sum(map(len, stack)) + RSS_ALLOWANCE
            report.max_memory_ratio = max(report.max_memory_ratio, peak[-1] / bound)
            report.max_peak_bytes = max(report.max_peak_bytes, peak[-1])
        return out

    if rnd.random() < 0.5:
        want, got = alone(), together()
    else:
        got, want = together(), alone()
    if want is None or got is None:
        return
    report.outcomes.update(_outcome(w) for w in want)
    if len(got) != len(want):
        report.failures.append(f"{where}: decompress_many gave {len(got)} results for {len(want)} payloads")
        return
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(w, DeltaplaneError):
            if not isinstance(g, DeltaplaneError):
                report.failures.append(f"{where}: row {i} decoded in the stack but refused alone: {w}")
            elif type(g) is not type(w) or str(g) != str(w):
                report.failures.append(
                    f"{where}: row {i} refused as {_outcome(g)} '{g}', alone {_outcome(w)} '{w}'"
                )
        elif isinstance(g, DeltaplaneError):
            report.failures.append(
                f"{where}: row {i} refused in the stack ({_outcome(g)}: {g}) but decodes alone"
            )
        elif g.keys() != w.keys() or not all(_same_values(g[k], w[k]) for k in w):
            report.failures.append(f"{where}: row {i} decoded in the stack to another delta than alone")


def _check_rows(
    stack: list[bytes],
    session: WireSession,
    base: tuple[str, int],
    where: str,
    report: StackReport,
    compact_trees: Callable[..., dict[str, tuple[torch.dtype, Any]]],
    decode_tree: Callable[[Any], Tensor],
    decode_tree_rows: Callable[[list[Any]], Tensor],
) -> None:
    """The stacked tree decoder itself on the payloads past the frame checks, tensor by tensor, against
    each row decoded alone (what :func:`decompress_many` relies on before it falls back)."""
    trees = []
    for p in stack:
        try:
            trees.append(compact_trees(p, session, base, None, check=True))
        except DeltaplaneError:
            continue
    if len(trees) < 2:
        report.stacked[FEWER] += 1
        return
    for name in trees[0]:
        nodes = [t[name][1] for t in trees]
        alone: list[Tensor | DeltaplaneError] = []
        for e in nodes:
            try:
                alone.append(decode_tree(e))
            except DeltaplaneError as exc:
                alone.append(exc)
            except Exception as exc:
                report.failures.append(f"{where}: '{name}' alone: untyped {type(exc).__name__}: {exc}")
                return
        errors = {type(a) for a in alone if isinstance(a, DeltaplaneError)}
        try:
            out = decode_tree_rows(nodes)
        except DeltaplaneError as exc:
            if not errors:
                report.stacked["refused, rows decode alone"] += 1
            elif type(exc) not in errors:
                names = sorted(e.__name__ for e in errors)
                report.failures.append(
                    f"{where}: '{name}' stacked {type(exc).__name__} ({exc}), alone {names}"
                )
            else:
                report.stacked["refused"] += 1
            continue
        except Exception as exc:
            report.failures.append(f"{where}: '{name}' stacked: untyped {type(exc).__name__}: {exc}")
            continue
        bad = [i for i, a in enumerate(alone) if isinstance(a, DeltaplaneError)]
        if bad:
            report.failures.append(
                f"{where}: '{name}' stacked decoded rows {bad} that alone raise: {alone[bad[0]]}"
            )
            continue
        # rows of different codecs may decode to different dtypes (a float16 identity next to a float32
        # quant): one stack holds them in their promoted dtype, which decompress_many casts to the tensor's
        dtype = functools.reduce(torch.promote_types, (a.dtype for a in alone))  # type: ignore[union-attr]  # no bad row: tensors only
        if out.dtype != dtype:
            report.failures.append(
                f"{where}: '{name}' stacked as {out.dtype}, the rows alone promote to {dtype}"
            )
        elif not all(_same_values(out[i], a.to(dtype)) for i, a in enumerate(alone)):  # type: ignore[union-attr]  # as above
            report.failures.append(f"{where}: '{name}' stacked decoded other values than each row alone")
        else:
            report.stacked["decoded"] += 1
