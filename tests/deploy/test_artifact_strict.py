"""A .dpla's header and tensor table are read strictly: every CRC- and SHA-valid file whose JSON lies about a
size, a shape or a byte range is a DecodeError naming the field, never an OverflowError (``Infinity`` as a
size), a TypeError (``"tensors": 5``), a ValueError (``"group_size": "x"``) or a RecursionError (nesting)."""

import copy
import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from deltaplane.deploy.artifact import _PREFIX, MAGIC, VERSION, read_artifact, write_artifact
from deltaplane.errors import DecodeError


def _parts(tmp_path: Path) -> tuple[dict, dict, bytes]:
    """A real artifact's header, tensor table and buffer area (one int8 matrix, one sparse vector)."""
    path = tmp_path / "a.dpla"
    tensors = {"w": np.ones((4, 8), np.float32), "b": np.array([0, 1, 2, 3], np.float32)}
    write_artifact(path, tensors, quant="int8", group_size=8)
    return _parts_of(path)


def _frame(header: dict, table_json: bytes, buffers: bytes, header_json: bytes | None = None) -> bytes:
    """An artifact with its payload size and SHA-256 right, whatever its JSON says."""
    payload = struct.pack("<I", len(table_json)) + table_json + buffers
    h = dict(header, payload_nbytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    hb = header_json if header_json is not None else json.dumps(h).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(hb)) + hb + zstandard.ZstdCompressor().compress(payload)


def _set(key: str, value: Any, entry: int = 0) -> Callable[[dict], None]:
    return lambda t: t["tensors"][entry].__setitem__(key, value)


TABLE_LIES = {
    "group_size text": (_set("group_size", "x"), "bad group_size 'x'"),
    "group_size list": (_set("group_size", [8]), "bad group_size"),
    "group_size 0": (_set("group_size", 0), "bad group_size 0"),
    "shape text": (_set("shape", "48"), "shape must list"),
    "shape float": (_set("shape", [4.0, 8]), "shape must list"),
    "shape bool": (_set("shape", [True, 32]), "shape must list"),
    "nnz float": (_set("nnz", 3.0, entry=1), "nnz 3.0 is not an integer"),
    "nnz beyond n": (_set("nnz", 5, entry=1), "nnz 5 is not an integer in 0..4"),
    "tensors int": (lambda t: t.__setitem__("tensors", 5), "listing at most"),
    "buffers int": (_set("buffers", 5), "buffers must list"),
    "buffers triple": (_set("buffers", [[0, 1, 2], [1, 1]]), "buffers must list"),
    "index_coder list": (_set("index_coder", ["bitmap"], entry=1), "index_coder must be a string"),
    "dtype list": (_set("dtype", ["float32"]), "unknown dtype"),
    "graph text": (lambda t: t.__setitem__("graph", "ab"), "graph must be an .offset, length. pair"),
    "graph negative": (lambda t: t.__setitem__("graph", [-1, 2]), "graph must be an .offset, length. pair"),
}


@pytest.mark.parametrize("lie", sorted(TABLE_LIES))
def test_a_lying_tensor_table_is_a_decode_error_naming_the_field(tmp_path: Path, lie: str) -> None:
    header, table, buffers = _parts(tmp_path)
    mutate, match = TABLE_LIES[lie]
    t = copy.deepcopy(table)
    mutate(t)
    with pytest.raises(DecodeError, match=match):
        read_artifact(_frame(header, json.dumps(t).encode(), buffers))


@pytest.mark.parametrize(
    ("field", "replace"),
    [("nnz", '"nnz": 3'), ("shape", '"shape": [4, 8]')],
)
def test_infinity_as_a_size_is_a_decode_error(tmp_path: Path, field: str, replace: str) -> None:
    """Python's json reads ``Infinity``, and ``int(Infinity)`` raised OverflowError."""
    header, table, buffers = _parts(tmp_path)
    text = json.dumps(table)
    assert replace in text
    lied = text.replace(replace, f'"{field}": Infinity' if field == "nnz" else '"shape": [Infinity, 8]', 1)
    with pytest.raises(DecodeError, match="Infinity is not a JSON number"):
        read_artifact(_frame(header, lied.encode(), buffers))


def test_a_lying_header_is_a_decode_error(tmp_path: Path) -> None:
    header, table, buffers = _parts(tmp_path)
    tj = json.dumps(table).encode()
    good = _frame(header, tj, buffers)
    assert read_artifact(good).tensors["b"].tolist() == [0, 1, 2, 3]
    _, _, hlen = _PREFIX.unpack_from(good)
    h = json.loads(good[_PREFIX.size : _PREFIX.size + hlen])
    lies = {
        "payload Infinity": json.dumps(h).replace(
            f'"payload_nbytes": {h["payload_nbytes"]}', '"payload_nbytes": Infinity'
        ),
        "payload text": json.dumps(dict(h, payload_nbytes=str(h["payload_nbytes"]))),
        "manifest int": json.dumps(dict(h, manifest=5)),
        "header list": "[1, 2]",
        "header nested": "[" * 100_000 + "]" * 100_000,
    }
    for text in lies.values():
        with pytest.raises(DecodeError, match="artifact header"):
            read_artifact(_frame(header, tj, buffers, header_json=text.encode()))


def test_a_tensor_table_nested_past_the_recursion_limit_is_a_decode_error(tmp_path: Path) -> None:
    header, _, buffers = _parts(tmp_path)
    deep = b'{"tensors":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(DecodeError, match="tensor table is not valid JSON .RecursionError"):
        read_artifact(_frame(header, deep, buffers))


def test_a_deploy_manifest_nested_past_the_recursion_limit_is_a_decode_error(tmp_path: Path) -> None:
    """A folder's manifest.json of 100,000 nested lists raised RecursionError from ``registry register``."""
    from deltaplane.deploy.bundle import _folder_manifest

    mf = tmp_path / "manifest.json"
    mf.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DecodeError, match="is not valid JSON: maximum recursion depth"):
        _folder_manifest(mf, "0" * 64)


@pytest.mark.parametrize("group_size", [8, 9, 2**63, 2**64, 10**30])
def test_a_group_beyond_the_values_is_one_group_not_an_overflow(tmp_path: Path, group_size: int) -> None:
    """A group_size of 2**63 or more (hashes valid) raised numpy's OverflowError; any group at least as long
    as the tensor is its one group, as the writer means it."""
    path = tmp_path / "g.dpla"
    values = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    write_artifact(path, {"w": values}, quant="int8", group_size=8)
    header, table, buffers = _parts_of(path)
    want = read_artifact(path).tensors["w"]
    table["tensors"][0]["group_size"] = group_size
    got = read_artifact(_frame(header, json.dumps(table).encode(), buffers)).tensors["w"]
    assert np.array_equal(got, want)


def _parts_of(path: Path) -> tuple[dict, dict, bytes]:
    """An artifact file's header, tensor table and buffer area."""
    data = path.read_bytes()
    _, _, hlen = _PREFIX.unpack_from(data)
    header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen])
    payload = zstandard.ZstdDecompressor().decompress(data[_PREFIX.size + hlen :])
    (tlen,) = struct.unpack_from("<I", payload)
    return header, json.loads(payload[4 : 4 + tlen]), payload[4 + tlen :]
