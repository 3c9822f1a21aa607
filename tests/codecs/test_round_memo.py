"""What a wire session remembers between a round's payloads changes no byte and skips no refusal.

:meth:`WireSession.pack` remembers each tensor's skeleton part by the tree's shape, meta, field lengths and
codings (:func:`~deltaplane.codecs.session._tree_key`), so a round's updates of one codec share the work;
the reference here is a fresh session (nothing remembered) framing each update alone.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct

import crc32c
import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import WireSession, decompress_many
from deltaplane.codecs.fuzzing import SPECS, fuzz_model
from deltaplane.codecs.session import _node_doc, _put_varint
from deltaplane.errors import DeltaplaneError

from .conftest import assert_same_outcomes, decode_one_by_one, fuzz_sessions


def _cold(session: WireSession) -> WireSession:
    """``session`` with nothing remembered (what it framed and read before is forgotten)."""
    for memo in ("_packed", "_skeletons"):
        session.__dict__.pop(memo, None)
    return session


def _updates(n: int, seed: int = 0) -> list[dp.Delta]:
    base = fuzz_model()
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out.append(
            dp.Delta(
                {
                    k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype)
                    if v.is_floating_point()
                    else v
                    for k, v in base.items()
                }
            )
        )
    return out


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("entropy", [True, False])
def test_pack_remembers_nothing_that_changes_a_byte(spec: str, entropy: bool) -> None:
    layout = dp.Layout.of(fuzz_model())
    session = WireSession.create(layout, spec, base_id="m", entropy=entropy)
    reference = WireSession.create(layout, spec, base_id="m", entropy=entropy)
    for i, d in enumerate(_updates(3)):
        trees, _ = dp.Compressor(spec, error_feedback=False, seed=i).encode(d)
        warm = session.pack(trees, i)
        assert warm == _cold(reference).pack(trees, i)
    assert session._packed  # something was remembered


def test_pack_tells_apart_values_that_compare_equal() -> None:
    """True == 1 and -0.0 == 0.0 in Python, not on the wire: the remembered parts keep them apart."""
    layout = dp.Layout.of(fuzz_model())
    session = WireSession.create(layout, "randk(0.1)", base_id="m")
    reference = WireSession.create(layout, "randk(0.1)", base_id="m")
    trees, _ = dp.Compressor("randk(0.1)", error_feedback=False).encode(_updates(1)[0])
    name = "fc1.weight"
    dtype, tree = trees[name]
    seen = set()
    for seed in [1, True, 0, False, 0.0, -0.0, 1.0, float("nan"), 5, 5]:
        variant = dict(trees)
        variant[name] = (dtype, dataclasses.replace(tree, meta={**tree.meta, "seed": seed}))
        want = _cold(reference).pack(variant, 3)
        assert session.pack(variant, 3) == want
        seen.add(want)
    assert len(seen) == 9  # every distinct value framed differently (the repeated 5 alike)


def _reframe(payload: bytes, body: bytes) -> bytes:
    """``body`` (a compact frame less its checksum) with a valid CRC32C: a lie the checksum cannot catch."""
    del payload
    return body + struct.pack("<I", crc32c.crc32c(body))


def _compact(spec: str, session: WireSession, n: int, version: int = 3) -> list[bytes]:
    return [
        dp.Compressor(spec, error_feedback=False, seed=i).compress(d, base_version=version, session=session)
        for i, d in enumerate(_updates(n, seed=50))
    ]


@pytest.mark.parametrize("spec", ["identity", "topk(0.01) | quant(bits=8)", "stc(0.002)", "quant(bits=8)"])
def test_a_warm_session_refuses_what_a_cold_one_refuses(spec: str) -> None:
    """Payloads decoded after many good ones of the same skeleton (every remembered fact in place) get
    exactly the cold one-by-one result: CRC-valid lies, NaN, another base version, truncation."""
    layout = dp.Layout.of(fuzz_model())
    session = WireSession.create(layout, spec, base_id="m", entropy=False)
    good = _compact(spec, session, 4)
    decompress_many(good, session=session, expect_base=("m", 3))  # warm: skeletons and facts remembered
    p = good[0]
    skel_at = 2 + 1 + 6 + 1  # magic, version, session id, base version 3 (one varint byte)
    bad = [
        _reframe(p, p[:-4][:-7]),  # data shorter than the skeleton says
        _reframe(p, p[:-4] + b"\x00"),  # one byte more
        p[:-9],  # truncated (checksum fails)
        _compact(spec, session, 1, version=2)[0],  # another base version
        _reframe(p, p[:9] + bytes([4]) + p[10:-4]),  # base version 4 with a valid checksum
        _reframe(p, p[:skel_at] + bytes([p[skel_at] + 1]) + p[skel_at + 1 : -4]),  # skeleton length lies
    ]
    if spec == "identity":
        name = "fc1.weight"
        raw = _updates(1, seed=50)[0][name].contiguous().numpy().tobytes()
        at = p.index(raw)
        bad.append(_reframe(p, p[:at] + struct.pack("<f", float("nan")) + p[at + 4 : -4]))  # NaN
    batch = [good[1], *bad, good[2]]
    want = decode_one_by_one(batch, lambda: _cold(session), ("m", 3))
    assert all(isinstance(w, DeltaplaneError) for w in want[1:-1])
    assert isinstance(want[0], dp.Delta) and isinstance(want[-1], dp.Delta)
    assert_same_outcomes(decompress_many(batch, session=session, expect_base=("m", 3)), want)


def _whole(session: WireSession, trees: dict, base_version: int) -> bytes:
    """A compact frame with every tensor node sent whole (JSON), as a sender may, and a valid checksum:
    nothing in it is checked against the layout before the receiver reads it."""
    skeleton, data = bytearray(), bytearray()
    for _, (_, tree) in trees.items():
        raw: list = []
        text = json.dumps(_node_doc(tree, raw), separators=(",", ":")).encode()
        _put_varint(skeleton, 0)
        _put_varint(skeleton, len(text))
        skeleton += text
        for _, b in raw:
            data += bytes(b)
    head = bytearray(b"DQ\x01") + session.id
    _put_varint(head, base_version)
    _put_varint(head, len(skeleton))
    return _reframe(b"", bytes(head + skeleton + data))


def test_a_wrong_layout_sent_whole_is_refused_after_good_ones() -> None:
    """CRC-valid frames whose nodes, sent whole, declare another shape or dtype than the session's layout,
    or lengths their codec does not allow, after good frames (the same way and as changes) were read."""
    layout = dp.Layout.of(fuzz_model())
    session = WireSession.create(layout, "identity", base_id="m", entropy=False)
    trees, _ = dp.Compressor("identity", error_feedback=False).encode(_updates(1, seed=50)[0])
    good = [*_compact("identity", session, 2), _whole(session, trees, 3)]
    decompress_many(good, session=session, expect_base=("m", 3))
    name = "fc1.bias"
    dtype, tree = trees[name]
    data = tree.fields["data"]
    lies = [
        ((128,), tree.meta, data[: 4 * 128]),  # another shape
        ((256,), {"dtype": "float16"}, data[: 2 * 256]),  # another dtype
        ((2, 128), tree.meta, data),  # same size, another shape
        ((256,), tree.meta, data[:-4]),  # a length the codec does not allow
    ]
    batch = [good[0]]
    for shape, meta, field in lies:
        variant = dict(trees)
        variant[name] = (
            dtype,
            dataclasses.replace(tree, shape=shape, meta=dict(meta), fields={"data": field}),
        )
        batch.append(_whole(session, variant, 3))
    batch.append(good[2])
    want = decode_one_by_one(batch, lambda: _cold(session), ("m", 3))
    assert isinstance(want[0], dp.Delta) and isinstance(want[-1], dp.Delta)
    assert all(isinstance(w, DeltaplaneError) for w in want[1:-1])
    assert_same_outcomes(decompress_many(batch, session=session, expect_base=("m", 3)), want)


def test_fuzzed_payloads_after_good_ones_get_the_cold_errors() -> None:
    """The structure-aware fuzzer's CRC-valid lies, decoded by sessions that already read good payloads of
    each codec (remembered skeletons and facts), get the errors a cold session gives."""
    sessions, mutator = fuzz_sessions(11)
    refused = 0
    for src, session in enumerate(sessions):
        good = _compact(SPECS[src], session, 2)
        decompress_many(good, session=session, expect_base=("m", 3))
        batch = [*good, *(mutator.mutate_compact(sessions, source=src)[0] for _ in range(6))]
        random.Random(src).shuffle(batch)
        want = decode_one_by_one(batch, lambda s=session: _cold(s), ("m", 3))
        refused += sum(isinstance(w, DeltaplaneError) for w in want)
        assert_same_outcomes(decompress_many(batch, session=session, expect_base=("m", 3)), want)
    assert refused > 20


def test_a_check_that_reads_field_bytes_runs_on_every_payload() -> None:
    """An index stream's Golomb parameter is a byte of the data, not of the skeleton: a payload whose
    skeleton was seen before with a sound parameter is still refused when its own is out of range."""
    layout = dp.Layout.of(fuzz_model())
    spec = "stc(0.02)"
    session = WireSession.create(layout, spec, base_id="m", entropy=False)
    good = _compact(spec, session, 3)
    decompress_many(good, session=session, expect_base=("m", 3))
    p = good[0]
    table, _ = session.read_table(p)
    start = len(p) - 4 - len(table.body)
    golomb = [name for name, (_, t) in table.trees.items() if t.meta.get("ix") == "golomb"]
    assert golomb
    at = start + table.trees[golomb[0]][1].fields["idx"].offset
    bad = _reframe(p, p[:at] + b"\xff" + p[at + 1 : -4])
    batch = [good[1], bad, good[2]]
    want = decode_one_by_one(batch, lambda: _cold(session), ("m", 3))
    assert isinstance(want[1], DeltaplaneError) and "Golomb" in str(want[1])
    assert_same_outcomes(decompress_many(batch, session=session, expect_base=("m", 3)), want)


@pytest.mark.parametrize(
    ("spec", "remembered"),
    [
        ("identity", True),
        ("quant(bits=8)", True),
        ("stc(0.02)", False),
        ("topk(0.05) | quant(bits=4)", False),
    ],
)
def test_node_checks_are_remembered_only_where_they_read_no_bytes(spec: str, remembered: bool) -> None:
    layout = dp.Layout.of(fuzz_model())
    session = _cold(WireSession.create(layout, spec, base_id="m", entropy=False))
    decompress_many(_compact(spec, session, 3), session=session, expect_base=("m", 3))
    facts = [entry[3] for entry in session._skeletons.values()]
    assert facts and all(bool(f.get("nodes_checked")) is remembered for f in facts)
    assert all("max_inflated_bytes" in f and "lengths" in f for f in facts)
