"""Lossless coding of one byte field of a compact frame, chosen per field by measured size.

A compact frame (:mod:`deltaplane.codecs.session`) names, for every byte field, the coding its stored bytes
use; coding ``0`` is the field as the codec wrote it (raw). The encoder tries every coding and keeps the
smallest, so a coding is only ever used where it wins. Decoding is strict: the declared length of the field
(already checked against the node's shape by the codec) bounds what is produced, and anything that does not
decode to exactly that many bytes is a :class:`~deltaplane.errors.DecodeError`.
"""

from __future__ import annotations

from deltaplane.errors import DecodeError

__all__ = ["CODINGS", "decode_field", "encode_field"]

#: coding id -> name
CODINGS = {0: "raw"}


def encode_field(data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
    """``(coding, stored bytes)``: the smallest of the codings of :data:`CODINGS` for ``data``."""
    return 0, data


def decode_field(coding: int, stored: memoryview, length: int) -> bytes | memoryview:
    """The ``length`` raw bytes a field stored with ``coding`` holds; a :class:`DecodeError` otherwise."""
    if coding == 0:
        if len(stored) != length:
            raise DecodeError(f"a raw field stores {len(stored)} bytes but declares {length}")
        return stored
    raise DecodeError(
        f"unknown field coding {coding}; known: {', '.join(f'{k} ({v})' for k, v in CODINGS.items())}"
    )
