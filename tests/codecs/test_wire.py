"""Wire format v1: exact layout, strict decoding, and fuzzing with random mutations of valid payloads."""

import contextlib
import json
import random
import struct
import zlib

import crc32c
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltaplane as dp
from deltaplane.codecs.wire import FRAME_OVERHEAD, HEADER_DICT, MAGIC, Limits, unpack

SPECS = [
    "identity",
    "fp16",
    "bf16",
    "quant(bits=3, stochastic=true, chunk=64)",
    "quant(bits=1, stochastic=true, chunk=32, scale=norm)",
    "topk(0.05) | quant(bits=8)",
    "topk(0.3)",
    "topk(0.1, approx=true)",
    "sign",
    "ternary(chunk=16)",
    "randk(0.2, unbiased=true) | quant(bits=4)",
    "threshold(tau=0.8)",
    "stc(0.05)",
    "powersgd(rank=2, min_size=16) | quant(bits=8, chunk=8)",
    "topk(0.2) | quant(bits=8) | zstd(level=3)",
    "policy(rules='*.bias: fp16; fc.*: stc(0.1); *: powersgd(rank=1, min_size=0, fallback=sign)')",
]


def test_every_registered_codec_is_fuzzed() -> None:
    named = {stage.split("(")[0].strip() for spec in SPECS for stage in spec.split("|")}
    named |= {"powersgd", "stc", "sign"}  # inside the policy rules
    assert set(dp.available_codecs()) - {"pipeline"} <= named


def _delta(seed: int = 0) -> dp.Delta:
    g = torch.Generator().manual_seed(seed)
    return dp.Delta(
        {
            "conv.weight": torch.randn(8, 1, 3, 3, generator=g),
            "fc.weight": torch.randn(10, 64, generator=g),
            "fc.bias": torch.randn(10, generator=g),
            "steps": torch.tensor([3], dtype=torch.int64),
        }
    )


def _payload(spec: str, seed: int = 0) -> bytes:
    return dp.Compressor(spec, error_feedback=False, seed=seed).compress(
        _delta(seed), base_id="cnn", base_version=4
    )


def _same(a: dp.Delta, b: dp.Delta) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32c.crc32c(body))


def _inflate_dict(raw: bytes) -> bytes:
    d = zlib.decompressobj(-15, zdict=HEADER_DICT)
    return d.decompress(raw) + d.flush()


def _header(payload: bytes) -> tuple[dict, int, bytes]:
    _, _, flags, hlen = struct.unpack_from("<4sBBI", payload)
    raw = payload[10 : 10 + hlen]
    doc = json.loads(zlib.decompress(raw) if flags & 1 else _inflate_dict(raw) if flags & 4 else raw)
    return doc, hlen, payload[10 + hlen : -4]


def _repack(doc: dict, body: bytes) -> bytes:
    raw = json.dumps(doc).encode()
    return _with_crc(MAGIC + bytes([1, 0]) + struct.pack("<I", len(raw)) + raw + body)


# -- layout ----------------------------------------------------------------------------------------------
def test_exact_layout_and_byte_count() -> None:
    d = dp.Delta({"w": torch.tensor([1.0, -2.0])})
    p = dp.Compressor("identity", error_feedback=False).compress(d, base_id="m", base_version=1)
    raw = json.dumps(
        {
            "base": ["m", 1],
            "codec": "identity",
            "t": [
                [
                    "w",
                    "float32",
                    {"c": "identity", "s": [2], "m": {"dtype": "float32"}, "f": {"data": 8}},
                ]
            ],
        },
        separators=(",", ":"),
    ).encode()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=HEADER_DICT)
    options = [(0, raw), (1, zlib.compress(raw, 9)), (4, deflater.compress(raw) + deflater.flush())]
    flag, head = min(options, key=lambda o: len(o[1]))
    assert flag == 4  # the preset dictionary wins on a typical header
    assert p[:4] == b"DPLN" and p[4] == 1 and p[5] == flag
    assert struct.unpack_from("<I", p, 6)[0] == len(head)
    assert len(p) == FRAME_OVERHEAD + len(head) + 8 == 14 + len(head) + 8
    assert p[10 + len(head) : -4] == struct.pack("<2f", 1.0, -2.0)
    assert struct.unpack("<I", p[-4:])[0] == crc32c.crc32c(p[:-4])


@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_and_header(spec: str) -> None:
    p = _payload(spec)
    out = dp.decompress(p, expect_base=("cnn", 4))
    assert list(out) == list(_delta())
    assert out["steps"].tolist() == [3]
    h = dp.read_header(p)
    assert (h.base_id, h.base_version, h.codec) == ("cnn", 4, dp.get_codec(spec).spec)


def test_wrong_base_version_is_refused() -> None:
    with pytest.raises(dp.VersionMismatch, match="v4"):
        dp.decompress(_payload("identity"), expect_base=("cnn", 5))


# -- strict decoding: frame ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p[:5], "truncated"),
        (lambda p: b"XPLN" + p[4:], "bad magic"),
        (lambda p: p[:4] + b"\x02" + p[5:], "unsupported format version 2"),
        (lambda p: p[:5] + b"\x80" + p[6:], "unknown flag"),
        (lambda p: p[:6] + struct.pack("<I", 10**9) + p[10:], "exceeds"),
        (lambda p: p[:6] + struct.pack("<I", len(p)) + p[10:], "truncated"),
        (lambda p: p[:-1], "checksum"),
        (lambda p: p[:20] + bytes([p[20] ^ 1]) + p[21:], "checksum"),
        (lambda p: p + b"\x00", "checksum"),
        (lambda p: "text", "expected bytes"),
    ],
)
def test_frame_errors(mutate, message: str) -> None:
    with pytest.raises(dp.DecodeError, match=message):
        dp.decompress(mutate(_payload("topk(0.05) | quant(bits=8)")))


# -- strict decoding: header and fields (valid checksum, so the structural checks are what catches it) --
def _structural(doc_mutation) -> bytes:
    doc, _, body = _header(_payload("topk(0.05) | quant(bits=8)"))
    doc_mutation(doc)
    return _repack(doc, body)


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda d: d["t"][1].__setitem__(1, "complex128"), "unknown dtype"),
        (lambda d: d["t"][1][2].__setitem__("c", "zstd9"), "unknown codec"),
        (lambda d: d["t"][1][2].__setitem__("s", [10, 65]), "values, expected|positions|bytes"),
        (lambda d: d["t"][1][2].__setitem__("s", [-1]), "non-negative"),
        (lambda d: d["t"][1][2]["f"].__setitem__("idx", [5, 3]), "byte length"),
        (lambda d: d["t"][1][2]["f"].__setitem__("idx", -1), "byte length"),
        (lambda d: d["t"][1][2]["f"].__setitem__("idx", 10**9), "claims"),
        (lambda d: d["t"][1][2]["f"].__setitem__("idx", d["t"][1][2]["f"]["idx"] + 1), "claims|bytes"),
        (lambda d: d["t"].append(d["t"][0]), "twice"),
        (lambda d: d["t"].pop(), "trailing payload"),
        (lambda d: d.__setitem__("base", "cnn"), "base"),
        (lambda d: d.__setitem__("extra", 1), "unknown or missing"),
        (lambda d: d["t"][1][2].__setitem__("m", {"ix": "gzip"}), "unknown index coder"),
        (lambda d: d["t"][1][2].__setitem__("m", {"ix": {"a": 1}}), "meta"),
        (lambda d: d["t"][1][2]["f"]["values"].__setitem__("c", "topk(0.5) | quant(bits=8)"), "one codec"),
        (lambda d: d["t"][1].__setitem__(0, 7), "rows"),
        (lambda d: d["t"][1][2]["f"]["values"]["f"].__setitem__("codes", "x"), "byte length"),
    ],
)
def test_structural_errors(mutation, message: str) -> None:
    with pytest.raises(dp.DecodeError, match=message):
        dp.decompress(_structural(mutation))


def test_limits_are_enforced() -> None:
    p = _payload("identity")
    with pytest.raises(dp.DecodeError, match="tensor limit"):
        unpack(p, limits=Limits(max_tensors=2))
    with pytest.raises(dp.DecodeError, match="header"):
        unpack(p, limits=Limits(max_header_bytes=10))
    deep = {"c": "identity", "s": [1], "f": {}}
    for _ in range(20):
        deep = {"c": "topk(ratio=1.0)", "s": [1], "f": {"values": deep}}
    doc = {"base": ["", 0], "codec": "", "t": [["w", "float32", deep]]}
    with pytest.raises(dp.DecodeError, match="deeper"):
        dp.decompress(_repack(doc, b""))


def test_nan_values_are_refused() -> None:
    doc, _, body = _header(_payload("identity"))
    body = bytearray(body)
    body[0:4] = struct.pack("<f", float("nan"))
    with pytest.raises(dp.DecodeError, match="NaN"):
        dp.decompress(_repack(doc, bytes(body)))


def test_bad_json_header() -> None:
    body = MAGIC + bytes([1, 0]) + struct.pack("<I", 5) + b"[[[[["
    with pytest.raises(dp.DecodeError, match="JSON"):
        dp.decompress(_with_crc(body))
    bomb = zlib.compress(b" " * (1 << 20))
    with pytest.raises(dp.DecodeError, match="header"):
        unpack(_with_crc(MAGIC + bytes([1, 1]) + struct.pack("<I", len(bomb)) + bomb), limits=Limits(4096))


# -- fuzzing ---------------------------------------------------------------------------------------------
def _mutate(p: bytes, rnd: random.Random) -> bytes:
    b = bytearray(p)
    kind = rnd.randrange(7)
    if kind == 0:  # flip one bit
        i = rnd.randrange(len(b))
        b[i] ^= 1 << rnd.randrange(8)
    elif kind == 1:  # overwrite a few bytes
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
    elif kind == 2:  # truncate
        del b[rnd.randrange(len(b)) :]
    elif kind == 3:  # append garbage
        b += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
    elif kind == 4:  # delete a slice
        i = rnd.randrange(len(b))
        del b[i : i + rnd.randint(1, 8)]
    elif kind == 5:  # duplicate a slice
        i = rnd.randrange(len(b))
        b[i:i] = b[i : i + rnd.randint(1, 8)]
    else:  # swap two bytes
        i, j = rnd.randrange(len(b)), rnd.randrange(len(b))
        b[i], b[j] = b[j], b[i]
    return bytes(b)


def _check_one(payload: bytes, original: dp.Delta) -> str:
    try:
        out = dp.decompress(payload)
    except dp.DecodeError:
        return "rejected"
    assert _same(out, original), "a mutated payload decoded to a different delta"
    return "exact"


def test_fuzz_ten_thousand_mutations() -> None:
    rnd = random.Random(1234)
    originals = [(_payload(s, seed=i), dp.decompress(_payload(s, seed=i))) for i, s in enumerate(SPECS)]
    outcomes = {"rejected": 0, "exact": 0}
    for _ in range(10_000):
        payload, original = originals[rnd.randrange(len(originals))]
        outcomes[_check_one(_mutate(payload, rnd), original)] += 1
    assert sum(outcomes.values()) == 10_000
    assert outcomes["rejected"] > 9_900  # swaps of equal bytes are the only harmless mutations


@given(spec=st.sampled_from(SPECS), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_hypothesis_mutations(spec: str, seed: int) -> None:
    payload = _payload(spec)
    _check_one(_mutate(payload, random.Random(seed)), dp.decompress(payload))


@given(spec=st.sampled_from(SPECS), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutations_behind_a_valid_checksum(spec: str, seed: int) -> None:
    """With the CRC recomputed, only the structural checks stand between a mutation and a wrong tensor:
    every outcome must be a clean DecodeError or a well-formed delta of the declared layout."""
    rnd = random.Random(seed)
    mutated = _mutate(_payload(spec)[:-4], rnd)
    try:
        out = dp.decompress(_with_crc(mutated))
    except dp.DecodeError:
        return
    for t in out.values():
        assert not t.is_floating_point() or bool(torch.isfinite(t).all())


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=300, deadline=None)
def test_fuzz_header_json_behind_a_valid_checksum(seed: int) -> None:
    rnd = random.Random(seed)
    doc, _, body = _header(_payload(rnd.choice(SPECS)))
    text = bytearray(json.dumps(doc).encode())
    for _ in range(rnd.randint(1, 3)):
        text[rnd.randrange(len(text))] = rnd.choice(b'0123456789[]{}",:-.aetrfnul ')
    with contextlib.suppress(dp.DecodeError):
        dp.decompress(_with_crc(MAGIC + bytes([1, 0]) + struct.pack("<I", len(text)) + bytes(text) + body))


def test_header_compressions_are_exclusive_and_dictionary_is_used() -> None:
    p = _payload("stc(0.1)")
    assert p[5] & 4  # the preset dictionary beats plain zlib on a real header
    with pytest.raises(dp.DecodeError, match="exclusive"):
        dp.decompress(_with_crc(p[:5] + bytes([p[5] | 1]) + p[6:-4]))
    with pytest.raises(dp.DecodeError, match="corrupt|truncated"):
        dp.decompress(_with_crc(p[:5] + bytes([1]) + p[6:-4]))  # a dictionary stream read as zlib


@pytest.mark.parametrize(
    "header",
    [
        {"base_version": 1.5},  # framed, then refused by every reader ("'base' must be [model id, version]")
        {"base_version": True},
        {"base_version": -1},  # the compact writer refused it; the self-describing one framed it
        {"base_id": 7},
        {"meta": {"x": float("nan")}},  # json's bare ValueError
        {"meta": {"x": torch.ones(1)}},  # json's bare TypeError
        {"meta": {1: "a"}},  # came back as {"1": "a"}
    ],
)
def test_the_writer_refuses_headers_the_reader_would_refuse_or_change(header: dict) -> None:
    d = dp.Delta({"w": torch.ones(4)})
    with pytest.raises(dp.CodecError, match="payload header"):
        dp.Compressor("fp16", error_feedback=False).compress(d, **header)
    with pytest.raises(dp.CodecError, match="payload header"):
        dp.codecs.compress_many(
            [dp.Compressor("fp16", error_feedback=False)], {"w": torch.ones(1, 4)}, **header
        )
    good = dp.Compressor("fp16").compress(d, base_id="m", base_version=2, meta={"round": 3, "tags": ["a"]})
    assert dp.codecs.read_header(good) == dp.codecs.WireHeader("m", 2, "fp16", {"round": 3, "tags": ["a"]})


@pytest.mark.parametrize("compact", [False, True])
def test_a_refused_header_leaves_the_error_feedback_state_as_it_was(compact: bool) -> None:
    """The header was checked after encoding (the compact writer's base version check, and json's), so a
    refused compress() had already moved the residual, the generator and the round count on for a payload
    that was never made: what error feedback carries was lost."""
    g = torch.Generator().manual_seed(1)
    d = dp.Delta({"w": torch.randn(30, 4, generator=g)})
    session = dp.codecs.WireSession.create(dp.Layout.of(d), "topk(0.2) | quant(bits=4)") if compact else None
    comp = dp.Compressor("topk(0.2) | quant(bits=4)", seed=0)
    twin = dp.Compressor("topk(0.2) | quant(bits=4)", seed=0)
    assert comp.compress(d, base_version=1, session=session) == twin.compress(
        d, base_version=1, session=session
    )
    with pytest.raises(dp.CodecError, match="base version"):
        comp.compress(d * 2.0, base_version=-1, session=session)
    assert comp.state.rounds == twin.state.rounds == 1
    assert torch.equal(comp.state.residual["w"], twin.state.residual["w"])
    assert comp.compress(d, base_version=2, session=session) == twin.compress(
        d, base_version=2, session=session
    )


# -- the base fingerprint in meta ------------------------------------------------------------------------
def _recorded() -> tuple[dict, dp.Delta]:
    base = dict(_delta(1))
    return base, dp.Delta.between(base, {k: v + 1 for k, v in base.items()}, record_base=True)


def test_a_recorded_base_travels_in_meta_and_is_checked_on_apply() -> None:
    base, d = _recorded()
    p = dp.Compressor("identity", error_feedback=False).compress(
        d, base_id="cnn", base_version=4, meta={"r": 1}
    )
    assert dp.read_header(p).meta == {"r": 1, "deltaplane.base_sha256": dp.base_fingerprint(base)}
    got = dp.decompress(p, expect_base=("cnn", 4))
    assert got.base_sha256 == d.base_sha256 and _same(got, d)
    with pytest.raises(dp.BaseMismatch):
        got.apply(dict(_delta(2)))
    # a payload without the key (every payload before it existed) decodes as before, with no record
    old = _payload("identity")
    assert "meta" not in _header(old)[0] and dp.decompress(old).base_sha256 is None
    with pytest.raises(dp.CodecError, match="names another base"):
        dp.Compressor("identity").compress(d, meta={"deltaplane.base_sha256": "0" * 64})


@pytest.mark.parametrize(
    "bad",
    [None, 7, ["0" * 64], "0" * 63, "0" * 65, "F" * 64, "g" * 64, " " + "0" * 63, "0" * (1 << 20)],
)
def test_a_bad_fingerprint_behind_a_valid_checksum_is_refused(bad) -> None:
    _, d = _recorded()
    doc, _, body = _header(dp.Compressor("identity", error_feedback=False).compress(d, base_id="cnn"))
    doc["meta"]["deltaplane.base_sha256"] = bad
    forged = _repack(doc, body)  # a well-formed frame, checksum and all
    for read in (dp.decompress, dp.read_header):
        with pytest.raises(dp.DecodeError, match="not a base fingerprint") as err:
            read(forged)
        assert len(str(err.value)) < 300  # the value is not echoed back, however large
    with pytest.raises(dp.CodecError, match="payload header: meta 'deltaplane.base_sha256'"):
        dp.Compressor("identity").compress(_delta(), meta={"deltaplane.base_sha256": bad})
