"""Lossless entropy coding of one byte field of a compact frame, chosen per field by measured size.

A compact frame (:mod:`deltaplane.codecs.session`) names, for every byte field, the coding its stored bytes
use. Coding ``0`` is the field as the codec wrote it (raw). Codings ``1``–``4`` read the field as a sequence
of ``w``-bit symbols, ``w = 1, 2, 4, 8`` (packed least-significant first within each byte, as
:func:`~deltaplane.codecs.entropy.pack_bits` packs 1-, 2-, 4- and 8-bit quantization codes), and code them
with rANS (Duda 2013, https://arxiv.org/abs/1311.2540; the ``constriction`` package's stack coder) under a
static order-0 model sent with the field. So 4-bit codes of top-k values, which cluster near the middle
of the grid, or the unary quotients of a Golomb index stream, cost their empirical entropy instead of their
width. The encoder sizes every symbol width from its histogram, codes the most promising one and keeps it
only if the result is smaller than the raw field (:func:`encode_field`): a coding is used only where it
measurably wins, so it never costs more than a few bytes of skeleton per field.

Stored bytes of a coded field (all integers little-endian)::

    presence bitmap of the 2**w symbols (ceil(2**w / 8) bytes) | varint frequency of each present symbol
    (they sum to exactly 2**12) | the rANS words (u32 each)

Decoding is strict and bounded: the field's declared length (checked by the frame's reader against the most
its node allows, :meth:`~deltaplane.codecs.base.Codec.max_field_bytes`, before any field is decoded) fixes
the symbol count and what is allocated; the model must be well formed; the rANS stream must decode exactly
that many symbols and end exactly (nothing left over). A decoder that stops moving is not run on (see
:func:`_expand`): an empty stream's zeros cost no decoding however many are declared. Any failure is a
:class:`~deltaplane.errors.DecodeError`. Without ``constriction`` installed (extra ``codecs``) the encoder
keeps every field raw and a coded field cannot be decoded (``CodecError`` telling what to install).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deltaplane.errors import CodecError, DecodeError

__all__ = ["CODINGS", "decode_field", "encode_field", "encode_fields", "field_sizes"]

#: coding id -> name (``ans<w>``: rANS over ``w``-bit symbols)
CODINGS = {0: "raw", 1: "ans1", 2: "ans2", 3: "ans4", 4: "ans8"}
_WIDTH = {1: 1, 2: 2, 3: 4, 4: 8}
#: model precision: symbol frequencies sum to 2**_PRECISION
_PRECISION = 12
#: fields shorter than this stay raw: a model costs a few bytes and rANS at least one 4-byte word
_MIN_BYTES = 16
#: symbols unpacked at once while coding (bounds the scratch memory whatever the field's size)
_BLOCK = 1 << 20


def _constriction() -> Any:
    try:
        import constriction
    except ImportError:  # pragma: no cover - depends on the installed extras
        return None
    return constriction


def _symbols(data: np.ndarray, w: int) -> np.ndarray:
    """The ``w``-bit symbols of bytes ``data``, least-significant first within each byte."""
    if w == 8:
        return data
    if w == 1:
        return np.unpackbits(data, bitorder="little")
    per = 8 // w
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(w)
    return ((data[:, None] >> shifts) & np.uint8((1 << w) - 1)).reshape(-1)


def _pack(symbols: np.ndarray, w: int) -> bytes:
    if w == 8:
        return symbols.astype(np.uint8).tobytes()
    if w == 1:
        return np.packbits(symbols.astype(np.uint8), bitorder="little").tobytes()
    s = symbols.astype(np.uint8).reshape(-1, 8 // w)
    # a column at a time: numpy's reduce over a row of 2 or 4 is several times slower than these strided ORs,
    # and was a third of decoding a field of 2- or 4-bit symbols
    out = s[:, 0].copy()
    for j in range(1, 8 // w):
        out |= s[:, j] << np.uint8(j * w)
    return out.tobytes()


def _frequencies(counts: np.ndarray) -> np.ndarray:
    """Counts scaled to integers summing to ``2**_PRECISION``, every present symbol at least 1."""
    total = 1 << _PRECISION
    present = counts > 0
    f = np.zeros(len(counts), np.int64)
    f[present] = np.maximum(1, np.round(counts[present] * total / counts.sum())).astype(np.int64)
    f[int(np.argmax(f))] += total - int(f.sum())  # the largest absorbs the rounding
    if f[int(np.argmax(f))] < 1:  # pragma: no cover - only with more symbols than 2**_PRECISION
        raise CodecError("field coding: too many distinct symbols for the model precision")
    return f


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _model(freq: np.ndarray) -> Any:
    c = _constriction()
    return c.stream.model.Categorical(freq.astype(np.float64) / (1 << _PRECISION), perfect=False)


def _byte_histogram(raw: np.ndarray) -> np.ndarray:
    """Counts of each byte value, a block at a time (``bincount`` widens its input to 8 bytes a value)."""
    counts = np.zeros(256, np.int64)
    for lo in range(0, len(raw), _BLOCK):
        counts += np.bincount(raw[lo : lo + _BLOCK], minlength=256)
    return counts


def _symbol_matrix(w: int) -> np.ndarray:
    """``(256, 2**w)``: how many ``w``-bit symbols of each value byte ``b`` holds (``8 / w`` in all)."""
    m = _SYMBOL_MATRICES.get(w)
    if m is None:
        values = np.arange(256)
        m = np.zeros((256, 1 << w), np.float64)
        for j in range(8 // w):
            np.add.at(m, (values, (values >> (j * w)) & ((1 << w) - 1)), 1.0)
        _SYMBOL_MATRICES[w] = m
    return m


_SYMBOL_MATRICES: dict[int, np.ndarray] = {}


def _symbol_histogram(byte_counts: np.ndarray, w: int) -> np.ndarray:
    """Counts of the ``w``-bit symbols, from the byte histogram alone (each byte holds ``8 / w`` of them);
    ``byte_counts`` may be ``(fields, 256)``, one histogram a row. One float64 matrix product, exact: every
    product and partial sum is an integer below 2**53 (at most 8 symbols a byte, far fewer than 2**49 bytes)."""
    if w == 8:
        return byte_counts
    return np.rint(byte_counts.astype(np.float64) @ _symbol_matrix(w)).astype(np.int64)


def field_sizes(data: bytes | memoryview) -> dict[int, float]:
    """Estimated stored bytes of ``data`` under each ANS coding (model + empirical entropy), and raw."""
    raw = np.frombuffer(data, np.uint8)
    out: dict[int, float] = {0: float(len(raw))}
    byte_counts = _byte_histogram(raw)
    for coding, w in _WIDTH.items():
        counts = _symbol_histogram(byte_counts, w).astype(np.float64)
        present = counts[counts > 0]
        bits = float(-(present * np.log2(present / present.sum())).sum())
        table = ((1 << w) + 7) // 8 + 2 * len(present)
        out[coding] = table + 4 * (bits / 32 + 1)
    return out


def encode_field(data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
    """``(coding, stored bytes)``: ``data`` rANS-coded at the most promising symbol width if that is smaller
    than ``data`` itself, else ``(0, data)``."""
    if len(data) < _MIN_BYTES or _constriction() is None:
        return 0, data
    sizes = field_sizes(data)
    return _encode_as(data, min(sizes, key=lambda c: (sizes[c], c)))


def _encode_as(data: bytes | memoryview, coding: int) -> tuple[int, bytes | memoryview]:
    """:func:`encode_field` once its coding is chosen: rANS at that width if smaller than ``data``."""
    if coding == 0:
        return 0, data
    w = _WIDTH[coding]
    raw = np.frombuffer(data, np.uint8)
    freq = _frequencies(_symbol_histogram(_byte_histogram(raw), w))
    head = bytearray(np.packbits(freq > 0, bitorder="little").tobytes())
    for f in freq[freq > 0]:
        _put_varint(head, int(f))
    model = _model(freq)
    coder = _constriction().stream.stack.AnsCoder()
    # a stack coder decodes last-in first-out: blocks go in from the end, so they come out from the start,
    # and no more than a block of symbols is ever unpacked at once
    step = _BLOCK * w // 8
    for lo in reversed(range(0, len(raw), step)):
        coder.encode_reverse(_symbols(raw[lo : lo + step], w).astype(np.int32), model)
    stored = bytes(head) + coder.get_compressed().astype("<u4").tobytes()
    return (coding, stored) if len(stored) < len(data) else (0, data)


#: estimated sizes closer than this (relative) are compared again by :func:`field_sizes` itself: the
#: vectorised estimate sums its terms in another order than ``field_sizes``, ~1e-14 apart at most
_CLOSE = 1e-9


def encode_fields(datas: list[bytes | memoryview]) -> list[tuple[int, bytes | memoryview]]:
    """``[encode_field(d) for d in datas]``, byte for byte, the codings chosen for all fields at once.

    Many small fields (a round's devices framing the same layout) cost :func:`field_sizes`' few dozen numpy
    calls each; here one byte histogram covers a block of fields and each symbol width's counts and entropy
    estimate are one matrix operation. The estimate sums in another order than :func:`field_sizes`, so a field
    whose two best estimates lie within a relative ``1e-9`` is sized by :func:`field_sizes` itself: the
    chosen coding, hence the bytes, are always :func:`encode_field`'s.
    """
    out: list[tuple[int, bytes | memoryview]] = [(0, d) for d in datas]
    if _constriction() is None:
        return out
    blocks: list[list[int]] = [[]]  # fields of at most _BLOCK bytes in all (or one longer field) each
    total = 0
    for i, d in enumerate(datas):
        if len(d) < _MIN_BYTES:
            continue
        if blocks[-1] and total + len(d) > _BLOCK:
            blocks.append([])
            total = 0
        blocks[-1].append(i)
        total += len(d)
    for block in blocks:
        if len(block) == 1:  # one field: field_sizes' fewer numpy calls
            out[block[0]] = encode_field(datas[block[0]])
        elif block:
            for i, coding in zip(block, _choose([datas[i] for i in block]), strict=True):
                out[i] = _encode_as(datas[i], coding)
    return out


def _choose(datas: list[bytes | memoryview]) -> list[int]:
    """The coding :func:`encode_field` picks for each field (all at least ``_MIN_BYTES`` long, together at
    most ``_BLOCK`` bytes)."""
    lengths = np.array([len(d) for d in datas], np.int64)
    joined = np.frombuffer(b"".join(datas), np.uint8).astype(np.int64)
    joined += np.repeat(np.arange(len(datas), dtype=np.int64) * 256, lengths)
    counts = np.bincount(joined, minlength=256 * len(datas)).reshape(len(datas), 256)
    sizes = np.empty((len(datas), 1 + len(_WIDTH)))
    sizes[:, 0] = counts.sum(1)
    for coding, w in _WIDTH.items():
        c = _symbol_histogram(counts, w).astype(np.float64)
        present = c > 0
        p = np.where(present, c, 1.0) / c.sum(1, keepdims=True)
        bits = -np.where(present, c * np.log2(p), 0.0).sum(1)
        table = ((1 << w) + 7) // 8 + 2 * present.sum(1)
        sizes[:, coding] = table + 4 * (bits / 32 + 1)
    order = np.argsort(sizes, axis=1, kind="stable")  # ties to the lower coding, as encode_field's key
    best = np.take_along_axis(sizes, order[:, :2], axis=1)
    close = best[:, 1] - best[:, 0] <= _CLOSE * np.maximum(best[:, 0], 1.0)
    chosen = order[:, 0].tolist()
    for i in np.flatnonzero(close).tolist():
        exact = field_sizes(datas[i])
        chosen[i] = min(exact, key=lambda c: (exact[c], c))
    return chosen


def _read_model(stored: memoryview, w: int) -> tuple[np.ndarray, int]:
    nbits = 1 << w
    nmap = (nbits + 7) // 8
    if len(stored) < nmap:
        raise DecodeError(f"coded field of {len(stored)} bytes is shorter than its symbol map")
    present = np.unpackbits(np.frombuffer(stored[:nmap], np.uint8), bitorder="little")
    if present[nbits:].any():
        raise DecodeError("coded field: symbol map has bits set beyond the alphabet")
    freq = np.zeros(nbits, np.int64)
    pos = nmap
    for s in np.flatnonzero(present[:nbits]):
        v = shift = 0
        while True:
            if pos >= len(stored) or shift > 14:
                raise DecodeError("coded field: its model is truncated or a frequency is too long")
            b = stored[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if v < 1:
            raise DecodeError("coded field: a present symbol has frequency 0")
        freq[s] = v
    if int(freq.sum()) != 1 << _PRECISION:
        raise DecodeError(f"coded field: frequencies sum to {int(freq.sum())}, expected {1 << _PRECISION}")
    return freq, pos


#: bytes decoded before the first check for a decoder that has stopped moving (then doubling, up to a block)
_FIRST_STEP = 1 << 9


def _expand(coder: Any, model: Any, w: int, length: int) -> bytearray:
    """The ``length`` bytes ``coder`` decodes to (``w``-bit symbols), a run at a time; its state is left at
    the end, for the caller's check that the stream ends there.

    Before each run (of ``_FIRST_STEP`` bytes, doubling up to a block) one symbol is decoded alone: if that
    left the decoder exactly where it was (:meth:`pos`: its position in the stream and its state), decoding is
    a deterministic function of that state, so every later symbol is the same one and the state never changes
    again. The field's rest is then that symbol repeated, made without decoding it, or, if the decoder is not
    empty there, the stream cannot end after the field's symbols and is refused at once. So an empty or
    stuck stream (three stored bytes declaring megabytes of a symbol rANS codes in no bits, as an honest
    field's trailing run of zero bytes is) costs what its last moving run cost, not its declared length;
    the bytes are exactly those that decoding every symbol gives.
    """
    out = bytearray()
    lo, step, most = 0, _FIRST_STEP, _BLOCK * w // 8
    while lo < length:
        nbytes = min(step, length - lo)
        before = coder.pos()
        first = np.asarray(coder.decode(model, 1))
        if len(first) != 1 or int(first[0]) >= 1 << w:
            raise DecodeError("coded field: rANS stream decodes to symbols outside the alphabet")
        if coder.pos() == before:  # a fixed point: this symbol for ever, the state unchanged
            if not coder.is_empty():
                raise DecodeError("coded field: rANS stream does not end after the field's symbols")
            out += _pack(np.full(8 // w, first[0]), w) * (length - lo)
            return out
        n = nbytes * 8 // w
        rest = np.asarray(coder.decode(model, n - 1))
        if len(rest) != n - 1 or (n > 1 and int(rest.max()) >= 1 << w):
            raise DecodeError("coded field: rANS stream decodes to symbols outside the alphabet")
        out += _pack(np.concatenate([first, rest]), w)
        lo += nbytes
        step = min(2 * step, most)
    return out


def decode_field(coding: int, stored: memoryview, length: int) -> bytes | bytearray | memoryview:
    """The ``length`` raw bytes of a field stored with ``coding``; a :class:`DecodeError` otherwise."""
    if coding == 0:
        if len(stored) != length:
            raise DecodeError(f"a raw field stores {len(stored)} bytes but declares {length}")
        return stored
    w = _WIDTH.get(coding)
    if w is None:
        known = ", ".join(f"{k} ({v})" for k, v in CODINGS.items())
        raise DecodeError(f"unknown field coding {coding}; known: {known}")
    c = _constriction()
    if c is None:  # pragma: no cover - depends on the installed extras
        raise CodecError(
            "this payload entropy-codes a field: decoding it needs the 'constriction' package "
            "(pip install 'deltaplane[codecs]')"
        )
    freq, pos = _read_model(stored, w)
    words = len(stored) - pos
    if words < 0 or words % 4:
        raise DecodeError(f"coded field: {words} bytes of rANS stream is not a whole number of 32-bit words")
    model = _model(freq)
    try:
        coder = c.stream.stack.AnsCoder(np.frombuffer(stored[pos:], "<u4").astype(np.uint32))
        out = _expand(coder, model, w, length)
        empty = coder.is_empty()
    except DecodeError:
        raise
    except Exception as exc:  # the coder's own error types: a corrupt stream, whatever it says
        raise DecodeError(f"coded field: rANS stream is corrupt ({type(exc).__name__})") from None
    if not empty:
        raise DecodeError("coded field: rANS stream does not end after the field's symbols")
    return out  # no copy: a memoryview of it is what the codec reads
