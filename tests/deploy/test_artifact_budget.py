"""A .dpla's decoded size is bounded before anything is allocated: a few hundred bytes with valid checksums
cannot declare a 1 GiB (or 36 TiB) tensor, and a payload cannot inflate far beyond its file (the wire format's
decode budget)."""

import hashlib
import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zstandard

from deltaplane.deploy.artifact import _PREFIX, MAGIC, VERSION, read_artifact, write_artifact
from deltaplane.deploy.bundle import load_deployable
from deltaplane.errors import DecodeError


def craft(entries: list[dict], buffers: bytes = b"") -> bytes:
    """An artifact with every checksum and length right, whatever its tensor table declares."""
    table = json.dumps({"tensors": entries, "graph": None}).encode()
    payload = struct.pack("<I", len(table)) + table + buffers
    header = json.dumps(
        {
            "format": "deltaplane-artifact",
            "version": VERSION,
            "payload_nbytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "manifest": {},
        }
    ).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + zstandard.ZstdCompressor().compress(payload)


def empty_sparse(shape: list[int]) -> dict:
    return {
        "name": "w",
        "shape": shape,
        "dtype": "float32",
        "layout": "sparse",
        "nnz": 0,
        "quant": "none",
        "index_coder": "varint",
        "buffers": [[0, 0], [0, 0]],
    }


@pytest.mark.parametrize("shape", [[10**13], [2**28], [2**14, 2**14]])
def test_a_tiny_file_cannot_declare_a_huge_tensor(shape):
    data = craft([empty_sparse(shape)])
    assert len(data) < 400
    with pytest.raises(DecodeError, match="decode budget"):
        read_artifact(data)


def test_a_payload_cannot_inflate_far_beyond_its_file():
    n = 96 << 20  # 96 MiB of zeros stored dense: compresses to a few KiB, beyond 4096 × the file
    entry = {
        "name": "w",
        "shape": [n],
        "dtype": "uint8",
        "layout": "dense",
        "nnz": 0,
        "quant": "none",
        "buffers": [[0, n]],
    }
    data = craft([entry], bytes(n))
    assert len(data) < 64 << 10
    with pytest.raises(DecodeError, match="decode budget"):
        read_artifact(data)


def test_a_zstd_frame_lying_about_its_content_size_is_a_decode_error():
    # one flipped bit in the frame header (found by the corruption property test) made zstandard's one-shot
    # decompress allocate what the frame declares: MemoryError, not DecodeError
    good = craft([empty_sparse([4])])
    header_end = _PREFIX.size + _PREFIX.unpack_from(good)[2]
    # a hand-made frame: 8-byte content size 2**50, a 1 KiB window, one raw last block of one byte
    frame = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 0x00]) + (2**50).to_bytes(8, "little") + b"\x09\x00\x00" + b"x"
    with pytest.raises(DecodeError, match="declares"):
        read_artifact(good[:header_end] + frame)


def test_registry_register_path_refuses_the_bomb(tmp_path):
    p = tmp_path / "bomb.dpla"
    p.write_bytes(craft([empty_sparse([2**28])]))
    with pytest.raises(DecodeError, match="decode budget"):
        load_deployable(p)  # what `deltaplane registry register` reads


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_stays_small_in_a_fresh_process(tmp_path):
    """Measured from outside: the process that reads the 344-byte 1 GiB bomb stays far below 1 GiB."""
    p = tmp_path / "bomb.dpla"
    p.write_bytes(craft([empty_sparse([2**28])]))
    # VmHWM (peak RSS of this process's own memory map; ru_maxrss would carry the forking parent's peak)
    code = textwrap.dedent(f"""
        import re
        from deltaplane.deploy.artifact import read_artifact
        from deltaplane.errors import DecodeError

        def peak_kib():
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1))

        before = peak_kib()
        try:
            read_artifact({str(p)!r}).state_dict()
        except DecodeError:
            pass
        print(peak_kib() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) < 100 << 10, out.stdout  # KiB: under 100 MiB more than at start


def test_real_artifacts_still_read(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    w[np.abs(w) < 2.0] = 0  # ~95% sparse: decodes to far more than it stores, within the budget
    info = write_artifact(tmp_path / "m.dpla", {"w": w, "b": np.zeros(256, np.float32)}, quant="int8")
    art = read_artifact(info.path)
    assert art.tensors["w"].shape == (256, 256) and not art.tensors["b"].any()


def test_malformed_header_manifest_or_tensor_names_are_decode_errors():
    # the header is outside the payload's SHA-256: a non-object manifest raised a raw TypeError/ValueError;
    # a non-string or repeated tensor name decoded (the second silently replacing the first)
    good = craft([{**empty_sparse([4]), "name": "w"}])
    hlen = _PREFIX.unpack_from(good)[2]
    header = json.loads(good[_PREFIX.size : _PREFIX.size + hlen])
    for manifest in (5, "abc", [1]):
        h = json.dumps({**header, "manifest": manifest}).encode()
        with pytest.raises(DecodeError, match="header"):
            read_artifact(_PREFIX.pack(MAGIC, VERSION, len(h)) + h + good[_PREFIX.size + hlen :])
    with pytest.raises(DecodeError, match="malformed tensor entry"):
        read_artifact(craft([{**empty_sparse([4]), "name": 5}]))
    with pytest.raises(DecodeError, match="twice"):
        read_artifact(craft([empty_sparse([4]), empty_sparse([4])]))
