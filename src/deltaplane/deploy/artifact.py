"""The device artifact: a model's tensors stored compactly (sparse positions + quantized values + zstd).

Layout (little-endian)::

    magic b"DPLA" | u8 version (1) | u32 header_len | header (UTF-8 JSON) | zstd frame of the payload
    payload = u32 table_len | table (UTF-8 JSON) | buffers

The header (readable without decompressing) holds the payload's raw size and SHA-256 and the manifest (sizes,
sparsity, quant scheme, accuracy, source model hash). The table — inside the compressed payload, because for a
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _declared_nbytes(e: Any) -> int:
    """Bytes the tensor entry ``e`` decodes to, from its shape and dtype alone (nothing is allocated)."""
    try:
        shape = [int(s) for s in e["shape"]]
        itemsize = np.dtype(_NP_DTYPES[e["dtype"]]).itemsize
    except (KeyError, TypeError, ValueError) as err:
        raise DecodeError(f"malformed tensor entry {e!r}: {err}") from err
    if any(s < 0 for s in shape):
        raise DecodeError(f"tensor {e['name']!r}: bad shape {shape}")
    return math.prod(shape) * itemsize


def _check_budget(what: str, nbytes: int, file_nbytes: int) -> None:
    budget = DECODE_LIMITS.decode_budget(file_nbytes)
    if nbytes > budget:
        raise DecodeError(
            f"artifact of {file_nbytes} bytes declares {what} of {nbytes} bytes, beyond its decode budget of "
            f"{budget} (max(64 MiB, 4096 × the file's size), at most {MAX_PAYLOAD}): not a file deploy writes"
        )


def _decode_tensor(e: Mapping[str, Any], bufs: list[bytes]) -> np.ndarray:
    try:
        shape = tuple(int(s) for s in e["shape"])
        dtype = np.dtype(_NP_DTYPES[e["dtype"]])
        n = math.prod(shape)
        sparse = e["layout"] == "sparse"
        if e["layout"] not in ("dense", "sparse") or e["quant"] not in QUANT_SCHEMES:
            raise DecodeError(f"tensor {e['name']!r}: unknown layout/quant {e['layout']!r}/{e['quant']!r}")
        nnz = int(e["nnz"])
    except (KeyError, TypeError, ValueError) as err:
        raise DecodeError(f"malformed tensor entry {e!r}: {err}") from err
    if any(s < 0 for s in shape) or not 0 <= nnz <= n:
        raise DecodeError(f"tensor {e['name']!r}: bad shape {shape} or nnz {nnz}")
    k = nnz if sparse else n
    expected_bufs = (1 if sparse else 0) + (1 if e["quant"] == "none" else 2)
    if len(bufs) != expected_bufs:
        raise DecodeError(f"tensor {e['name']!r}: {len(bufs)} buffers, expected {expected_bufs}")
    idx = decode_indices(e.get("index_coder", ""), bufs[0], n, k) if sparse else None
    vbufs = bufs[1:] if sparse else bufs
    if e["quant"] == "none":
        if len(vbufs[0]) != k * dtype.itemsize:
            raise DecodeError(
                f"tensor {e['name']!r}: {len(vbufs[0])} value bytes, expected {k * dtype.itemsize}"
            )
        values = np.frombuffer(vbufs[0], dtype=dtype, count=k)
    else:
        bits = 8 if e["quant"] == "int8" else 4
        g = int(e.get("group_size", 0))
        if g < 1:
            raise DecodeError(f"tensor {e['name']!r}: bad group_size {g}")
        n_groups = -(-k // g)
        if len(vbufs[1]) != 2 * n_groups:
            raise DecodeError(f"tensor {e['name']!r}: {len(vbufs[1])} scale bytes, expected {2 * n_groups}")
        codes = unpack_bits(vbufs[0], bits, k)
        scales = np.frombuffer(vbufs[1], dtype="<f2", count=n_groups)
        values = _group_dequant(GroupQuant(codes, scales, g, bits)).astype(dtype)
    out = np.zeros(n, dtype=dtype)
    if sparse:
        out[idx] = values
    else:
        out[:] = values
    return out.reshape(shape)


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
        manifest: JSON-serializable facts to embed (sizes, sparsity, accuracy, source hash...).
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
    table = json.dumps({"tensors": entries, "graph": graph_range}, separators=(",", ":")).encode()
    # one join (not a join then a concatenation: two more copies of every tensor's bytes), and the buffers
    # dropped before compressing, when zstd's level-19 context (~80 MiB for MiniLM) is allocated
    payload = b"".join([struct.pack("<I", len(table)), table, *chunks])
    chunks.clear()
    header = {
        "format": "deltaplane-artifact",
        "version": VERSION,
        "payload_nbytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "manifest": dict(manifest or {}),
    }
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    body = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(payload)
    data = _PREFIX.pack(MAGIC, VERSION, len(hbytes)) + hbytes + body
    atomic_write_bytes(path, data)
    return ArtifactInfo(Path(path), len(data), len(payload), entries, zeros / total if total else 0.0)


def read_artifact(path: str | os.PathLike[str] | bytes) -> Artifact:
    """Decode an artifact file (or its bytes); raises :class:`DecodeError` on anything malformed."""

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
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen])
        raw_size = int(header["payload_nbytes"])
        manifest = dict(header.get("manifest", {}))  # the header is not hashed: a JSON object, or refused
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DecodeError(f"artifact header is not valid JSON of the expected shape: {e}") from e
    if not 0 <= raw_size <= MAX_PAYLOAD:
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
    try:
        table = json.loads(payload[4 : 4 + tlen])
        entries = table["tensors"]
    except (ValueError, KeyError, TypeError) as e:
        raise DecodeError(f"artifact tensor table is not valid JSON of the expected shape: {e}") from e
    if not isinstance(entries, list) or len(entries) > MAX_TENSORS:
        raise DecodeError(
            f"artifact declares {len(entries)} tensors (limit {MAX_TENSORS}) or no list of them"
        )
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DecodeError(f"malformed tensor entry {entry!r}")
    if len({e["name"] for e in entries}) != len(entries):  # a second entry would silently replace the first
        raise DecodeError("artifact tensor table names a tensor twice")
    # before allocating any tensor: all of them together within the budget (sparse ones decode to full size)
    _check_budget("tensors", sum(_declared_nbytes(e) for e in entries), file_nbytes)
    buffers = memoryview(payload)[4 + tlen :]  # a view: not a second copy of the whole buffer area

    def view(rng: Any) -> bytes:
        try:
            off, ln = int(rng[0]), int(rng[1])
        except (TypeError, ValueError, IndexError) as e:
            raise DecodeError(f"bad byte range {rng!r}") from e
        if off < 0 or ln < 0 or off + ln > len(buffers):
            raise DecodeError(f"byte range {off}+{ln} lies outside the {len(buffers)}-byte buffer area")
        return bytes(buffers[off : off + ln])

    tensors = {}
    for entry in entries:
        tensors[entry["name"]] = _decode_tensor(entry, [view(r) for r in entry.get("buffers", [])])
    graph = view(table["graph"]) if table.get("graph") is not None else None
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
