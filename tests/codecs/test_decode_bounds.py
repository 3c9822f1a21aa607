"""Strict, bounded decoding of adversarial payloads with a *valid* checksum (issue #14, items 6-8).

Each payload here is hand-built and framed with a correct CRC, so only the decoder's own checks stand
between it and an allocation, a long loop or an untyped exception. Allocations are capped (RLIMIT_AS) and
decodes timed, so a regression fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import struct
import time
from collections.abc import Iterator

import crc32c
import numpy as np
import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import Layout, Limits
from deltaplane.codecs.sparsify import random_positions
from deltaplane.codecs.wire import MAGIC


def frame(doc: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(doc).encode()
    head = MAGIC + bytes([1, 0]) + struct.pack("<I", len(raw)) + raw + body
    return head + struct.pack("<I", crc32c.crc32c(head))


def table(*rows: tuple[str, str, dict]) -> dict:
    return {"base": ["m", 1], "codec": "", "t": [list(r) for r in rows]}


def raw_f32(n: int) -> dict:
    return {"c": "identity", "s": [n], "m": {"dtype": "float32"}, "f": {"data": 4 * n}}


@contextlib.contextmanager
def bounded(extra_bytes: int = 1 << 30, seconds: float = 5.0) -> Iterator[None]:
    """Cap this process's address space at its current size + ``extra_bytes`` and the block's wall time.

    A decoder that tries a huge allocation then fails fast (instead of taking the machine's memory), and
    one that loops over a huge declared size is interrupted; both show up as the wrong exception.
    """
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)

    def alarm(*_: object) -> None:
        raise TimeoutError(f"decode ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def refused(payload: bytes, error: type[Exception] = dp.DecodeError, match: str = "", **kw: object) -> None:
    t0 = time.perf_counter()
    with bounded(), pytest.raises(error, match=match):
        dp.decompress(payload, **kw)
    assert time.perf_counter() - t0 < 1.0


# -- item 6: size bombs ----------------------------------------------------------------------------------
HUGE = 1 << 34  # the old per-tensor limit: 64 GiB of float32


def topk_bomb() -> bytes:
    """~230 bytes: an approximate top-k of 2^34 values keeping one (the audit's 64 GiB allocation)."""
    node = {
        "c": "topk(ratio=0.01, approx=true)",
        "s": [HUGE],
        "m": {"ix": "varint"},
        "f": {"idx": 1, "values": raw_f32(1)},
    }
    return frame(table(("w", "float32", node)), b"\x05" + struct.pack("<f", 1.0))


def test_topk_size_bomb_is_refused_before_allocating() -> None:
    payload = topk_bomb()
    assert len(payload) < 260
    refused(payload, match="decode budget")
    refused(
        payload,
        dp.ShapeMismatch,
        match=r"declares shape \[17179869184\]",
        expect_layout={"w": torch.zeros(8)},
    )


def test_threshold_and_stc_bombs_are_refused() -> None:
    thr = {
        "c": "threshold(tau=0.5)",
        "s": [HUGE],
        "m": {"ix": "varint"},
        "f": {"idx": 1, "values": raw_f32(1)},
    }
    refused(frame(table(("w", "float32", thr)), b"\x07" + struct.pack("<f", 2.0)), match="decode budget")
    # stc(1e-9) keeps ceil(1e-9 · 2^34) = 18 positions: 18 varint bytes, 3 sign bytes and a scale
    stc = {
        "c": "stc(ratio=1e-09)",
        "s": [HUGE],
        "m": {"ix": "varint"},
        "f": {"idx": 18, "signs": 3, "scales": 4},
    }
    body = bytes(range(18)) + b"\xff\xff\x03" + struct.pack("<f", 1.0)
    refused(frame(table(("w", "float32", stc)), body), match="decode budget")


def test_powersgd_bomb_is_refused() -> None:
    """Two rank-1 factors of 2^17 values (1 MiB) would multiply out to a 64 GiB matrix."""
    m = 1 << 17
    node = {
        "c": "powersgd(rank=1, iters=1, min_size=4096, fallback=fp16)",
        "s": [m, m],
        "f": {"p": {**raw_f32(m), "s": [m, 1]}, "q": {**raw_f32(m), "s": [m, 1]}},
    }
    body = np.full(2 * m, 1e-3, np.float32).tobytes()
    refused(frame(table(("w", "float32", node)), body), match="decode budget")


def test_randk_over_a_huge_declared_size_does_not_run_the_generator() -> None:
    node = {
        "c": "randk(ratio=0.5, unbiased=false)",
        "s": [HUGE],
        "m": {"seed": 1},
        "f": {"values": raw_f32(1)},
    }
    refused(frame(table(("w", "float32", node)), struct.pack("<f", 1.0)), match="decode budget")


def test_randk_count_is_checked_before_the_positions_are_regenerated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within a legitimate layout, a count the seed cannot produce is refused without the O(n) scan."""
    n = 1 << 22
    node = {"c": "randk(ratio=0.5, unbiased=false)", "s": [n], "m": {"seed": 1}, "f": {"values": raw_f32(1)}}
    payload = frame(table(("w", "float32", node)), struct.pack("<f", 1.0))

    def scan(*args: object, **kw: object) -> None:
        raise AssertionError("the positions were regenerated before the count was checked")

    monkeypatch.setattr("deltaplane.codecs.sparsify.random_positions", scan)
    with pytest.raises(dp.DecodeError, match="the seed keeps about"):
        dp.decompress(payload, expect_layout={"w": torch.zeros(n)})


def test_random_positions_stop_early() -> None:
    full = random_positions(3, 1 << 16, 0.5)
    assert np.array_equal(random_positions(3, 1 << 16, 0.5, stop_after=len(full)), full)
    assert len(random_positions(3, 1 << 24, 0.5, stop_after=10)) < 1 << 21  # one block, not 16M positions


def test_expected_layout_refuses_other_models_before_decoding() -> None:
    d = dp.Delta({"a": torch.randn(4, 4), "b": torch.randn(3), "n": torch.tensor([2])})
    payload = dp.Compressor("topk(0.5)", error_feedback=False).compress(d, base_id="m", base_version=1)
    out = dp.decompress(payload, expect_base=("m", 1), expect_layout=d)
    assert list(out) == list(d)
    assert dp.decompress(payload, expect_layout=Layout.of(d)).keys() == d.keys()
    for other, match in [
        ({"a": torch.zeros(4, 4), "b": torch.zeros(3)}, "unknown"),
        ({**d, "c": torch.zeros(1)}, "missing"),
        ({**d, "a": torch.zeros(4, 5)}, r"tensor 'a'.*\[4, 4\]"),
        ({**d, "b": torch.zeros(3, dtype=torch.float64)}, "float64"),
        ({**d, "n": torch.tensor([2], dtype=torch.int32)}, "int32"),
    ]:
        with pytest.raises(dp.ShapeMismatch, match=match):
            dp.decompress(payload, expect_layout=other)


def test_nested_node_larger_than_its_tensor_is_refused() -> None:
    node = {
        "c": "topk(ratio=1.0, approx=true)",
        "s": [2],
        "m": {"ix": "bitmap"},
        "f": {"idx": 1, "values": raw_f32(3)},
    }
    payload = frame(table(("w", "float32", node)), b"\x03" + bytes(12))
    with pytest.raises(dp.DecodeError, match="more than its tensor"):
        dp.decompress(payload)


def test_layout_budget_bounds_nested_chains() -> None:
    """A chain of full top-k nodes, each as large as the tensor, exceeds the layout-relative budget."""
    n, node = 64, raw_f32(64)
    for _ in range(5):
        node = {"c": "topk(ratio=1.0)", "s": [n], "m": {"ix": "bitmap"}, "f": {"idx": 8, "values": node}}
    body = b"\xff" * 8 * 5 + np.ones(n, np.float32).tobytes()
    payload = frame(table(("w", "float32", node)), body)
    assert dp.decompress(payload)["w"].sum() == n  # well formed: fine for a standalone file
    with pytest.raises(dp.DecodeError, match="decode budget"):
        dp.decompress(payload, expect_layout={"w": torch.zeros(n)})


def test_unknown_fields_and_wrong_field_kinds_are_refused() -> None:
    fp16 = {"c": "fp16", "s": [2], "f": {"data": 4, "extra": 0}}
    with pytest.raises(dp.DecodeError, match="expected exactly"):
        dp.decompress(frame(table(("w", "float32", fp16)), bytes(4)))
    topk = {"c": "topk(ratio=0.5)", "s": [2], "m": {"ix": "bitmap"}, "f": {"idx": 1, "values": 4}}
    with pytest.raises(dp.DecodeError, match="nested node"):
        dp.decompress(frame(table(("w", "float32", topk)), b"\x01" + bytes(4)))


def test_integer_tensor_must_travel_raw_in_its_dtype() -> None:
    node = {"c": "fp16", "s": [2], "f": {"data": 4}}
    with pytest.raises(dp.DecodeError, match="int64 tensor must travel as identity"):
        dp.decompress(frame(table(("n", "int64", node)), bytes(4)))


def test_index_stream_lengths_are_checked_before_decoding() -> None:
    # a varint stream of 1000 bytes for one position, and a golomb stream shorter than its remainders
    node = {
        "c": "threshold(tau=0.5)",
        "s": [100],
        "m": {"ix": "varint"},
        "f": {"idx": 1000, "values": raw_f32(1)},
    }
    with pytest.raises(dp.DecodeError, match="cannot hold 1 positions"):
        dp.decompress(frame(table(("w", "float32", node)), bytes(1000) + struct.pack("<f", 1.0)))
    node["m"], node["f"]["idx"] = {"ix": "golomb"}, 1
    with pytest.raises(dp.DecodeError, match="cannot hold"):
        dp.decompress(frame(table(("w", "float32", node)), b"\x28" + struct.pack("<f", 1.0)))


def test_standalone_files_still_decode_under_the_budget() -> None:
    """No layout: a legitimately very sparse payload (2,000x smaller than its tensor) still decodes."""
    d = dp.Delta({"w": torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))})
    payload = dp.Compressor("topk(0.0005) | quant(bits=4)", error_feedback=False).compress(d)
    assert d.nbytes / len(payload) > 1000
    assert dp.decompress(payload).keys() == d.keys()
    with pytest.raises(dp.DecodeError, match="decode budget"):
        dp.decompress(payload, limits=Limits(min_decoded_bytes=0, max_expansion=16))


# -- item 7: untyped errors from CRC-valid payloads ------------------------------------------------------
def test_policy_node_is_refused_not_recursed() -> None:
    node = {"c": "policy(rules='*: fp16')", "s": [2], "f": {"data": 4}}
    with pytest.raises(dp.DecodeError, match="must name a tensor codec"):
        dp.decompress(frame(table(("w", "float32", node)), bytes(4)))
    zstd = {"c": "zstd(level=3)", "s": [2], "f": {}}
    with pytest.raises(dp.DecodeError, match="must name a tensor codec"):
        dp.decompress(frame(table(("w", "float32", zstd))))


def test_shape_with_a_huge_dimension_and_zero_product_is_refused() -> None:
    node = {"c": "fp16", "s": [0, 2**63], "f": {"data": 0}}
    with pytest.raises(dp.DecodeError, match="value limit"):
        dp.decompress(frame(table(("w", "float32", node))))


@pytest.mark.parametrize(
    "spec",
    [
        "threshold(tau=" + "9" * 400 + ")",
        "ternary(chunk=1" + "0" * 330 + ")",
        "quant(bits=8, stochastic=false, chunk=" + "7" * 1000 + ", scale=max)",
        "powersgd(rank=" + "1" * 30 + ")",
        "topk(ratio=-" + "1" * 400 + ")",
    ],
)
def test_huge_integer_parameters_are_spec_errors(spec: str) -> None:
    with pytest.raises(dp.SpecError, match="64-bit range"):
        dp.get_codec(spec)
    node = {"c": spec, "s": [2], "f": {"trits": 1, "scales": 4}}
    with pytest.raises(dp.DecodeError, match="64-bit range"):
        dp.decompress(frame(table(("w", "float32", node)), bytes(5)))


def test_constructors_refuse_huge_values_with_codec_errors() -> None:
    with pytest.raises(dp.CodecError, match="tau"):
        dp.codecs.Threshold(tau=10**400)
    with pytest.raises(dp.CodecError, match="chunk"):
        dp.codecs.Ternary(chunk=10**330)
    with pytest.raises(dp.CodecError, match="chunk"):
        dp.codecs.Quantize(chunk=2**63)


# -- item 8: no uninitialised memory --------------------------------------------------------------------
def test_quant_with_a_chunk_beyond_float_range_is_refused() -> None:
    """chunk = 10^330: float ceil(n / chunk) is 0 chunks, so the old decoder read no scale and returned
    an unwritten torch.empty as the update."""
    node = {
        "c": "quant(bits=8, stochastic=false, chunk=1" + "0" * 330 + ", scale=max)",
        "s": [4],
        "f": {"codes": 4, "scales": 0},
    }
    with pytest.raises(dp.DecodeError):
        dp.decompress(frame(table(("w", "float32", node)), bytes([1, 2, 3, 4])))


def test_quant_with_the_largest_chunk_decodes_exactly() -> None:
    """The largest legal chunk is one chunk: one scale, every value written."""
    chunk = 2**63 - 1
    node = {
        "c": f"quant(bits=8, stochastic=false, chunk={chunk}, scale=max)",
        "s": [4],
        "f": {"codes": 4, "scales": 4},
    }
    body = bytes([127, 254, 0, 127]) + struct.pack("<f", 127.0)
    out = dp.decompress(frame(table(("w", "float32", node)), body))["w"]
    assert out.tolist() == [0.0, 127.0, -127.0, 0.0]
    node["f"]["scales"] = 0
    with pytest.raises(dp.DecodeError, match="scales"):
        dp.decompress(frame(table(("w", "float32", node)), body[:4]))


def test_ceil_div_matches_math_where_floats_are_exact() -> None:
    from deltaplane.codecs.quantize import ceil_div

    for a, b in [(0, 1), (1, 1), (5, 2), (512, 512), (513, 512), (7, 10**330)]:
        assert ceil_div(a, b) == (math.ceil(a / b) if b < 2**53 else (1 if a else 0))


@pytest.mark.parametrize("spec", ["topk(1.0)", "topk(1.0) | zstd", "stc(0.5) | zstd"])
@pytest.mark.parametrize("wire", ["self-describing", "compact", "compact-entropy"])
def test_bodies_larger_than_the_model_decode_against_its_layout(spec: str, wire: str) -> None:
    """An honest body may exceed the model's size: top-k at density 1 sends a bitmap besides every value, and
    a tiny model's fields carry fixed overhead (stc of one value: position, sign and a 4-byte scale). With the
    receiver's layout such payloads were refused ("would inflate ... beyond its decode budget" of 1 x the
    model); they decode within the decode budget, to exactly what was sent (every value, here)."""
    g = torch.Generator().manual_seed(0)
    d = dp.Delta({"w": torch.randn(64, 256, generator=g) if "topk" in spec else torch.randn(1, generator=g)})
    layout = Layout.of(d)
    comp = dp.Compressor(spec, error_feedback=False, seed=0)
    if wire == "self-describing":
        payload = comp.compress(d, base_id="m", base_version=1)
        got = dp.decompress(payload, expect_layout=layout, expect_base=("m", 1))
    else:
        session = dp.codecs.WireSession.create(layout, spec, base_id="m", entropy=wire.endswith("entropy"))
        payload = comp.compress(d, base_version=1, session=session)
        got = dp.decompress(payload, session=session, expect_base=("m", 1))
    assert torch.equal(got["w"], d["w"])


# -- PowerSGD's decode work: m·n·rank multiply-adds, so the rank a payload may ask for is bounded ---------
MAX_RANK = 64  # the documented limit (docs/codecs.md, wire-format §3)


def _powersgd_rank_payload(m: int, rank: int) -> bytes:
    """A CRC-valid m×m PowerSGD node at ``rank``, its factors 1-bit codes (a few KB for a 4 MB matrix)."""
    quant = "quant(bits=1, stochastic=false, chunk=1000000000, scale=max)"

    def factor(rows: int) -> dict:
        return {"c": quant, "s": [rows, rank], "f": {"codes": (rows * rank + 7) // 8, "scales": 4}}

    node = {
        "c": f"powersgd(rank={rank}, iters=1, min_size=4096, fallback=fp16)",
        "s": [m, m],
        "f": {"p": factor(m), "q": factor(m)},
    }
    body = (bytes((m * rank + 7) // 8) + struct.pack("<f", 1.0)) * 2
    return frame(table(("w", "float32", node)), body)


def test_powersgd_rank_beyond_the_limit_is_refused() -> None:
    """A rank just under m·n/(m+n) (1023 on 2048²) passed every size check, and one ~0.5 MB payload cost
    m·n·r ≈ 4.3 G multiply-adds to decode (growing as size^1.5; 0.8 s of CPU on 4096²). Any rank above
    MAX_RANK is refused before decoding, with the receiver's layout or without it."""
    m = 2048
    for rank in (MAX_RANK + 1, m * m // (2 * m) - 1):
        payload = _powersgd_rank_payload(m, rank)
        refused(payload, match="rank must be an integer in 1..64")
        refused(payload, match="rank must be an integer in 1..64", expect_layout={"w": torch.zeros(m, m)})
    with pytest.raises(dp.SpecError, match="rank must be an integer in 1..64"):
        dp.get_codec(f"powersgd(rank={MAX_RANK + 1})")


def test_powersgd_at_the_largest_rank_decodes() -> None:
    """The largest allowed rank stays an honest configuration: it encodes, and decodes to what was sent."""
    d = dp.Delta({"w": torch.randn(512, 512, generator=torch.Generator().manual_seed(0))})
    payload = dp.Compressor(f"powersgd(rank={MAX_RANK})", error_feedback=False, seed=0).compress(d)
    with bounded():
        got = dp.decompress(payload, expect_layout=Layout.of(d))
    assert tuple(got["w"].shape) == (512, 512)
    assert float((got["w"] - d["w"]).norm() / d["w"].norm()) < 1.0


def test_compact_frame_cannot_ask_for_a_higher_rank_than_its_session() -> None:
    """In a wire session a node may travel whole (skeleton ``h = 0``) and name any codec, so a frame of a
    rank-2 session could ask for rank 64: 32x the decode work the session agreed to. It is refused, naming
    the session's rank; the session's own rank, sent whole the same way, decodes."""
    from deltaplane.codecs.compressor import encode_delta

    d = dp.Delta({"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(0))})
    session = dp.codecs.WireSession.create(Layout.of(d), "powersgd(rank=2)", base_id="m")
    for rank, ok in ((2, True), (3, False), (64, False)):
        # iters=2: a codec string unlike the template's, so the node travels whole (h = 0)
        trees = encode_delta(d, dp.get_codec(f"powersgd(rank={rank}, iters=2)"), torch.Generator(), {})
        payload = session.pack(trees, base_version=1)
        if ok:
            assert tuple(dp.decompress(payload, session=session)["w"].shape) == (256, 256)
        else:
            refused(payload, match="above the session codec's rank 2", session=session)
    other = dp.codecs.WireSession.create(Layout.of(d), "fp16", base_id="m")
    trees = encode_delta(d, dp.get_codec("powersgd(rank=1)"), torch.Generator(), {})
    refused(other.pack(trees, base_version=1), match="uses no PowerSGD", session=other)


def _bool_payload(data: bytes) -> bytes:
    node = {"c": "identity", "s": [len(data)], "m": {"dtype": "bool"}, "f": {"data": len(data)}}
    return frame(table(("mask", "bool", node)), data)


@pytest.mark.parametrize("data", [bytes([2, 0, 255, 1]), bytes([0, 1, 0, 0x80])])
def test_bool_bytes_other_than_0_and_1_are_refused(data: bytes) -> None:
    """torch keeps a bool byte as it is: [2, 0, 255, 1] decoded to a mask that reads True but is not
    ``== True``, sums to 258 as int and stays True under ``~``. Refused, one by one and in a batch."""
    layout = {"mask": torch.zeros(4, dtype=torch.bool)}
    refused(_bool_payload(data), match="bytes other than 0", expect_layout=layout)
    got = dp.decompress(_bool_payload(bytes([1, 0, 1, 0])), expect_layout=layout)["mask"]
    assert got.tolist() == [True, False, True, False] and int(got.sum()) == 2
    # compact frames decoded together (decode_rows joins the rows' bytes): the frame's last 4 data bytes
    session = dp.codecs.WireSession.create(Layout.of(layout), "identity", base_id="m", entropy=False)
    honest = dp.Compressor("identity", error_feedback=False).compress(
        dp.Delta({"mask": torch.tensor([True, False, True, False])}), base_version=1, session=session
    )
    head = honest[:-8] + data
    bad = head + struct.pack("<I", crc32c.crc32c(head))
    out = dp.codecs.decompress_many([honest, bad, honest], session=session)
    assert out[0]["mask"].tolist() == out[2]["mask"].tolist() == [True, False, True, False]
    assert isinstance(out[1], dp.DecodeError) and "bytes other than 0" in str(out[1])


ALL_EMPTY = {"w": torch.zeros(0), "b": torch.zeros(5, 0, dtype=torch.float16)}


@pytest.mark.parametrize(
    "spec", ["sign", "stc(0.3)", "ternary", "randk(0.5)", "quant(bits=4)", "stc(0.3) | zstd"]
)
@pytest.mark.parametrize("wire", ["self-describing", "compact"])
def test_a_model_of_empty_tensors_round_trips(spec: str, wire: str) -> None:
    """sign's and STC's fixed 4-byte scale exceeded the decode budget of a model made only of empty tensors
    (3 x 0 bytes), so every compact update of it was refused; each tensor now has a small fixed allowance."""
    d = dp.Delta(ALL_EMPTY)
    layout = Layout.of(d)
    comp = dp.Compressor(spec, error_feedback=False, seed=0)
    if wire == "self-describing":
        got = dp.decompress(comp.compress(d, base_id="m", base_version=1), expect_layout=layout)
    else:
        session = dp.codecs.WireSession.create(layout, spec, base_id="m")
        got = dp.decompress(comp.compress(d, base_version=1, session=session), session=session)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in d.items()}


def test_the_per_tensor_allowance_stays_small() -> None:
    """The allowance is a few dozen bytes a tensor, not a way around the budget: a zstd body of an empty
    tensor's sign node inflating to 1 KB is refused before it is inflated."""
    from deltaplane.codecs.fuzzing import Buf, parse, serialize

    d = dp.Delta({"w": torch.zeros(0)})
    p = parse(dp.Compressor("sign", error_feedback=False).compress(d, base_id="m", base_version=1))
    p.doc["t"][0][2]["f"]["signs"] = Buf(bytes(1024))
    refused(serialize(p.doc, zstd=True), match="beyond its decode budget of 64", expect_layout=Layout.of(d))
