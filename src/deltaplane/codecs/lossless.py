"""The optional lossless final stage: zstd over the whole payload (the ``zstandard`` package, extra ``codecs``).

``"topk(0.01) | quant(bits=4) | zstd(level=3)"`` encodes every tensor with the lossy stages, then the wire
format compresses the concatenated payload buffers as one zstd frame (flag bit 1, see
:mod:`deltaplane.codecs.wire`). One frame over all buffers compresses better than one per field, and keeps the
decoder's bound simple: the header states exactly how many bytes the frame must inflate to, and that number
is checked against :class:`~deltaplane.codecs.wire.Limits` before any memory is allocated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deltaplane.codecs.base import Codec, Encoded, register_codec
from deltaplane.errors import CodecError, DecodeError

__all__ = ["Zstd", "zstd_compress", "zstd_decompress"]


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise CodecError(
            "the zstd stage needs the 'zstandard' package: pip install 'deltaplane[codecs]'"
        ) from None
    return zstandard


def zstd_compress(data: bytes, level: int) -> bytes:
    """One zstd frame holding ``data``, with its content size in the frame header."""
    z = _zstandard()
    return z.ZstdCompressor(level=level, write_content_size=True).compress(data)


def zstd_decompress(frame: bytes | memoryview, size: int) -> bytes:
    """Inflate one zstd frame that must hold exactly ``size`` bytes; anything else is a :class:`DecodeError`.

    The frame header's content size must equal ``size`` (which the caller has already bounded), so at most
    ``size`` bytes are ever allocated: a decompression bomb is refused before it inflates. Trailing bytes
    after the frame, a second frame, a truncated frame or corrupt data are all refused.
    """
    z = _zstandard()
    try:
        declared = z.frame_content_size(frame)
    except z.ZstdError as exc:
        raise DecodeError(f"zstd frame header is invalid ({exc})") from None
    if declared != size:
        raise DecodeError(f"zstd frame declares {declared} bytes, the header expects {size}")
    obj = z.ZstdDecompressor(max_window_size=1 << 27).decompressobj()
    try:
        out = obj.decompress(frame)
    except z.ZstdError as exc:
        raise DecodeError(f"zstd frame is corrupt ({exc})") from None
    if not obj.eof:
        raise DecodeError("zstd frame is truncated")
    if obj.unused_data:
        raise DecodeError(f"{len(obj.unused_data)} bytes follow the zstd frame")
    if len(out) != size:
        raise DecodeError(f"zstd frame inflated to {len(out)} bytes, expected {size}")
    return out


@register_codec
class Zstd(Codec):
    """Lossless zstd (levels 1..22) over the whole framed payload; only valid as a pipeline's last stage.

    It has no per-tensor encoding: ``codec.encode(x)`` of a pipeline ending in ``zstd`` runs the lossy stages
    only, and :class:`~deltaplane.codecs.compressor.Compressor` applies zstd when it frames the payload.
    """

    name = "zstd"
    positional = ("level",)
    lossless = True

    def __init__(self, *, level: int = 3) -> None:
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 22:
            raise CodecError(f"zstd: level must be an integer in 1..22. Found {level!r}")
        self.level = level

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        raise CodecError(
            "zstd compresses whole payloads: use it as the last stage of a Compressor's codec, "
            "e.g. 'quant(bits=8) | zstd(level=3)'"
        )

    def decode(self, e: Encoded) -> Tensor:
        raise DecodeError("zstd never names a tensor node; the payload's flags say when it was applied")
