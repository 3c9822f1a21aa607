"""The structure-aware wire fuzzer (issue #14 item 9): mutations that reach the decoder's semantic checks.

Every outcome must be a well-formed delta of the expected layout (exactly the original where the mutation
keeps the meaning) or a DeltaplaneError, within 1 s of CPU and 4 × model + 10 × payload (+ 1 MiB of RSS granularity) of memory.
``benchmarks/fuzz_decode.py`` runs the same fuzzer at 20,000+ mutations.
"""

from __future__ import annotations

import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import fuzzing
from deltaplane.codecs.fuzzing import SPECS, Mutator, fuzz, fuzz_model, parse, serialize


def _payloads() -> list[bytes]:
    d = dp.Delta(fuzz_model())
    return [dp.Compressor(s, error_feedback=False, seed=i).compress(d) for i, s in enumerate(SPECS)]


def test_every_registered_codec_and_index_coder_is_fuzzed() -> None:
    named = set()
    coders = set()
    for p in _payloads():
        for node, _, _ in fuzzing._nodes(parse(p).doc):
            named.add(node["c"].split("(")[0])
            coders.add((node.get("m") or {}).get("ix"))
    lossless = {n for n, c in dp.available_codecs().items() if c.lossless or c.selects_by_name}
    assert set(dp.available_codecs()) - {"pipeline"} - lossless <= named
    assert {"zstd", "policy"} <= {stage.split("(")[0].strip() for s in SPECS for stage in s.split("|")}
    assert {"bitmap", "golomb"} <= coders  # varint comes from the re-coding mutation
    assert any(" | " in s for s in SPECS)


@pytest.mark.parametrize("header", ["raw", "zlib", "dict"])
def test_serializer_rebuilds_payloads_exactly(header: str) -> None:
    """The fuzzer's own framing: parse + serialize (any header compression, zstd on or off) is lossless."""
    d = dp.Delta(fuzz_model())
    layout = dp.Layout.of(d)
    for p in _payloads():
        parsed = parse(p)
        want = dp.decompress(p, expect_layout=layout)
        for zstd in (False, True):
            again = dp.decompress(serialize(parsed.doc, header=header, zstd=zstd), expect_layout=layout)
            assert all(torch.equal(again[k], want[k]) for k in want)


@pytest.mark.parametrize("seed", [11, 12])
def test_structure_aware_fuzz(seed: int) -> None:
    report = fuzz(1500, seed=seed, measure_memory=True)
    assert report.failures == []
    assert report.mutations == 1500
    assert report.max_cpu_seconds < 1.0
    assert report.max_memory_ratio <= 1.0, report.worst_memory
    # the mutations are meaningful: many pass the frame and reach the codecs, some decode
    assert report.outcomes["exact"] + report.outcomes["decoded"] > 200
    assert report.outcomes["refused:ShapeMismatch"] > 50
    assert len(report.kinds) == len(Mutator(_payloads()[:1], __import__("random").Random()).kinds) + 1


def test_fuzzer_catches_a_decoder_without_its_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the layout, budget and codec checks the same fuzzer reports failures: it can fail."""
    monkeypatch.setattr("deltaplane.codecs.compressor.check_budget", lambda *a, **k: 1 << 62)
    monkeypatch.setattr("deltaplane.codecs.compressor.check_nodes", lambda *a, **k: None)
    report = fuzz(400, seed=5, kill_after=2.0)
    assert report.failures
    assert any("untyped" in f for f in report.failures)  # allocation bombs (capped address space)
    assert any("another layout" in f for f in report.failures)


@pytest.mark.parametrize("seed", [21, 22])
def test_structure_aware_fuzz_of_compact_frames(seed: int) -> None:
    """The same mutations framed as compact payloads of each codec's wire session (entropy coding on), plus
    compact-only lies: field codings and stored lengths, corrupted rANS streams, another session id or base
    version, bytes cut or added — every one with a valid CRC."""
    report = fuzz(1500, seed=seed, measure_memory=True, compact=True)
    assert report.failures == []
    assert report.mutations == 1500
    assert report.max_cpu_seconds < 1.0
    assert report.max_memory_ratio <= 1.0, report.worst_memory
    assert report.outcomes["exact"] + report.outcomes["decoded"] > 200
    assert report.outcomes["refused:ShapeMismatch"] > 50
    # frame-level lies: another session id or base version, refused from the frame's first bytes
    assert report.outcomes["refused:SessionMismatch"] > 0
    assert report.outcomes["refused:VersionMismatch"] > 0


def test_compact_serializer_rebuilds_payloads_exactly() -> None:
    """The fuzzer's compact framing of an unmutated document is the encoder's own frame, byte for byte."""
    from deltaplane.codecs import WireSession
    from deltaplane.codecs.fuzzing import serialize_compact

    d = dp.Delta(fuzz_model())
    layout = dp.Layout.of(d)
    for i, spec in enumerate(SPECS):
        session = WireSession.create(layout, spec, base_id="fuzz")
        c = dp.Compressor(spec, error_feedback=False, seed=i)
        compact = c.compress(d, base_version=1, session=session)
        plain = dp.Compressor(spec, error_feedback=False, seed=i).compress(d, base_id="fuzz", base_version=1)
        again, lied = serialize_compact(parse(plain).doc, session)
        assert not lied
        if "zstd" not in spec:  # the fuzzer's zstd level differs from the codec's
            assert again == compact, spec
        want = dp.decompress(compact, session=session)
        got = dp.decompress(again, session=session)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_pool_parser_reads_untrusted_payloads_strictly_and_bounded() -> None:
    """A Mutator's pool may come from anywhere: a zstd frame declaring 2**50 bytes (CRC valid) is a DecodeError
    (zstandard's one-shot decompress allocated what the frame declared: MemoryError), as is a zlib header bomb."""
    import random
    import struct
    import zlib

    import crc32c

    good = dp.Compressor("quant(bits=8) | zstd", error_feedback=False).compress(
        dp.Delta({"w": torch.ones(64)})
    )
    (hlen,) = struct.unpack_from("<I", good, 6)
    frame = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 0x00]) + (2**50).to_bytes(8, "little") + b"\x09\x00\x00" + b"x"
    head = good[: 10 + hlen] + frame
    bomb = head + struct.pack("<I", crc32c.crc32c(head))
    header = zlib.compress(b" " * (20 << 20), 9)  # 20 MiB of JSON whitespace: beyond the 16 MiB limit
    framed = fuzzing.MAGIC + bytes([fuzzing.VERSION, 1]) + struct.pack("<I", len(header)) + header
    zlib_bomb = framed + struct.pack("<I", crc32c.crc32c(framed))
    for payload in (bomb, zlib_bomb, good[:-1] + bytes([good[-1] ^ 1])):
        with pytest.raises(dp.DecodeError):
            parse(payload)
        with pytest.raises(dp.DecodeError):
            Mutator([payload], random.Random(0))
    assert parse(good).zstd  # a good payload still parses, its framing kept


def test_stacked_decode_of_damaged_stacks() -> None:
    """Stacks of compact frames, some damaged, decoded together (`decompress_many`, the codecs'
    `decode_rows`) give each frame's own outcome: the same delta, or the same error class and message."""
    from deltaplane.codecs.fuzzing import fuzz_stacked

    report = fuzz_stacked(60, seed=31)
    assert report.failures == []
    assert report.stacks == 60
    assert report.hangs == 0
    # the stacked decoder saw damaged rows among good ones, and decoded or refused them like each row alone
    assert report.stacked["decoded"] > 100
    assert report.outcomes["decoded"] > 50 and report.outcomes["refused:DecodeError"] > 20
    assert sum(v for k, v in report.kinds.items() if k != "valid") > 60


def test_stacked_fuzz_catches_a_stacked_decoder_that_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """It can fail: a stacked decode that hands every row the first row's values, or lets an untyped error
    out of a codec's `decode_rows`, is reported."""
    from deltaplane.codecs import base, compressor
    from deltaplane.codecs.fuzzing import fuzz_stacked
    from deltaplane.codecs.quantize import Quantize

    monkeypatch.setattr(
        compressor, "decode_tree_rows", lambda trees: torch.stack([base.decode_tree(trees[0])] * len(trees))
    )
    report = fuzz_stacked(12, seed=32)
    assert any("another delta" in f or "decoded in the stack" in f for f in report.failures), report.failures
    monkeypatch.undo()

    def broken(self: Quantize, rows: object) -> torch.Tensor:
        raise IndexError("index 9 is out of bounds")

    monkeypatch.setattr(Quantize, "decode_rows", broken)
    report = fuzz_stacked(20, seed=33, specs=["quant(bits=8)", "topk(0.05) | quant(bits=4)"])
    assert any("raised IndexError" in f for f in report.failures), report.failures
    assert any("stacked: untyped IndexError" in f for f in report.failures), report.failures
