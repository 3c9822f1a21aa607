"""The zstd final stage: smaller payloads, identical tensors, strict and bounded inflation."""

import json
import struct

import crc32c
import pytest
import torch
import zstandard

import deltaplane as dp
from deltaplane.codecs.lossless import zstd_compress, zstd_decompress
from deltaplane.codecs.wire import MAGIC, Limits, unpack


def _delta() -> dp.Delta:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 100, generator=g)
    w[w.abs() < 1.0] = 0  # sparse-ish: quantization codes repeat, zstd finds them
    return dp.Delta({"w": w, "b": torch.zeros(100)})


def test_zstd_shrinks_the_payload_and_decodes_identically() -> None:
    d = _delta()
    plain = dp.Compressor("quant(bits=8)", error_feedback=False).compress(d)
    packed = dp.Compressor("quant(bits=8) | zstd(level=9)", error_feedback=False).compress(d)
    assert len(packed) < 0.6 * len(plain)
    assert packed[5] & 0x02 and not plain[5] & 0x02
    a, b = dp.decompress(plain), dp.decompress(packed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    alone = dp.Compressor("zstd", error_feedback=False).compress(d)  # identity + zstd
    assert dp.decompress(alone).allclose(d, rtol=0, atol=0)
    assert len(alone) < 0.6 * d.nbytes


def test_codec_encode_skips_the_payload_stage() -> None:
    c = dp.get_codec("quant(bits=8) | zstd")
    e = c.encode(torch.ones(10), torch.Generator())
    assert e.codec.startswith("quant")
    with pytest.raises(dp.CodecError, match="last stage"):
        dp.get_codec("zstd").encode(torch.ones(3), torch.Generator())


def _frame(doc: dict, data: bytes) -> bytes:
    raw = json.dumps(doc).encode()
    body = MAGIC + bytes([1, 0x02]) + struct.pack("<I", len(raw)) + raw + data
    return body + struct.pack("<I", crc32c.crc32c(body))


def _doc(length: int) -> dict:
    node = {"c": "identity", "s": [length // 4], "m": {"dtype": "float32"}, "f": {"data": length}}
    return {"base": ["", 0], "codec": "zstd", "t": [["w", "float32", node]]}


def test_decompression_bomb_is_refused_before_inflating() -> None:
    bomb = zstd_compress(bytes(1 << 24), 19)  # 16 MiB of zeros in a few hundred bytes
    assert len(bomb) < 2000
    with pytest.raises(dp.DecodeError, match="beyond the 1048576-byte limit"):
        unpack(_frame(_doc(1 << 24), bomb), limits=Limits(max_inflated_bytes=1 << 20))
    # a frame claiming more (or less) than the table's buffers is refused from its header alone
    with pytest.raises(dp.DecodeError, match="declares 16777216 bytes, the header expects 4096"):
        dp.decompress(_frame(_doc(4096), bomb))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (zstd_compress(bytes(64), 3) + b"xx", "follow the zstd frame"),
        (zstd_compress(bytes(64), 3)[:-3], "truncated|corrupt"),
        (b"\x00" * 12, "frame header is invalid"),
        (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64)), "declares"),
    ],
)
@pytest.mark.parametrize("as_view", [False, True])
def test_malformed_frames(frame: bytes, message: str, as_view: bool) -> None:
    # read_body hands the decompressor a view of the payload (no copy): the same frames are refused through it
    given = memoryview(b"pad" + frame + b"pad")[3:-3] if as_view else frame
    with pytest.raises(dp.DecodeError, match=message):
        zstd_decompress(given, 64)


def test_a_view_of_a_frame_reads_only_the_view() -> None:
    """The bytes around a payload's body (its CRC after it) are not the frame's trailing data."""
    frame = zstd_compress(bytes(range(64)), 3)
    assert zstd_decompress(memoryview(b"head" + frame + b"crc!")[4:-4], 64) == bytes(range(64))


def test_header_zlib_and_zstd_flags_together() -> None:
    d = dp.Delta({f"layer{i}.weight": torch.zeros(4) for i in range(50)})
    p = dp.Compressor("fp16 | zstd", error_feedback=False).compress(d)
    assert p[5] in (0x03, 0x06)  # zstd body, and a compressed header (zlib or preset dictionary)
    assert dp.decompress(p).allclose(d)
