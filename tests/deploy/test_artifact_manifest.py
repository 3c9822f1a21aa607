"""A .dpla's manifest is bound to its hashed payload: the tensor table records the manifest's SHA-256, so a
header manifest edited after writing (a gate turned to passed, an accuracy raised) is a DecodeError although
the payload's size and SHA-256 still match; an artifact from before the binding reads with a warning."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from tests.deploy.test_artifact_strict import _frame, _parts

from deltaplane.deploy.artifact import _PREFIX, MAGIC, VERSION, read_artifact, write_artifact
from deltaplane.errors import ConfigError, DecodeError

MANIFEST = {"quality": {"accuracy": 0.91}, "gates": {"passed": False}, "note": "naïve ✓", "ratio": 0.1}


def _written(tmp_path: Path) -> bytes:
    path = tmp_path / "m.dpla"
    write_artifact(
        path, {"w": np.arange(32, dtype=np.float32).reshape(4, 8)}, quant="int8", manifest=MANIFEST
    )
    return path.read_bytes()


def _with_header(data: bytes, edit: dict) -> bytes:
    """``data`` with its (unhashed) header JSON replaced by ``edit`` applied to it; the payload untouched."""
    _, _, hlen = _PREFIX.unpack_from(data)
    header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen]) | edit
    hb = json.dumps(header).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(hb)) + hb + data[_PREFIX.size + hlen :]


def test_the_manifest_round_trips_and_is_bound(tmp_path: Path) -> None:
    from deltaplane.deploy.artifact import manifest_sha256

    data = _written(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bound artifact reads without the legacy warning
        art = read_artifact(data)
    assert art.manifest == MANIFEST
    assert manifest_sha256(MANIFEST).encode() in _decompressed(data)


def _decompressed(data: bytes) -> bytes:
    import zstandard

    _, _, hlen = _PREFIX.unpack_from(data)
    return zstandard.ZstdDecompressor().decompress(data[_PREFIX.size + hlen :])


@pytest.mark.parametrize(
    "edit",
    [
        {"manifest": MANIFEST | {"gates": {"passed": True}}},
        {"manifest": MANIFEST | {"quality": {"accuracy": 0.99}}},
        {"manifest": {}},
        {"manifest": {k: v for k, v in MANIFEST.items() if k != "note"}},
    ],
    ids=["gate passed", "accuracy raised", "emptied", "key removed"],
)
def test_an_edited_manifest_is_a_decode_error(tmp_path: Path, edit: dict) -> None:
    """The payload and its SHA-256 are the writer's, only the header's manifest changed: it loaded before."""
    with pytest.raises(DecodeError, match="manifest does not match the SHA-256 its tensor table records"):
        read_artifact(_with_header(_written(tmp_path), edit))


def test_the_same_manifest_respelled_still_reads(tmp_path: Path) -> None:
    """The hash is of the manifest as parsed: spacing and key escapes in the header do not matter."""
    data = _written(tmp_path)
    _, _, hlen = _PREFIX.unpack_from(data)
    header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen])
    hb = json.dumps(header, indent=2, ensure_ascii=False).encode()
    respelled = _PREFIX.pack(MAGIC, VERSION, len(hb)) + hb + data[_PREFIX.size + hlen :]
    assert read_artifact(respelled).manifest == MANIFEST


@pytest.mark.parametrize("recorded", ["AB" * 32, "0" * 63, 5, ["0" * 64]])
def test_a_malformed_recorded_hash_is_a_decode_error(tmp_path: Path, recorded: object) -> None:
    header, table, buffers = _parts(tmp_path)
    table["manifest_sha256"] = recorded
    with pytest.raises(DecodeError, match="manifest_sha256 must be 64 lowercase hex digits"):
        read_artifact(_frame(header, json.dumps(table).encode(), buffers))


def test_an_artifact_from_before_the_binding_reads_with_a_warning(tmp_path: Path) -> None:
    header, table, buffers = _parts(tmp_path)
    del table["manifest_sha256"]
    old = _frame(header | {"manifest": {"gates": {"passed": True}}}, json.dumps(table).encode(), buffers)
    with pytest.warns(UserWarning, match="predates manifest binding: its manifest .* is covered by no hash"):
        art = read_artifact(old)
    assert art.tensors["b"].tolist() == [0, 1, 2, 3]


def test_a_manifest_json_cannot_hold_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="manifest must be JSON without NaN/Inf"):
        write_artifact(tmp_path / "n.dpla", {"w": np.ones(3, np.float32)}, manifest={"acc": float("nan")})
    assert not (tmp_path / "n.dpla").exists()
