"""Lazy safetensors checkpoints in, streamed safetensors out — the I/O half of the streaming merge.

:class:`Checkpoint` opens a Hugging Face–layout folder (``model.safetensors`` or a sharded
``model.safetensors.index.json``) or a single ``.safetensors`` file, reading only headers until a tensor — or a
range of its rows (:meth:`Checkpoint.read_rows`) — is asked for. :class:`SafetensorsWriter` writes a safetensors
file one tensor, or one block of rows, at a time.

Why hand-written I/O rather than ``safetensors.safe_open`` / ``save_file``: ``save_file`` needs every tensor in
memory at once, which is what streaming exists to avoid; ``safe_open`` memory-maps the file, and every page a
read touches stays resident (and counts in RSS) while the mapping lives. The format is small (u64 header length,
JSON header with dtype/shape/byte offsets, raw little-endian data), so the header is parsed and checked here with
the same rules ``safetensors`` applies (known dtype, offsets matching the shape, contiguous data covering the
file exactly), and rows are read with ``pread`` into a fresh buffer: only the requested rows are ever resident.
Every file we write is read back by the tests with ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from deltaplane.errors import ConfigError, DecodeError
from deltaplane.shards import INDEX_NAME, WEIGHTS_NAME, folder_weights, read_shard_index
from deltaplane.textfile import MANIFEST_LIMIT, read_bounded_text, require_regular_file

__all__ = [
    "DTYPES",
    "INDEX_NAME",
    "SINGLE_NAME",
    "Checkpoint",
    "SafetensorsWriter",
    "TensorInfo",
    "parse_dtype",
]

MAX_HEADER_BYTES = 100 * 2**20
"""Largest header accepted (the ``safetensors`` library's own limit)."""
SINGLE_NAME = WEIGHTS_NAME  # a one-file checkpoint folder's weights (deltaplane.shards names it)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in DTYPES.items()}
_NAMES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str, where: str = "config") -> torch.dtype:
    """``"float16"`` / ``"bf16"`` / ... → ``torch.dtype`` (the floating types a merge may compute in or write)."""
    key = str(name).lower().removeprefix("torch.")
    if key not in _NAMES:
        raise ConfigError(f"{where}: unknown dtype '{name}'. Use one of {', '.join(sorted(_NAMES))}")
    return _NAMES[key]


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: the file holding it, its shape, dtype and where its data starts."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0
    """Absolute byte offset of the tensor's first byte in ``file``."""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


class Checkpoint(Mapping[str, Tensor]):
    """A model on disk, opened lazily: a mapping ``name -> tensor`` that reads a tensor only when indexed.

    Args:
        path: a folder holding ``model.safetensors`` or ``model.safetensors.index.json`` + shards (Hugging Face
            layout; chosen by :func:`deltaplane.shards.folder_weights`, as every command chooses), else a folder
            holding exactly one ``*.safetensors`` file, or a ``.safetensors`` file.
        what: what the file is, for error messages (``"model"``; ``"fisher file"`` for a tensor-valued parameter).

    Raises:
        ConfigError: the path does not exist or holds no safetensors weights (nothing is downloaded).
        AmbiguousCheckpoint: the folder holds both ``model.safetensors`` and an index not naming it.
        DecodeError: a file or the index is malformed; the message names the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, what: str = "model") -> None:
        self.path = Path(path)
        self.what = what
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self.infos: dict[str, TensorInfo] = {}
        for file in self._files():
            for name, info in _read_header(file).items():
                if name in self.infos:
                    raise DecodeError(f"{self.path}: tensor '{name}' appears in two shards")
                self.infos[name] = info

    def _files(self) -> list[Path]:
        p = self.path
        if not p.exists():
            raise ConfigError(
                f"{self.what} '{p}' not found (deltaplane merges local files; it never downloads from a hub)"
            )
        if p.is_file():
            if p.suffix in _PICKLE_SUFFIXES:
                raise ConfigError(_convert_hint(p, [p]))
            if p.suffix != ".safetensors":
                raise ConfigError(f"{self.what} '{p}' is not a .safetensors file")
            return [p]
        if not p.is_dir():  # a FIFO, device or socket: refused by name, not "Not a directory" from a glob
            require_regular_file(p, what=self.what)
        # the chooser deploy, registry register and the codecs commands use: a folder holding both
        # model.safetensors and an index (not naming it) is refused, not read from one of them as they are not
        weights = folder_weights(p)
        if weights is not None and weights.name == INDEX_NAME:  # checked as deploy checks it
            assigned = read_shard_index(p)
            self._weight_map = {name: shard for shard, names in assigned.items() for name in names}
            return sorted(assigned)
        if weights is not None:
            return [weights]
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if not found:
            pickles = sorted(f for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise ConfigError(_convert_hint(p, pickles))
        what = f"{len(found)} .safetensors files but no {INDEX_NAME}" if found else "no .safetensors weights"
        raise ConfigError(f"{self.what} folder '{p}' holds {what}")

    def __getitem__(self, name: str) -> Tensor:
        info = self.infos[name]
        return self.read_rows(name, 0, info.shape[0] if info.shape else 1)

    def read_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` along its first dimension, read from disk into a new tensor.

        Only those rows' bytes are read (``pread``; no memory map), so a merge that walks a large tensor in row
        chunks holds one chunk per input. A 0-d tensor has one "row": ``read_rows(name, 0, 1)`` returns it.

        Raises:
            KeyError: no tensor ``name``.
            DecodeError: the file is shorter than its header promised (truncated after it was opened).
        """
        info = self.infos[name]
        if info.shape:
            rows, row_shape = info.shape[0], info.shape[1:]
            out_shape: tuple[int, ...] = (stop - start, *row_shape)
        else:
            rows, row_shape, out_shape = 1, (), ()
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"tensor '{name}': rows [{start}, {stop}) outside its {rows} rows")
        row_bytes = info.itemsize
        for s in row_shape:
            row_bytes *= s
        nbytes = (stop - start) * row_bytes
        if nbytes == 0:
            return torch.empty(out_shape, dtype=info.dtype)
        return (
            _pread(info.file, info.offset + start * row_bytes, nbytes, name)
            .view(info.dtype)
            .reshape(out_shape)
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can treat a checkpoint as a resource."""

    def check_index(self) -> None:
        """Raise :class:`DecodeError` if a sharded index maps a tensor to a shard that does not hold it."""
        for name, file in getattr(self, "_weight_map", {}).items():
            info = self.infos.get(name)
            if info is None or info.file != file:
                raise DecodeError(
                    f"{self.folder / INDEX_NAME}: tensor '{name}' is not in shard '{file.name}'"
                )

    def __repr__(self) -> str:
        return f"Checkpoint('{self.path}', {len(self)} tensors)"


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _hf_class(folder: Path) -> str:
    """The ``transformers`` class that saved ``folder`` (``config.json``'s first ``architectures`` entry), else
    ``AutoModel`` — which would drop a task head, so it is only the fallback."""
    try:
        conf = json.loads(
            read_bounded_text(folder / "config.json", limit=MANIFEST_LIMIT, what="model config")
        )
        name = conf["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError, ConfigError, DecodeError):
        return "AutoModel"
    return name if isinstance(name, str) and name.isidentifier() else "AutoModel"


def _convert_hint(where: Path, files: list[Path]) -> str:
    """How to turn PyTorch pickle checkpoints (which we do not unpickle: loading runs code) into safetensors.

    One weights file (a ``torch.save``'d state dict, or a folder's single ``pytorch_model.bin``) is converted by
    ``torch.load`` + ``save_file`` into the file the merge then reads (beside a loose file, ``model.safetensors``
    in a folder); a Hugging Face folder of several shards by the ``transformers`` class that saved it. The hint
    used to load ``AutoModel`` from the folder above a loose ``.pt`` file, which is no model at all, and which
    drops a classifier's head even for a real Hugging Face folder."""
    head = (
        f"model '{where}' holds PyTorch pickle weights ({', '.join(f.name for f in files[:3])}), not safetensors; "
        "deltaplane reads only safetensors (unpickling can run code). Convert once, from a source you trust: "
    )
    weights = [f for f in files if f.name.startswith("pytorch_model")] if where.is_dir() else files
    if len(weights) == 1 or (where.is_dir() and len(files) == 1):
        src = weights[0] if len(weights) == 1 else files[0]
        dst = where / SINGLE_NAME if where.is_dir() else src.with_suffix(".safetensors")
        then = "" if where.is_dir() else f", then name '{dst.name}' in the config"
        return head + (
            'python -c "import torch; from safetensors.torch import save_file; '
            f"sd = torch.load({str(src)!r}, weights_only=True); "
            f'save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, {str(dst)!r})"{then}'
        )
    folder = where if where.is_dir() else where.parent
    cls = _hf_class(folder)
    return head + (
        f'python -c "from transformers import {cls}; {cls}.from_pretrained({str(folder)!r})'
        f'.save_pretrained({str(folder) + "-safetensors"!r})" (for a Hugging Face folder; or torch.load each '
        "state dict + safetensors.torch.save_file)"
    )


def _pread(file: Path, offset: int, nbytes: int, name: str) -> Tensor:
    """``nbytes`` bytes of ``file`` from ``offset`` as a uint8 tensor that owns its (fresh) buffer."""
    out = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled, unlike a bytearray: the read fills it
    view = out.numpy().data  # the array's memoryview
    got = 0
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError as exc:
        raise DecodeError(f"{file}: cannot read tensor '{name}' ({exc})") from exc
    try:
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise DecodeError(
                    f"{file}: tensor '{name}': the file ends after {got} of the {nbytes} bytes at offset "
                    f"{offset} (truncated since its header was read?)"
                )
            got += n
    finally:
        os.close(fd)
    return out


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor infos from a safetensors header, checked as strictly as the ``safetensors`` library does.

    Raises:
        DecodeError: naming the file (and the tensor, when one entry is at fault): short file, oversized or
            non-JSON header, unknown dtype, bad shape or offsets, data that overlaps, leaves gaps, runs past the
            end of the file (truncated download) or stops short of it.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DecodeError(
                    f"{file}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise DecodeError(
                    f"{file}: header length {n} does not fit the file ({size} bytes): truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as exc:
        raise DecodeError(f"{file}: not a readable safetensors file ({exc})") from exc
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"{file}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise DecodeError(f"{file}: header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise DecodeError(f"{file}: __metadata__ must map strings to strings")
            continue
        where = f"{file}: tensor '{name}'"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise DecodeError(f"{where}: header entry needs dtype, shape and data_offsets")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in DTYPES:
            raise DecodeError(f"{where} has unsupported dtype {code!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise DecodeError(f"{where}: shape must be a list of non-negative integers. Found {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise DecodeError(
                f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end. Found {offsets!r}"
            )
        info = TensorInfo(file, tuple(shape), DTYPES[code], data_start + offsets[0])
        if offsets[1] - offsets[0] != info.nbytes:
            raise DecodeError(
                f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but shape {tuple(shape)} {code} "
                f"needs {info.nbytes}"
            )
        if offsets[1] > data_len:
            raise DecodeError(
                f"{where}: data ends at byte {offsets[1]} but the file holds {data_len} bytes of data "
                "(truncated file?)"
            )
        out[name] = info
        spans.append((offsets[0], offsets[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise DecodeError(
                f"{file}: tensor '{name}' starts at data byte {begin}, expected {pos} (overlapping or gapped data)"
            )
        pos = end
    if pos != data_len:
        raise DecodeError(f"{file}: {data_len - pos} bytes after the last tensor's data (corrupt file?)")
    return out


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor (or row block by row block), in the order declared up front.

    The header must be known before the data, so the caller declares every ``(name, shape, dtype)`` first; each
    :meth:`write` must then deliver the next tensor — whole, or its next rows along dimension 0 — exactly as
    declared (checked), and :meth:`close` checks that everything was written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
            raise DecodeError("the streaming safetensors writer needs a little-endian machine")
        self.path = Path(path)
        self._entries = list(entries)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, shape, dtype in self._entries:
            n = 1
            for s in shape:
                n *= s
            size = n * torch.empty(0, dtype=dtype).element_size()
            header[name] = {
                "dtype": _CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.total_bytes = offset
        self._f: BinaryIO = open(self.path, "wb")  # noqa: SIM115 — closed in close()
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0
        self._written = 0  # bytes of entry ``_next`` written so far (rows arrive in blocks)

    def write(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor`` — the whole of the next declared tensor, or its next block of rows."""
        if self._next >= len(self._entries):
            raise DecodeError(f"{self.path}: tensor '{name}' was not declared")
        want_name, shape, dtype = self._entries[self._next]
        size = TensorInfo(self.path, tuple(shape), dtype).nbytes
        got = tuple(tensor.shape)
        fits = got == tuple(shape) or (
            len(shape) >= 1 and len(got) == len(shape) and got[1:] == tuple(shape[1:])
        )
        nbytes = tensor.numel() * tensor.element_size()
        if name != want_name or not fits or tensor.dtype != dtype or self._written + nbytes > size:
            raise DecodeError(
                f"{self.path}: expected tensor '{want_name}' {tuple(shape)} {dtype} "
                f"({self._written} of {size} bytes written), got '{name}' {got} {tensor.dtype}"
            )
        if nbytes:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._f.write(data.data)  # the array's memoryview
        self._written += nbytes
        if self._written == size:
            self._next += 1
            self._written = 0

    def close(self) -> None:
        try:
            if self._next != len(self._entries):
                raise DecodeError(
                    f"{self.path}: {len(self._entries) - self._next} declared tensors were never written "
                    f"(or only in part: '{self._entries[self._next][0]}' has {self._written} bytes)"
                )
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._f.close()
