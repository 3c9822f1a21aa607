"""Lazy safetensors checkpoints in, streamed safetensors out — the I/O half of the streaming merge.

:class:`Checkpoint` opens a Hugging Face–layout folder (``model.safetensors`` or a sharded
``model.safetensors.index.json``) or a single ``.safetensors`` file, reading only headers until a tensor is asked
for. :class:`SafetensorsWriter` writes a safetensors file one tensor at a time.

Why a hand-written writer: ``safetensors.torch.save_file`` needs every tensor in memory at once, which is what
streaming exists to avoid. The format is small (u64 header length, JSON header with dtype/shape/byte offsets,
raw little-endian data) and every file we write is read back by the tests with ``safetensors.safe_open``.
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

__all__ = [
    "DTYPES",
    "INDEX_NAME",
    "SINGLE_NAME",
    "Checkpoint",
    "SafetensorsWriter",
    "TensorInfo",
    "parse_dtype",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

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
    """What the header says about one tensor: the file holding it, its shape and dtype."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty(0, dtype=self.dtype).element_size()


class Checkpoint(Mapping[str, Tensor]):
    """A model on disk, opened lazily: a mapping ``name -> tensor`` that reads a tensor only when indexed.

    Args:
        path: a folder holding ``model.safetensors`` or ``model.safetensors.index.json`` + shards (Hugging Face
            layout), a folder holding exactly one ``*.safetensors`` file, or a ``.safetensors`` file.

    Raises:
        ConfigError: the path does not exist or holds no safetensors weights (nothing is downloaded).
        DecodeError: a file or the index is malformed; the message names the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
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
                f"model '{p}' not found (deltaplane merges local files; it never downloads from a hub)"
            )
        if p.is_file():
            if p.suffix != ".safetensors":
                raise ConfigError(f"model '{p}' is not a .safetensors file")
            return [p]
        index = p / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as exc:
                raise DecodeError(f"{index}: not a valid safetensors index ({exc})") from exc
            shards = sorted({p / str(f) for f in weight_map.values()})
            for shard in shards:
                if not shard.exists():
                    raise DecodeError(f"{index}: shard '{shard.name}' is listed but missing")
            self._weight_map = {str(k): p / str(v) for k, v in weight_map.items()}
            return shards
        if (p / SINGLE_NAME).exists():
            return [p / SINGLE_NAME]
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found
        what = f"{len(found)} .safetensors files but no {INDEX_NAME}" if found else "no .safetensors weights"
        raise ConfigError(f"model folder '{p}' holds {what}")

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        info = self.infos[name]
        # A fresh handle per tensor, closed right after: safe_open memory-maps the file and the pages a read
        # touches stay resident (and count in RSS) for as long as the mapping lives. Re-parsing the header is
        # cheap next to the tensor data; keeping one handle open made RSS grow to the size of the model.
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

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


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor infos from a safetensors header; the header is parsed by ``safetensors`` itself (strict)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 — safe_open is not a dict
                sl = f.get_slice(name)
                code = sl.get_dtype()
                if code not in DTYPES:
                    raise DecodeError(f"{file}: tensor '{name}' has unsupported dtype {code}")
                out[name] = TensorInfo(file, tuple(sl.get_shape()), DTYPES[code])
            return out
    except (SafetensorError, OSError) as exc:
        raise DecodeError(f"{file}: not a readable safetensors file ({exc})") from exc


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in the order declared up front.

    The header must be known before the data, so the caller declares every ``(name, shape, dtype)`` first; each
    :meth:`write` must then deliver the next tensor exactly as declared (checked), and :meth:`close` checks that
    all were written.
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

    def write(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self._entries):
            raise DecodeError(f"{self.path}: tensor '{name}' was not declared")
        want_name, shape, dtype = self._entries[self._next]
        if name != want_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise DecodeError(
                f"{self.path}: expected tensor '{want_name}' {tuple(shape)} {dtype}, got '{name}' "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        try:
            if self._next != len(self._entries):
                raise DecodeError(
                    f"{self.path}: {len(self._entries) - self._next} declared tensors were never written"
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
