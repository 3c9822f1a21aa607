"""A field's decode cost is bounded by its node before it is expanded, and a stalled rANS stream costs nothing.

A compact frame's entropy-coded field stores a few bytes and declares its decoded length; a zstd body declares
what it inflates to. Each is checked against the most bytes its codec node allows for its shape
(:meth:`~deltaplane.codecs.base.Codec.max_field_bytes`) before it is expanded, and a rANS decoder that stops
moving is not run on (:func:`~deltaplane.codecs.fieldcoding._expand`).
"""

import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.codecs.test_session import MODEL, _session
from tests.codecs.test_wire import SPECS

import deltaplane as dp
from deltaplane.codecs import fieldcoding
from deltaplane.codecs.base import Codec, Encoded, available_codecs
from deltaplane.codecs.layout import Layout
from deltaplane.codecs.wire import read_table
from deltaplane.errors import DecodeError

#: ans1, symbol map {0}, frequency 4096, no rANS word: an empty decoder, which decodes zero bits for ever
EMPTY_ANS1 = b"\x01\x80\x20"


def test_every_codec_with_byte_fields_bounds_them() -> None:
    for name, cls in available_codecs().items():
        if cls.byte_fields:
            assert cls.max_field_bytes is not Codec.max_field_bytes, name


@pytest.mark.parametrize("spec", SPECS)
def test_honest_fields_fit_their_bounds(spec: str) -> None:
    """Every field an honest sender writes is within its node's bound (a bound never refuses a good payload),
    on the test model and on a model with an empty and a one-value tensor."""
    models = [MODEL, {"e": torch.zeros(0), "one": torch.zeros(1), "m": torch.zeros(7, 9)}]
    for model in models:
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            d = dp.Delta(
                {
                    k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                    for k, v in model.items()
                }
            )
            payload = dp.Compressor(spec, error_feedback=False, seed=seed).compress(
                d, base_id="m", base_version=1
            )
            from deltaplane.codecs.preflight import field_lengths, max_field_bytes

            trees = read_table(payload).trees
            bounds = max_field_bytes(trees)
            lengths = [n for _, tree in trees.values() for n in field_lengths(tree)]
            assert len(bounds) == len(lengths)
            for (where, most), n in zip(bounds, lengths, strict=True):
                assert most is not None and n <= most, (spec, where, n, most)


def _crafted(
    s: dp.codecs.WireSession, idx_bytes: int, stored: bytes, monkeypatch: pytest.MonkeyPatch
) -> bytes:
    """A CRC-valid compact frame of ``s`` (top-k | quant) whose every coded field is stored as ``stored``, the
    first tensor's index stream declaring ``idx_bytes`` bytes."""
    trees = {}
    for i, (name, t) in enumerate(s.layout.items()):
        if not t.dtype.is_floating_point:
            trees[name] = (t.dtype, Encoded("identity", t.shape, {"dtype": "int64"}, {"data": bytes(8)}))
            continue
        n = math.prod(t.shape)
        k = max(1, math.ceil(0.1 * n))
        values = Encoded(
            "quant(bits=4, stochastic=false, chunk=512, scale=max)",
            (k,),
            {},
            {"codes": bytes((k * 4 + 7) // 8), "scales": bytes(4)},
        )
        idx = bytes(idx_bytes if i == 0 else 1 + (k + n + 7) // 8)
        trees[name] = (
            t.dtype,
            Encoded("topk(ratio=0.1)", t.shape, {"ix": "golomb"}, {"idx": idx, "values": values}),
        )
    monkeypatch.setattr(fieldcoding, "encode_fields", lambda datas: [(1, stored) for _ in datas])
    frame = s.pack(trees, 4)
    monkeypatch.undo()
    return frame


def test_a_coded_field_longer_than_its_node_allows_is_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three stored bytes declaring 4,000 bytes of index stream for a 72-value tensor (within the decode
    budget, which alone let it expand before): refused from the skeleton, no field decoded."""
    s = _session("topk(0.1) | quant(bits=4)", entropy=True)
    frame = _crafted(s, 4000, EMPTY_ANS1, monkeypatch)
    small = _crafted(s, 1 + (8 + 72 + 7) // 8, EMPTY_ANS1, monkeypatch)  # within its bound: decoded

    def no_decoding(*a: object) -> bytes:
        raise AssertionError("a field was decoded before its length was checked")

    assert len(frame) < 200
    monkeypatch.setattr(fieldcoding, "decode_field", no_decoding)
    with pytest.raises(
        DecodeError,
        match=r"tensor 'conv.weight' field 'idx' declares 4000 bytes; its node allows at most 42$",
    ):
        dp.decompress(frame, session=s)
    monkeypatch.undo()
    with pytest.raises(DecodeError, match="Golomb"):  # decoded (zero bytes), then refused by the codec
        dp.decompress(small, session=s)


def _counting(calls: list[int]) -> SimpleNamespace:
    """``constriction`` with an AnsCoder that counts the symbols decoded."""
    real = fieldcoding._constriction()

    class Counting:
        def __init__(self, *a: object) -> None:
            self._c = real.stream.stack.AnsCoder(*a)

        def decode(self, model: object, n: int) -> np.ndarray:
            calls.append(n)
            return self._c.decode(model, n)

        def __getattr__(self, name: str) -> object:
            return getattr(self._c, name)

    return SimpleNamespace(
        stream=SimpleNamespace(stack=SimpleNamespace(AnsCoder=Counting), model=real.stream.model)
    )


def test_an_empty_stream_decodes_its_zeros_without_the_coder(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty rANS decoder yields symbol 0 for ever and stays empty: 16 MB declared in 3 bytes is 16 MB of
    zeros made at once (before: 134 M symbols decoded, ~1–3 s)."""
    calls: list[int] = []
    counting = _counting(calls)
    monkeypatch.setattr(fieldcoding, "_constriction", lambda: counting)
    out = fieldcoding.decode_field(1, memoryview(EMPTY_ANS1), 16 << 20)
    assert bytes(out) == bytes(16 << 20)
    assert sum(calls) <= 1


def test_a_stuck_stream_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-word stream whose state (5) is a fixed point of the model decodes symbol 0 for ever and never
    ends: refused after one symbol, not after the field's 128 M."""
    calls: list[int] = []
    counting = _counting(calls)
    monkeypatch.setattr(fieldcoding, "_constriction", lambda: counting)
    stored = b"\x03" + bytes([0xE6, 0x1C, 0x9A, 0x03]) + struct.pack("<I", 5)  # freqs 3686, 410; word 5
    with pytest.raises(DecodeError, match="does not end"):
        fieldcoding.decode_field(1, memoryview(stored), 16 << 20)
    assert sum(calls) <= 1


def _reference(stored: bytes, w: int, length: int) -> bytes | None:
    """Every symbol decoded, as the reader did before: the field's bytes, or None where it refused."""
    c = fieldcoding._constriction()
    freq, pos = fieldcoding._read_model(memoryview(stored), w)
    coder = c.stream.stack.AnsCoder(np.frombuffer(stored[pos:], "<u4").astype(np.uint32))
    sym = np.asarray(coder.decode(fieldcoding._model(freq), length * 8 // w))
    return fieldcoding._pack(sym, w) if coder.is_empty() else None


@pytest.mark.parametrize("seed", range(6))
def test_decoding_equals_decoding_every_symbol(seed: int) -> None:
    """Fields with long runs (where the decoder stops moving mid-run) and damaged streams: the same bytes, or
    the same refusal, as decoding every symbol."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        head = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8)
        head[rng.random(len(head)) < 0.9] = 0
        tail = int(rng.integers(0, 1 << 16))
        data = bytes(head) + bytes(tail)
        coding, stored = fieldcoding.encode_field(data)
        if coding == 0:
            continue
        stored = bytes(stored)
        length = len(data)
        w = fieldcoding._WIDTH[coding]
        assert bytes(fieldcoding.decode_field(coding, memoryview(stored), length)) == data
        for lie in (length + int(rng.integers(1, 5000)), max(0, length - int(rng.integers(1, 5000)))):
            ref = _reference(stored, w, lie)
            try:
                got: bytes | None = bytes(fieldcoding.decode_field(coding, memoryview(stored), lie))
            except DecodeError:
                got = None
            assert got == ref
        if len(stored) > 8:
            bad = bytearray(stored)
            bad[-1 - int(rng.integers(0, 4))] ^= 1 << int(rng.integers(0, 8))
            ref = _reference(bytes(bad), w, length)
            try:
                got = bytes(fieldcoding.decode_field(coding, memoryview(bytes(bad)), length))
            except DecodeError:
                got = None
            assert got == ref


def test_a_zstd_body_field_longer_than_its_node_is_refused_before_inflating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Self-describing: a sign node's signs declaring 64 KB for 10 values, in a zstd body within the budget,
    is refused from the table (the body is never inflated)."""
    from deltaplane.codecs import wire
    from deltaplane.codecs.fuzzing import Buf, parse, serialize

    d = dp.Delta({"w": torch.zeros(10, 4096)})
    p = parse(  # a sign node of 10 values, reshaped: the fields' lengths are all that is checked here
        dp.Compressor("sign", error_feedback=False).compress(
            dp.Delta({"w": torch.zeros(10)}), base_id="m", base_version=1
        )
    )
    p.doc["t"][0][2]["s"] = [10, 4096]
    p.doc["t"][0][2]["f"]["signs"] = Buf(bytes(64 << 10))
    payload = serialize(p.doc, zstd=True)

    def no_inflating(*a: object) -> bytes:
        raise AssertionError("the body was inflated before its fields' lengths were checked")

    monkeypatch.setattr(wire, "_inflated", no_inflating)
    with pytest.raises(DecodeError, match="field 'signs' declares 65536 bytes; its node allows at most 5120"):
        dp.decompress(payload, expect_layout=Layout.of(d))
