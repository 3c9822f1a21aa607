import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaplane.deploy import (
    dequantize_int4,
    pack_onnx,
    quantize_int4,
    read_artifact,
    state_dict_sha256,
    weight_only_quantize,
    write_artifact,
)
from deltaplane.errors import ConfigError, DecodeError


def test_int4_groupwise_error_bound_and_zero_preserved():
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000).astype(np.float32)
    x[::7] = 0.0
    gq = quantize_int4(x, group_size=32)
    assert gq.codes.max() <= 15 and gq.scales.dtype == np.float16 and len(gq.scales) == 32  # ceil(1000/32)
    y = dequantize_int4(gq)
    groups = np.concatenate([x, np.zeros(24, np.float32)]).reshape(-1, 32)
    bound = np.repeat(np.abs(groups).max(1) / 7 / 2, 32)[:1000] * 1.001 + 1e-6
    assert np.all(np.abs(y - x) <= bound)
    assert np.all(y[::7] == 0.0)


def test_artifact_roundtrip_lossless_and_sparse_layout(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 128)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0.0
    tensors = {
        "w": w,
        "b": rng.normal(size=64).astype(np.float32),
        "q": rng.integers(-127, 127, (32, 32), dtype=np.int8),
    }
    info = write_artifact(tmp_path / "a.dpla", tensors, manifest={"accuracy": 0.97})
    entries = {e["name"]: e for e in info.tensors}
    assert entries["w"]["layout"] == "sparse" and entries["b"]["layout"] == "dense"
    art = read_artifact(tmp_path / "a.dpla")
    for k, v in tensors.items():
        assert art.tensors[k].dtype == v.dtype and np.array_equal(art.tensors[k], v)
    assert art.manifest == {"accuracy": 0.97} and art.graph is None
    # 90%-sparse fp32: ~10% values + positions, well under half of dense fp32
    assert info.nbytes < 0.3 * w.nbytes


def test_artifact_int4_int8_lossy_bounds(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(16, 64)).astype(np.float32)
    for quant, bits in (("int8", 8), ("int4", 4)):
        info = write_artifact(tmp_path / f"{quant}.dpla", {"w": w, "bias": w[0]}, quant=quant)
        art = read_artifact(tmp_path / f"{quant}.dpla")
        qmax = (1 << (bits - 1)) - 1
        err = np.abs(art.tensors["w"] - w).max()
        assert err <= np.abs(w).max() / qmax / 2 * 1.01
        assert np.array_equal(art.tensors["bias"], w[0])  # 1-D tensors stay lossless
        assert info.nbytes < w.nbytes * (bits / 32) * 1.35 + 600


def test_artifact_is_strict(tmp_path):
    write_artifact(tmp_path / "a.dpla", {"w": np.ones((4, 4), np.float32)})
    good = (tmp_path / "a.dpla").read_bytes()
    with pytest.raises(DecodeError, match="magic"):
        read_artifact(b"XXXX" + good[4:])
    with pytest.raises(DecodeError, match="version"):
        read_artifact(good[:4] + bytes([9]) + good[5:])
    with pytest.raises(DecodeError):
        read_artifact(good[:-3])
    (hlen,) = struct.unpack_from("<I", good, 5)
    header = json.loads(good[9 : 9 + hlen])
    header["payload_sha256"] = "0" * 64
    hb = json.dumps(header).encode()
    with pytest.raises(DecodeError, match="SHA-256"):
        read_artifact(good[:5] + struct.pack("<I", len(hb)) + hb + good[9 + hlen :])
    with pytest.raises(DecodeError):
        read_artifact(good[:9])
    with pytest.raises(ConfigError):
        write_artifact(tmp_path / "b.dpla", {"w": np.ones(3)}, quant="int3")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError):
        write_artifact(tmp_path / "x.dpla", {"w": np.ones((2, 2), np.complex64)})
    assert list(tmp_path.iterdir()) == []


def test_state_dict_sha256_changes_with_any_byte():
    sd = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    h = state_dict_sha256(sd)
    assert h == state_dict_sha256(dict(reversed(sd.items())))
    sd2 = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    sd2["b"][0, 0] = 1.0000001
    assert state_dict_sha256(sd2) != h


def test_weight_only_int4_model_close(helpers, trained_cnn, digits):
    xte, yte = digits[2], digits[3]
    q = weight_only_quantize(trained_cnn, bits=4, group_size=32)
    assert helpers.acc(q, xte, yte) >= helpers.acc(trained_cnn, xte, yte) - 0.02
    w, w0 = q.fc1.weight.detach(), trained_cnn.fc1.weight.detach()
    assert not torch.equal(w, w0) and float((w - w0).abs().max()) <= float(w0.abs().max()) / 7 / 2 * 1.01


def test_pack_onnx_roundtrip_exact(tmp_path, trained_cnn, digits):
    from deltaplane.deploy import export_onnx, ort_session

    x = torch.from_numpy(digits[2][:8])
    exp = export_onnx(trained_cnn, x[:1], tmp_path / "m.onnx")
    pack_onnx(exp.path, tmp_path / "m.dpla")
    art = read_artifact(tmp_path / "m.dpla")
    s1, s2 = ort_session(exp.path), ort_session(art.onnx_bytes())
    a = s1.run(None, {"input": x.numpy()})[0]
    b = s2.run(None, {"input": x.numpy()})[0]
    assert np.array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_corrupted_artifact_raises_decode_error_or_decodes_exactly(tmp_path_factory, data):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 16)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    path = tmp_path_factory.mktemp("fuzz") / "a.dpla"
    write_artifact(path, {"w": w, "b": np.arange(8, dtype=np.int32)}, quant="int8", manifest={"k": 1})
    good = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(good) - 1))
        good[pos] ^= 1 << data.draw(st.integers(0, 7))
    else:
        good = good[: data.draw(st.integers(0, len(good) - 1))]
    try:
        art = read_artifact(bytes(good))
    except DecodeError:
        return
    # only header bytes outside the payload's protection can change without detection: never the tensors
    ref = read_artifact(path)
    assert set(art.tensors) == set(ref.tensors)
    for k in ref.tensors:
        assert np.array_equal(art.tensors[k], ref.tensors[k])


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_artifact_values_beyond_float16_scales_stored_losslessly_not_nan(tmp_path, quant):
    # one weight of 1e7 needs a group scale of 1e7 / 127 > 65504, the largest float16: it used to overflow to
    # Inf, and the whole group (here the whole tensor) decoded as NaN
    w = np.random.default_rng(3).normal(size=(4, 32)).astype(np.float32)
    w[0, 0] = 1e7
    info = write_artifact(tmp_path / "a.dpla", {"w": w}, quant=quant)
    assert info.tensors[0]["quant"] == "none"  # visibly unquantized
    assert np.array_equal(read_artifact(tmp_path / "a.dpla").tensors["w"], w)


def test_artifact_tiny_values_survive_quantization(tmp_path):
    # a group of 1e-6 values has scale 7.9e-9, below float16's smallest subnormal: rounded to nearest it became
    # 0 and the group decoded as zeros; the scale is now rounded up, so values come back within half a step
    w = np.full((4, 32), 1e-6, np.float32)
    w[1] *= -3
    write_artifact(tmp_path / "a.dpla", {"w": w}, quant="int8")
    got = read_artifact(tmp_path / "a.dpla").tensors["w"]
    step = float(np.finfo(np.float16).smallest_subnormal)
    assert np.all(np.abs(got - w) <= step / 2 + 1e-12) and np.all(np.sign(got) == np.sign(w))


def test_weight_only_quantize_refuses_values_float16_scales_cannot_hold():
    lin = torch.nn.Linear(32, 4)
    with torch.no_grad():
        lin.weight[0, 0] = 1e6
    with pytest.raises(ConfigError, match="layer '': .*float16"):
        weight_only_quantize(lin, bits=4)
