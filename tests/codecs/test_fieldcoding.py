"""Entropy coding of compact-frame fields: lossless, near the empirical entropy, chosen only where it wins,
and strict on every malformed stream."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaplane.codecs.entropy import pack_bits
from deltaplane.codecs.fieldcoding import CODINGS, decode_field, encode_field
from deltaplane.errors import DecodeError

pytest.importorskip("constriction")


def _shannon_bytes(symbols: np.ndarray) -> float:
    """The order-0 empirical entropy of ``symbols`` in bytes (an independent lower bound)."""
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantization_codes_cost_their_entropy(bits: int) -> None:
    rng = np.random.default_rng(bits)
    levels = (1 << bits) - 1
    weights = np.exp(-np.arange(levels + 1) / max(levels / 6, 1.0))  # skewed, as codes of sparse values are
    codes = rng.choice(levels + 1, size=40_000, p=weights / weights.sum()).astype(np.uint8)
    data = pack_bits(codes, bits)
    coding, stored = encode_field(data)
    assert bytes(decode_field(coding, memoryview(stored), len(data))) == data
    bound = _shannon_bytes(codes)
    assert coding != 0 and len(stored) < len(data)
    # within 2% (+ the model and the coder's last words) of the order-0 entropy of the codes themselves
    assert bound <= len(stored) <= 1.02 * bound + 40, (len(stored), bound)


def test_incompressible_and_tiny_fields_stay_raw() -> None:
    rng = np.random.default_rng(0)
    for data in (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), b"\x01\x02\x03", b""):
        coding, stored = encode_field(data)
        assert coding == 0 and bytes(stored) == data


@pytest.mark.parametrize("seed", range(5))
def test_round_trips_any_bytes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(16, 3000))
    alphabet = rng.integers(1, 6)
    data = rng.choice(np.arange(256, dtype=np.uint8), size=alphabet, replace=False)[
        rng.integers(0, alphabet, n)
    ]
    coding, stored = encode_field(data.tobytes())
    assert bytes(decode_field(coding, memoryview(stored), n)) == data.tobytes()


def _coded() -> tuple[int, bytes, bytes]:
    rng = np.random.default_rng(7)
    data = pack_bits(np.clip(np.round(rng.normal(7, 1.2, 4000)), 0, 14).astype(np.uint8), 4)
    coding, stored = encode_field(data)
    assert coding == 3
    return coding, bytes(stored), data


def test_malformed_streams_are_refused() -> None:
    coding, stored, data = _coded()
    bad = {
        "truncated stream": stored[:-4],
        "a word too many": stored + b"\0\0\0\1",
        "not whole words": stored[:-1],
        "model cut": stored[:3],
        "empty": b"",
        "frequencies off": stored[:2] + bytes([stored[2] ^ 1]) + stored[3:],
    }
    for what, s in bad.items():
        with pytest.raises(DecodeError):
            out = decode_field(coding, memoryview(s), len(data))
            assert bytes(out) == data, what  # a lie the coder cannot notice must at least not decode right
    with pytest.raises(DecodeError, match="unknown field coding"):
        decode_field(len(CODINGS), memoryview(stored), len(data))
    with pytest.raises(DecodeError, match="raw field"):
        decode_field(0, memoryview(data), len(data) + 1)
    # a symbol map with bits beyond a 2-bit alphabet
    with pytest.raises(DecodeError, match="beyond the alphabet"):
        decode_field(2, memoryview(b"\xf1\x80\x20"), 8)


def test_output_is_bounded_by_the_declared_length() -> None:
    """A tiny stream cannot decode to more than the field declares (the codec checked that length)."""
    coding, stored = encode_field(b"\0" * 4096)  # one symbol: a few bytes of model, no stream words
    assert len(stored) < 8
    assert len(decode_field(coding, memoryview(stored), 4096)) == 4096
    with pytest.raises(DecodeError):  # the same stream read as a longer field does not end where it should
        decode_field(coding, memoryview(stored + b"\x01\0\0\0"), 4096)


# -- choosing many fields' codings at once (WireSession.pack_many) ---------------------------------------
def _field(seed: int, n: int, kind: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == 0:
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # incompressible: stays raw
    if kind == 1:
        codes = rng.choice(4, 4 * n, p=[0.7, 0.2, 0.05, 0.05]).astype(np.uint8)
        return pack_bits(codes, 2)[:n]  # skewed 2-bit codes
    if kind == 2:
        return np.packbits(rng.random(8 * n) < 0.05, bitorder="little").tobytes()  # sparse bits
    if kind == 3:
        return np.clip(rng.normal(128, 3, n), 0, 255).astype(np.uint8).tobytes()  # clustered codes
    return bytes([seed % 256]) * n  # one symbol


@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_symbol_histogram_counts_every_symbol(w: int) -> None:
    from deltaplane.codecs.fieldcoding import _byte_histogram, _symbol_histogram

    data = np.random.default_rng(w).integers(0, 256, (3, 999), dtype=np.uint8)
    rows = np.stack([_byte_histogram(r) for r in data])
    for row, counts in zip(data, _symbol_histogram(rows, w), strict=True):
        naive = np.zeros(1 << w, np.int64)  # every symbol of every byte, counted one by one
        for b in row.tolist():
            for j in range(8 // w):
                naive[(b >> (j * w)) & ((1 << w) - 1)] += 1
        assert counts.tolist() == naive.tolist()
        assert _symbol_histogram(_byte_histogram(row), w).tolist() == naive.tolist()


@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_pack_puts_symbols_least_significant_first(w: int) -> None:
    """``_pack`` (the decoder's symbols to bytes) inverts ``_symbols`` and matches the spec's bit order, byte
    by byte, for int32 symbols as the rANS decoder returns them."""
    from deltaplane.codecs.fieldcoding import _pack, _symbols

    data = np.random.default_rng(w).integers(0, 256, 4099, dtype=np.uint8)
    symbols = _symbols(data, w).astype(np.int32)
    assert _pack(symbols, w) == data.tobytes()
    naive = bytes(  # byte i holds symbols i*8/w .. : the first in its lowest bits
        sum(int(s) << (j * w) for j, s in enumerate(symbols[i * 8 // w : (i + 1) * 8 // w]))
        for i in range(len(data))
    )
    assert _pack(symbols, w) == naive


@given(
    st.lists(
        st.tuples(st.integers(0, 2**16), st.integers(0, 400), st.integers(0, 4)), min_size=0, max_size=30
    )
)
@settings(max_examples=60, deadline=None)
def test_encode_fields_is_encode_field_of_each(fields: list[tuple[int, int, int]]) -> None:
    from deltaplane.codecs.fieldcoding import encode_fields

    datas = [_field(*f) for f in fields]
    got = encode_fields(datas)
    assert [(c, bytes(s)) for c, s in got] == [(c, bytes(s)) for c, s in map(encode_field, datas)]


@pytest.mark.parametrize("close", [0.0, float("inf")])
def test_encode_fields_close_calls_and_large_fields(monkeypatch: pytest.MonkeyPatch, close: float) -> None:
    """Whether every choice is the vectorised estimate's (``_CLOSE = 0``) or every one is field_sizes' own
    (``inf``), the codings, hence the bytes, are encode_field's; fields beyond a block (1 MiB) go alone."""
    import deltaplane.codecs.fieldcoding as fc

    monkeypatch.setattr(fc, "_CLOSE", close)
    datas = [_field(i, 17 + 37 * i, i % 5) for i in range(40)]
    datas += [_field(1, (1 << 20) + 3, 1), _field(2, 700_000, 2), _field(3, 500_000, 3), b"", b"\1" * 15]
    got = fc.encode_fields(datas)
    want = [fc.encode_field(d) for d in datas]
    assert [(c, bytes(s)) for c, s in got] == [(c, bytes(s)) for c, s in want]
    assert {c for c, _ in want} == {0, 1, 2, 3, 4}  # every coding chosen somewhere
