"""The device artifact: a model's tensors stored compactly (sparse positions + quantized values + zstd).

Layout (little-endian)::

    magic b"DPLA" | u8 version (1) | u32 header_len | header (UTF-8 JSON) | zstd frame of the payload
    payload = u32 table_len | table (UTF-8 JSON) | buffers

The header (readable without decompressing) holds the payload's raw size and SHA-256 and the manifest (sizes,
sparsity, quant scheme, accuracy, source model hash). The header is not itself hashed, so the table records the
manifest's SHA-256 (:func:`manifest_sha256`, key ``manifest_sha256``): a manifest edited after writing (a gate
turned to passed, an accuracy raised) no longer matches the hashed payload and the file is refused. The table — inside the compressed payload, because for a
small quantized model the per-tensor JSON is a noticeable share of the bytes — lists every tensor (name, shape,
dtype, layout, quantization, byte ranges relative to the start of the buffers) and the optional ONNX graph (its
initializers stripped out and stored as tensors). Each tensor is:

- ``dense`` or ``sparse`` — sparse keeps only the non-zero values plus their positions, coded as a bitmap or
  LEB128 gaps, whichever is smaller (:func:`deltaplane.codecs.entropy.encode_indices`); chosen per tensor when
  it is smaller than dense.
- values ``raw`` (the tensor's own dtype, lossless — used for biases, norms and already-int8 ONNX weights), or
  ``int8`` / ``int4`` symmetric group-wise codes with float16 scales (lossy; float weights only), 4-bit codes
  packed two per byte.

zstd (https://facebook.github.io/zstd/) then squeezes what redundancy is left (runs in bitmaps, repeated codes,
the graph's protobuf). Reading is strict: magic, version, header bounds, checksum and every byte range are
checked and a bad file raises :class:`~deltaplane.errors.DecodeError`, and what a file may decode to is bounded by
the wire format's decode budget (:data:`DECODE_LIMITS`) before anything is inflated or allocated; writing is
atomic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from torch import Tensor

from deltaplane.codecs.entropy import decode_indices, encode_indices, pack_bits, unpack_bits
from deltaplane.codecs.lossless import zstd_decompress
from deltaplane.codecs.wire import Limits
from deltaplane.deploy.quantize import GroupQuant, _group_dequant, _group_quant, group_quant_fits
from deltaplane.errors import ConfigError, DecodeError
from deltaplane.textfile import atomic_write_bytes

__all__ = [
    "Artifact",
    "ArtifactInfo",
    "manifest_sha256",
    "pack_onnx",
    "read_artifact",
    "state_dict_sha256",
    "write_artifact",
]

MAGIC = b"DPLA"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")
MAX_HEADER = 16 << 20
MAX_TENSORS = 100_000
MAX_PAYLOAD = 8 << 30
#: the wire format's decode budget (:meth:`~deltaplane.codecs.wire.Limits.decode_budget`): a file of ``n`` bytes
#: decodes to at most ``max(64 MiB, 4096 × n)`` bytes, never beyond ``MAX_PAYLOAD`` (a dense raw payload decodes
#: to its own size, so the absolute cap is the payload's); checked before anything is inflated or allocated,
#: so a 300-byte file cannot declare a 1 GiB tensor of zeros
DECODE_LIMITS = Limits(max_decoded_bytes=MAX_PAYLOAD)
QUANT_SCHEMES = ("none", "int8", "int4")
DEFAULT_GROUP = {"int8": 128, "int4": 32}
_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class ArtifactInfo:
    """What :func:`write_artifact` wrote: file size, uncompressed payload size and per-tensor facts."""

    path: Path
    nbytes: int
    payload_nbytes: int
    tensors: list[dict[str, Any]]
    sparsity: float


@dataclass
class Artifact:
    """A decoded artifact: float/int arrays by name, the ONNX graph (if any) and the manifest."""

    tensors: dict[str, np.ndarray]
    manifest: dict[str, Any]
    graph: bytes | None

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors as torch tensors (e.g. for ``model.load_state_dict``)."""
        return {k: torch.from_numpy(np.array(v)) for k, v in self.tensors.items()}

    def onnx_bytes(self) -> bytes:
        """The complete ONNX model: the stored graph with its initializers put back (for an ORT session)."""
        import onnx
        from onnx import numpy_helper

        if self.graph is None:
            raise ConfigError("this artifact holds weights only (no ONNX graph); use state_dict()")
        model = onnx.ModelProto()
        model.ParseFromString(self.graph)
        for name, arr in self.tensors.items():
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
        return model.SerializeToString()


def state_dict_sha256(state: Mapping[str, Tensor]) -> str:
    """A content hash of a state dict (names, dtypes, shapes and bytes, in sorted name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _encode_tensor(
    name: str, arr: np.ndarray, quant: str, group_size: int | None
) -> tuple[dict[str, Any], list[bytes]]:
    dtype = arr.dtype.name
    if dtype not in _NP_DTYPES:
        raise ConfigError(f"tensor {name!r}: dtype {dtype} cannot be stored")
    flat = np.ascontiguousarray(arr).reshape(-1)
    n = flat.size
    # a tensor whose values float16 scales cannot hold (|x| > qmax × 65504) is stored losslessly, not as NaN
    lossy = (
        quant != "none"
        and arr.dtype.kind == "f"
        and arr.ndim >= 2
        and group_quant_fits(arr, {"int8": 8, "int4": 4}[quant])
    )
    scheme = quant if lossy else "none"
    bits = {"int8": 8, "int4": 4}.get(scheme, arr.dtype.itemsize * 8)
    nnz = int(np.count_nonzero(flat))
    dense_bytes = math.ceil(n * bits / 8)
    # Every index coder takes at least a bit a position (bitmap: one per value; varint: a byte; Golomb-Rice:
    # q + 1 + k bits), so when the values alone plus that bound fill the dense size, sparse cannot win and the
    # positions are never listed: for a mostly non-zero tensor, e.g. an int8 model's uint8 embedding table,
    # they were 8 bytes each (the int64 positions and their gaps, ~300 MB at once on MiniLM's 11.7 M values)
    sparse = nnz < n and math.ceil(nnz / 8) + math.ceil(nnz * bits / 8) < dense_bytes
    if sparse:
        nz = np.flatnonzero(flat)
        coder, index = encode_indices(nz, n)
        sparse = len(index) + math.ceil(nnz * bits / 8) < dense_bytes
    values = flat[nz] if sparse else flat
    entry: dict[str, Any] = {
        "name": name,
        "shape": list(arr.shape),
        "dtype": dtype,
        "layout": "sparse" if sparse else "dense",
        "nnz": nnz,
        "quant": scheme,
    }
    bufs: list[bytes] = []
    if sparse:
        entry["index_coder"] = coder
        bufs.append(index)
    if scheme == "none":
        bufs.append(np.ascontiguousarray(values).tobytes())
    else:
        g = group_size or DEFAULT_GROUP[scheme]
        gq = _group_quant(values, g, bits)
        entry["group_size"] = g
        bufs += [pack_bits(gq.codes, bits), gq.scales.astype("<f2").tobytes()]
    return entry, bufs


def _strict_json(raw: bytes, what: str) -> Any:
    """``raw`` parsed as JSON without NaN/Infinity (``int(Infinity)`` raised OverflowError from a size) and
    within Python's nesting depth; anything else is a :class:`DecodeError` naming ``what``."""

    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not a JSON number")

    try:
        return json.loads(raw, parse_constant=refuse)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DecodeError(f"artifact {what} is not valid JSON ({type(e).__name__}: {e!s:.120})") from None


def _is_count(v: object) -> TypeGuard[int]:
    """A non-negative JSON integer (not a bool, a float or a numeric string)."""
    return type(v) is int and v >= 0


@dataclass(frozen=True)
class _Entry:
    """A tensor table entry, every field checked for type and range: what :func:`write_artifact` writes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    sparse: bool
    quant: str
    nnz: int
    group_size: int
    index_coder: str
    buffers: list[tuple[int, int]]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _entry(e: Any) -> _Entry:
    """Check one tensor table entry (strictly: a numeric string is not a size, ``[True, 32]`` not a shape)."""
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        raise DecodeError(f"malformed tensor entry {e!r:.200}: an object with a string 'name'")
    name = e["name"]
    shape, dtype, layout, quant = e.get("shape"), e.get("dtype"), e.get("layout"), e.get("quant")
    if not isinstance(shape, list) or len(shape) > 16 or not all(_is_count(s) for s in shape):
        raise DecodeError(
            f"tensor {name!r:.80}: shape must list at most 16 non-negative integers, got {shape!r:.80}"
        )
    if not isinstance(dtype, str) or dtype not in _NP_DTYPES:
        raise DecodeError(
            f"tensor {name!r:.80}: unknown dtype {dtype!r:.40} (known: {', '.join(_NP_DTYPES)})"
        )
    if layout not in ("dense", "sparse") or quant not in QUANT_SCHEMES:
        raise DecodeError(f"tensor {name!r:.80}: unknown layout/quant {layout!r:.40}/{quant!r:.40}")
    nnz, g, coder, ranges = (
        e.get("nnz"),
        e.get("group_size", 0),
        e.get("index_coder", ""),
        e.get("buffers", []),
    )
    n = math.prod(shape)
    if not _is_count(nnz) or nnz > n:
        raise DecodeError(f"tensor {name!r:.80}: nnz {nnz!r:.40} is not an integer in 0..{n}")
    if not _is_count(g) or (quant != "none" and g < 1):
        raise DecodeError(f"tensor {name!r:.80}: bad group_size {g!r:.40}")
    if not isinstance(coder, str):
        raise DecodeError(f"tensor {name!r:.80}: index_coder must be a string, got {coder!r:.40}")
    if not isinstance(ranges, list) or not all(
        isinstance(r, list) and len(r) == 2 and _is_count(r[0]) and _is_count(r[1]) for r in ranges
    ):
        raise DecodeError(
            f"tensor {name!r:.80}: buffers must list [offset, length] pairs, got {ranges!r:.80}"
        )
    buffers = [(r[0], r[1]) for r in ranges]
    return _Entry(
        name, tuple(shape), np.dtype(_NP_DTYPES[dtype]), layout == "sparse", quant, nnz, g, coder, buffers
    )


def _check_budget(what: str, nbytes: int, file_nbytes: int) -> None:
    budget = DECODE_LIMITS.decode_budget(file_nbytes)
    if nbytes > budget:
        raise DecodeError(
            f"artifact of {file_nbytes} bytes declares {what} of {nbytes} bytes, beyond its decode budget of "
            f"{budget} (max(64 MiB, 4096 × the file's size), at most {MAX_PAYLOAD}): not a file deploy writes"
        )


def _decode_tensor(e: _Entry, bufs: list[bytes]) -> np.ndarray:
    n, dtype = e.numel, e.dtype
    k = e.nnz if e.sparse else n
    expected_bufs = (1 if e.sparse else 0) + (1 if e.quant == "none" else 2)
    if len(bufs) != expected_bufs:
        raise DecodeError(f"tensor {e.name!r}: {len(bufs)} buffers, expected {expected_bufs}")
    idx = decode_indices(e.index_coder, bufs[0], n, k) if e.sparse else None
    vbufs = bufs[1:] if e.sparse else bufs
    if e.quant == "none":
        if len(vbufs[0]) != k * dtype.itemsize:
            raise DecodeError(
                f"tensor {e.name!r}: {len(vbufs[0])} value bytes, expected {k * dtype.itemsize}"
            )
        values = np.frombuffer(vbufs[0], dtype=dtype, count=k)
    else:
        bits = 8 if e.quant == "int8" else 4
        # a group at least as long as the values is one group: decoded as such, since numpy cannot divide by a
        # group_size of 2**63 or more (an untyped OverflowError from a file whose hashes are valid)
        g = min(e.group_size, max(k, 1))
        n_groups = -(-k // g)
        if len(vbufs[1]) != 2 * n_groups:
            raise DecodeError(f"tensor {e.name!r}: {len(vbufs[1])} scale bytes, expected {2 * n_groups}")
        codes = unpack_bits(vbufs[0], bits, k)
        scales = np.frombuffer(vbufs[1], dtype="<f2", count=n_groups)
        values = _group_dequant(GroupQuant(codes, scales, g, bits)).astype(dtype)
    out = np.zeros(n, dtype=dtype)
    if e.sparse:
        out[idx] = values
    else:
        out[:] = values
    return out.reshape(e.shape)


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """The SHA-256 of a manifest's canonical JSON (compact separators, keys in their order, ASCII escapes).

    It is what an artifact's tensor table records under ``manifest_sha256``, hashed as the reader parses it
    (so a duplicate key or another spelling of the same number hashes as the value actually read).
    """
    text = json.dumps(dict(manifest), separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_artifact(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor | np.ndarray],
    *,
    quant: str = "none",
    group_size: int | None = None,
    graph: bytes | None = None,
    manifest: Mapping[str, Any] | None = None,
    level: int = 19,
) -> ArtifactInfo:
    """Encode ``tensors`` (and an optional stripped ONNX graph) into an artifact file, atomically.

    Args:
        path: destination file (conventionally ``model.dpla``).
        tensors: name → tensor/array. Float tensors with ≥ 2 dims are quantized per ``quant``; everything else
            (biases, norms, integer tensors such as an int8 ONNX model's weights) is stored losslessly.
        quant: ``"none"``, ``"int8"`` or ``"int4"`` (symmetric group-wise, float16 scales).
        group_size: values per scale (default 128 for int8, 32 for int4), taken along rows.
        graph: serialized ONNX ``ModelProto`` without initializers (see :func:`pack_onnx`).
        manifest: JSON-serializable facts to embed (sizes, sparsity, accuracy, source hash...), without
            NaN/Inf (the reader refuses them); its SHA-256 is recorded in the hashed tensor table.
        level: zstd compression level (19: slow to write, fast to read — written once, read on every device).
    """
    import zstandard

    if quant not in QUANT_SCHEMES:
        raise ConfigError(f"quant must be one of {QUANT_SCHEMES}. Found {quant!r}")
    if len(tensors) > MAX_TENSORS:
        raise ConfigError(f"too many tensors ({len(tensors)} > {MAX_TENSORS})")
    entries, chunks, offset = [], [], 0
    zeros = total = 0

    def add(buf: bytes) -> list[int]:
        nonlocal offset
        chunks.append(buf)
        rng = [offset, len(buf)]
        offset += len(buf)
        return rng

    for name, t in tensors.items():
        arr = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
        entry, bufs = _encode_tensor(name, arr, quant, group_size)
        entry["buffers"] = [add(b) for b in bufs]
        entries.append(entry)
        if arr.ndim >= 2:
            zeros += arr.size - entry["nnz"]
            total += arr.size
    graph_range = add(graph) if graph is not None else None
    manifest = dict(manifest or {})
    try:  # the manifest's hash lives in the table, which the payload's SHA-256 covers (the header is not hashed)
        bound = manifest_sha256(manifest)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"artifact manifest must be JSON without NaN/Inf ({exc})") from None
    table = json.dumps(
        {"tensors": entries, "graph": graph_range, "manifest_sha256": bound}, separators=(",", ":")
    ).encode()
    # one join (not a join then a concatenation: two more copies of every tensor's bytes), and the buffers
    # dropped before compressing, when zstd's level-19 context (~80 MiB for MiniLM) is allocated
    payload = b"".join([struct.pack("<I", len(table)), table, *chunks])
    chunks.clear()
    header = {
        "format": "deltaplane-artifact",
        "version": VERSION,
        "payload_nbytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "manifest": manifest,
    }
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    body = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(payload)
    data = _PREFIX.pack(MAGIC, VERSION, len(hbytes)) + hbytes + body
    atomic_write_bytes(path, data)
    return ArtifactInfo(Path(path), len(data), len(payload), entries, zeros / total if total else 0.0)


#: what reading an artifact from before the manifest binding warns (the file is otherwise read as before)
UNBOUND_MANIFEST = (
    "artifact predates manifest binding: its manifest (quality, gates, sizes) is covered by no hash and may "
    "have been edited; rewrite it (deltaplane deploy, write_artifact) to bind it"
)


def _manifest_bound(manifest: dict[str, Any], recorded: object) -> bool:
    """Whether the (hashed) tensor table binds the header's ``manifest``: refuse (:class:`DecodeError`) one it
    does not match; ``False`` for an artifact written before the table recorded it (no ``manifest_sha256``),
    whose manifest is whatever the header says, which nothing checks (the reader warns)."""
    if recorded is None:
        return False
    if not (isinstance(recorded, str) and len(recorded) == 64 and set(recorded) <= set("0123456789abcdef")):
        raise DecodeError(
            f"artifact tensor table's manifest_sha256 must be 64 lowercase hex digits, got {recorded!r:.80}"
        )
    if manifest_sha256(manifest) != recorded:
        raise DecodeError(
            "artifact manifest does not match the SHA-256 its tensor table records: the header's manifest "
            "was edited after the artifact was written; use the deploy's own file, or rewrite the artifact"
        )
    return True


def read_artifact(path: str | os.PathLike[str] | bytes) -> Artifact:
    """Decode an artifact file (or its bytes); raises :class:`DecodeError` on anything malformed.

    The header's manifest must match the SHA-256 the tensor table records (else :class:`DecodeError`); an
    artifact from before that binding is read with a ``UserWarning``.
    """

    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    if len(data) < _PREFIX.size:
        raise DecodeError("artifact is shorter than its fixed prefix")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError(f"not a deltaplane artifact (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise DecodeError(f"artifact version {version} is not supported (this reader knows {VERSION})")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(data):
        raise DecodeError(f"header length {hlen} exceeds the file or the {MAX_HEADER}-byte limit")
    header = _strict_json(data[_PREFIX.size : _PREFIX.size + hlen], "header")
    raw_size = header.get("payload_nbytes") if isinstance(header, dict) else None
    manifest = header.get("manifest", {}) if isinstance(header, dict) else None
    if not _is_count(raw_size) or not isinstance(manifest, dict):  # the header is not hashed: checked here
        raise DecodeError(
            "artifact header must be an object with 'payload_nbytes' (a non-negative integer) and "
            "'manifest' (an object)"
        )
    if raw_size > MAX_PAYLOAD:
        raise DecodeError(f"artifact declares a payload of {raw_size} bytes (limit {MAX_PAYLOAD})")
    _check_budget("a payload", raw_size, len(data))  # before inflating: no zstd bomb
    # the wire format's hardened inflate: the frame must declare exactly raw_size bytes before anything is
    # allocated (zstandard's one-shot decompress allocates what a frame declares: a flipped header bit asked
    # for petabytes and raised MemoryError), one frame, no trailing bytes
    payload = zstd_decompress(memoryview(data)[_PREFIX.size + hlen :], raw_size)
    file_nbytes = len(data)
    del data  # the compressed file is not needed once inflated
    if len(payload) != raw_size or hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise DecodeError("artifact payload size or SHA-256 does not match its header")
    if raw_size < 4:
        raise DecodeError("artifact payload is too short for its tensor table")
    (tlen,) = struct.unpack_from("<I", payload)
    if 4 + tlen > raw_size:
        raise DecodeError(f"tensor table length {tlen} exceeds the payload")
    table = _strict_json(payload[4 : 4 + tlen], "tensor table")
    listed = table.get("tensors") if isinstance(table, dict) else None
    if not isinstance(listed, list) or len(listed) > MAX_TENSORS:
        raise DecodeError(
            f"artifact tensor table must be an object listing at most {MAX_TENSORS} tensors under 'tensors'"
        )
    bound = _manifest_bound(manifest, table.get("manifest_sha256"))
    entries = [_entry(e) for e in listed]
    if len({e.name for e in entries}) != len(entries):  # a second entry would silently replace the first
        raise DecodeError("artifact tensor table names a tensor twice")
    # before allocating any tensor: all of them together within the budget (sparse ones decode to full size)
    _check_budget("tensors", sum(e.numel * e.dtype.itemsize for e in entries), file_nbytes)
    buffers = memoryview(payload)[4 + tlen :]  # a view: not a second copy of the whole buffer area

    def view(off: int, ln: int) -> bytes:
        if off + ln > len(buffers):
            raise DecodeError(f"byte range {off}+{ln} lies outside the {len(buffers)}-byte buffer area")
        return bytes(buffers[off : off + ln])

    tensors = {e.name: _decode_tensor(e, [view(*r) for r in e.buffers]) for e in entries}
    graph_range = table.get("graph")
    if graph_range is not None and not (
        isinstance(graph_range, list) and len(graph_range) == 2 and all(_is_count(v) for v in graph_range)
    ):
        raise DecodeError(f"artifact graph must be an [offset, length] pair or null, got {graph_range!r:.80}")
    graph = view(*graph_range) if graph_range is not None else None
    if not bound:  # only for a file that otherwise reads: a broken one is refused without it
        warnings.warn(UNBOUND_MANIFEST, UserWarning, stacklevel=2)
    return Artifact(tensors, manifest, graph)


def pack_onnx(
    model: str | os.PathLike[str] | bytes,
    path: str | os.PathLike[str],
    *,
    quant: str = "none",
    group_size: int | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> ArtifactInfo:
    """Store an ONNX model as an artifact: its initializers become compact tensors, the rest is the graph.

    An int8 ONNX model (from :func:`~deltaplane.deploy.quantize.quantize_onnx`) keeps its int8 weights
    losslessly — pruned zeros stay zeros, so sparse layout pays off; ``quant="int4"`` on a float model stores
    float weights as int4 codes that are dequantized back to float32 initializers on load (weight-only).
    Doc strings are dropped: they are export-time debug text, useless on a device.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto()
    proto.ParseFromString(model if isinstance(model, bytes) else Path(model).read_bytes())
    tensors = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    del proto.graph.initializer[:]
    proto.doc_string = ""
    for node in proto.graph.node:
        node.doc_string = ""
    return write_artifact(
        path, tensors, quant=quant, group_size=group_size, graph=proto.SerializeToString(), manifest=manifest
    )
