"""One base, many adapters: a device artifact holding one quantized base model and N compressed LoRA adapters.

A personalized fleet ships the shared layers once and a small adapter per user or task; the device picks the
adapter at load time. Storing N full models costs ``N × model``; a bundle costs ``model + N × adapter``.

Layout (little-endian)::

    magic b"DPLB" | u8 version (1) | u32 header_len | header (UTF-8 JSON) | blobs

The header lists the blobs — ``base`` (a deltaplane device artifact, :mod:`deltaplane.deploy.artifact`, int8 by
default) and one adapter payload per name (:func:`deltaplane.adapters.wire.compress_adapter`, any codec) — each
as ``[offset, length, sha256]`` relative to the start of the blobs, plus the base model id and a manifest.
:meth:`AdapterBundle.adapter` reads and checks only the bytes of the adapter asked for, so switching adapters
costs one small read and a decode, never the base again.

Reading is strict: magic, version, header bounds, every byte range and every SHA-256 are checked, and anything
malformed raises :class:`~deltaplane.errors.DecodeError`. Writing is atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from deltaplane.adapters.lora import LoRADelta
from deltaplane.adapters.wire import compress_adapter, decompress_adapter
from deltaplane.delta import StateDict, atomic_write_bytes
from deltaplane.errors import ConfigError, DecodeError

__all__ = ["AdapterBundle", "BundleInfo", "write_bundle"]

MAGIC = b"DPLB"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")
MAX_HEADER = 16 << 20
MAX_ADAPTERS = 100_000
DEFAULT_CODEC = "quant(bits=8, chunk=128) | zstd(level=3)"


@dataclass(frozen=True)
class BundleInfo:
    """What :func:`write_bundle` wrote: the file size and the bytes of the base and of each adapter."""

    path: Path
    nbytes: int
    base_nbytes: int
    adapter_nbytes: dict[str, int]


def write_bundle(
    path: str | os.PathLike[str],
    base: StateDict,
    adapters: Mapping[str, LoRADelta],
    *,
    base_quant: str = "int8",
    codec: str = DEFAULT_CODEC,
    base_id: str = "",
    manifest: Mapping[str, Any] | None = None,
    level: int = 19,
) -> BundleInfo:
    """Pack ``base`` (quantized with ``base_quant``) and ``adapters`` (each compressed with ``codec``) into one file.

    Every adapter is checked against ``base`` first (:class:`~deltaplane.errors.AdapterMismatch` names the layer),
    so a bundle never holds an adapter its base cannot take.

    Raises:
        ConfigError: no adapters, or a name that is not a non-empty string.
        AdapterMismatch: an adapter targets a tensor the base lacks or has another shape.
    """
    from deltaplane.deploy.artifact import write_artifact

    if not adapters:
        raise ConfigError("a bundle needs at least one adapter")
    if len(adapters) > MAX_ADAPTERS:
        raise ConfigError(f"too many adapters ({len(adapters)} > {MAX_ADAPTERS})")
    for name, lora in adapters.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"adapter names must be non-empty strings. Found {name!r}")
        lora.check_base(base)
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "base.dpla"
        write_artifact(art, base, quant=base_quant, level=level, manifest={"base_id": base_id})
        base_bytes = art.read_bytes()
    blobs = [("base", base_bytes)] + [
        (name, compress_adapter(lora, codec, base_id=base_id)) for name, lora in adapters.items()
    ]
    table: dict[str, Any] = {"base": None, "adapters": {}}
    offset = 0
    for name, blob in blobs:
        entry = [offset, len(blob), hashlib.sha256(blob).hexdigest()]
        if name == "base" and table["base"] is None:
            table["base"] = entry
        else:
            table["adapters"][name] = entry
        offset += len(blob)
    header = {
        "format": "deltaplane-bundle",
        "version": VERSION,
        "base_id": base_id,
        "codec": codec,
        "base_quant": base_quant,
        "blobs": table,
        "manifest": dict(manifest or {}),
    }
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    data = _PREFIX.pack(MAGIC, VERSION, len(hbytes)) + hbytes + b"".join(b for _, b in blobs)
    atomic_write_bytes(path, data)
    return BundleInfo(Path(path), len(data), len(base_bytes), {n: len(b) for n, b in blobs[1:]})


def _entry(value: Any, where: str) -> tuple[int, int, str]:
    if not (
        isinstance(value, list)
        and len(value) == 3
        and all(type(v) is int and v >= 0 for v in value[:2])
        and isinstance(value[2], str)
        and len(value[2]) == 64
    ):
        raise DecodeError(f"bundle header: {where} must be [offset, length, sha256]. Found {value!r}")
    return value[0], value[1], value[2]


class AdapterBundle:
    """An opened bundle: the base decoded once on demand, any adapter read by itself when asked for.

    Example:
        >>> import torch, tempfile, os
        >>> from deltaplane.adapters import LoRADelta, LoRALayer
        >>> from deltaplane.adapters.bundle import AdapterBundle, write_bundle
        >>> base = {"fc.weight": torch.randn(8, 16)}
        >>> users = {f"user{i}": LoRADelta({"fc.weight": LoRALayer(torch.randn(2, 16), torch.randn(8, 2), 2.0)})
        ...          for i in range(3)}
        >>> path = os.path.join(tempfile.mkdtemp(), "fleet.dplb")
        >>> info = write_bundle(path, base, users, level=3)
        >>> bundle = AdapterBundle(path)
        >>> bundle.names
        ['user0', 'user1', 'user2']
        >>> bundle.model_state("user1")["fc.weight"].shape
        torch.Size([8, 16])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise DecodeError(f"{self.path}: shorter than a bundle's fixed prefix")
            magic, version, hlen = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise DecodeError(f"{self.path}: not an adapter bundle (magic {magic!r}, expected {MAGIC!r})")
            if version != VERSION:
                raise DecodeError(
                    f"{self.path}: bundle version {version} is not supported (this reader knows {VERSION})"
                )
            if hlen > MAX_HEADER or _PREFIX.size + hlen > size:
                raise DecodeError(
                    f"{self.path}: header length {hlen} exceeds the file or the {MAX_HEADER}-byte limit"
                )
            try:
                header = json.loads(f.read(hlen))
                blobs = header["blobs"]
                adapters = blobs["adapters"]
                if not isinstance(adapters, dict) or len(adapters) > MAX_ADAPTERS:
                    raise TypeError("adapters must be an object of at most the adapter limit")
                if not isinstance(header.get("manifest", {}), dict):
                    raise TypeError("manifest must be an object")
                if not isinstance(header.get("base_id", ""), str):
                    raise TypeError("base_id must be a string")
            except (ValueError, KeyError, TypeError) as exc:
                raise DecodeError(
                    f"{self.path}: bundle header is not valid JSON of the expected shape: {exc}"
                ) from None
        self._start = _PREFIX.size + hlen
        room = size - self._start
        self._base = _entry(blobs["base"], "base")
        self._adapters = {str(k): _entry(v, f"adapter '{k}'") for k, v in adapters.items()}
        for where, (off, ln, _) in [("base", self._base), *self._adapters.items()]:
            if off + ln > room:
                raise DecodeError(f"{self.path}: {where} lies outside the file ({off}+{ln} > {room} bytes)")
        self.base_id = str(header.get("base_id", ""))
        self.manifest = dict(header.get("manifest", {}))
        self._base_state: dict[str, Tensor] | None = None

    @property
    def names(self) -> list[str]:
        """The adapters held, in the order they were written."""
        return list(self._adapters)

    def _read(self, entry: tuple[int, int, str], where: str) -> bytes:
        off, ln, sha = entry
        with open(self.path, "rb") as f:
            f.seek(self._start + off)
            blob = f.read(ln)
        if len(blob) != ln or hashlib.sha256(blob).hexdigest() != sha:
            raise DecodeError(f"{self.path}: {where} does not match its SHA-256 (corrupted or truncated)")
        return blob

    def base_state(self) -> dict[str, Tensor]:
        """The shared base model, dequantized (decoded once, then cached)."""
        if self._base_state is None:
            from deltaplane.deploy.artifact import read_artifact

            self._base_state = read_artifact(self._read(self._base, "base")).state_dict()
        return self._base_state

    def adapter(self, name: str) -> LoRADelta:
        """Adapter ``name``, read and decoded by itself."""
        if name not in self._adapters:
            from deltaplane.errors import NotFound

            raise NotFound(f"no adapter '{name}' in {self.path}; it holds {self.names[:10]}")
        return decompress_adapter(
            self._read(self._adapters[name], f"adapter '{name}'"), expect_base=(self.base_id, 0)
        )

    def model_state(self, name: str) -> dict[str, Tensor]:
        """The base with adapter ``name`` merged in: what the device loads into its model."""
        return self.adapter(name).merged_into(self.base_state())

    def __repr__(self) -> str:
        return f"AdapterBundle('{self.path}', {len(self._adapters)} adapters)"
