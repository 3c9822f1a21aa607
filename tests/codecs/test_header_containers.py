"""A header's objects and arrays are bounded by its size before it is parsed (``Limits.header_containers``).

Below the value limit, an uncompressed (or zlib) header of ``[{},{},...]`` still made ``json.loads`` spend ~26
bytes of Python objects a header byte (tracemalloc peak of ``read_table``), against 12-18 for an honest header of
any codec: each container costs ~60-70 bytes of objects for 2-3 bytes of JSON, where an honest header spends at
least 15 bytes on one. A whole JSON node in a compact frame is bounded the same way.
"""

import struct
import tracemalloc

import crc32c
import pytest
import torch

import deltaplane as dp
from deltaplane.codecs.fuzzing import SPECS
from deltaplane.codecs.session import COMPACT_MAGIC, WireSession
from deltaplane.codecs.wire import _CRC, _PREFIX, MAGIC, VERSION, Limits, read_table
from deltaplane.errors import DecodeError


def _payload(raw: bytes) -> bytes:
    """A payload whose uncompressed header JSON is ``raw``, its body empty and its CRC right."""
    frame = _PREFIX.pack(MAGIC, VERSION, 0, len(raw)) + raw
    return frame + _CRC.pack(crc32c.crc32c(frame))


def _meta_list(items: list[bytes]) -> bytes:
    return b'{"t":[],"meta":{"x":[' + b",".join(items) + b"]}}"


@pytest.mark.parametrize("unit", [b"{}", b"[]"])
def test_a_header_of_empty_containers_is_refused_before_it_is_parsed(unit: bytes) -> None:
    """Uncompressed, so the payload is as large as its header and the value limit (2^17 + 16 a payload byte)
    lets it through; a zlib header this dense is refused by the value limit already."""
    raw = _meta_list([unit] * 300_000)  # ~900 KB: 600,000 values, under the value limit of a 900 KB payload
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=r"header holds 300004 JSON objects and arrays in 900023 bytes"):
            read_table(_payload(raw))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(raw)  # the header's bytes, never its parse (was ~26x: 23 MB for this one)


def test_the_container_limit_is_exact() -> None:
    limits = Limits(min_header_containers=10, header_bytes_per_container=1 << 30)

    def header(lists: int) -> bytes:  # containers: the outer object, "t", "meta", "x" and the lists
        return _meta_list([b"[]"] * lists)

    assert len(dp.decompress(_payload(header(6)), limits=limits)) == 0
    with pytest.raises(DecodeError, match="more than the 10 its size allows"):
        dp.decompress(_payload(header(7)), limits=limits)
    per_byte = Limits(min_header_containers=0, header_bytes_per_container=12)
    text = header(6)  # 10 containers need 120 bytes
    padded = text[:-3] + b',"' + b"p" * (120 - (len(text) - 3) - 6) + b'"]}}'
    assert len(padded) == 120 and len(dp.decompress(_payload(padded), limits=per_byte)) == 0
    with pytest.raises(DecodeError, match="more than the 9 its size allows"):
        dp.decompress(_payload(padded[:-5] + b'"]}}'), limits=per_byte)


@pytest.mark.parametrize("spec", SPECS)
def test_honest_headers_of_every_codec_fit_without_the_floor(spec: str) -> None:
    """The densest honest headers (one-character names, empty and tiny tensors) hold at most one container
    in 15 bytes, within the per-byte allowance alone; sender metadata of a few lists too."""
    g = torch.Generator().manual_seed(0)
    model = {chr(65 + i): torch.randn((i % 3) * 4, 8, generator=g) for i in range(40)}
    model |= {f"{chr(97 + i)}.bias": torch.randn(0 if i % 2 else 8, generator=g) for i in range(20)}
    limits = Limits(min_header_containers=0)
    meta = {"round": 3, "clients": [[1, 2], [3, 4]]}
    payload = dp.Compressor(spec, seed=0, error_feedback=False).compress(
        dp.Delta(model), base_id="m", base_version=1, meta=meta
    )
    got = dp.decompress(payload, expect_layout=model, limits=limits)
    assert sorted(got) == sorted(model)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def test_a_whole_node_of_empty_containers_in_a_compact_frame_is_refused_before_it_is_parsed() -> None:
    model = {"fc.weight": torch.zeros(8, 16), "fc.bias": torch.zeros(8)}
    s = WireSession.create(dp.Layout.of(model), "topk(0.1) | quant(bits=4)", base_id="cnn")
    node = b'{"c":"identity","s":[8,16],"f":{},"x":[' + b",".join([b"{}"] * 100_000) + b"]}"
    skeleton = b"\x00" + _varint(len(node)) + node + b"\x01"
    body = COMPACT_MAGIC + b"\x01" + s.id + _varint(4) + _varint(len(skeleton)) + skeleton
    frame = body + struct.pack("<I", crc32c.crc32c(body))
    with pytest.raises(DecodeError, match=r"tensor 'fc.weight': node holds 100004 JSON objects and arrays"):
        dp.decompress(frame, session=s)
