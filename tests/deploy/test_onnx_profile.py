import numpy as np
import pytest
import torch
from torch import nn

from deltaplane.deploy import (
    Evaluation,
    Latency,
    compare,
    corruptions,
    evaluate,
    expected_calibration_error,
    export_onnx,
    onnx_predictor,
    ort_session,
    quantize_dynamic_torch,
    quantize_onnx,
    torch_predictor,
)
from deltaplane.errors import ConfigError, ExportError, UnsupportedLayer


def test_export_verified_and_dynamic_batch(tmp_path, trained_cnn, digits):
    x = torch.from_numpy(digits[2][:32])
    res = export_onnx(trained_cnn, x[:1], tmp_path / "m.onnx", verify_inputs=[x])
    assert res.path.exists() and res.max_abs_diff < 1e-4 and res.nbytes == res.path.stat().st_size
    out = ort_session(res.path).run(None, {"input": x.numpy()})[0]
    assert out.shape == (32, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


class _Diverges(nn.Module):
    """Behaves differently when traced than when run: the export cannot match PyTorch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) + (100.0 if self.calls > 1 else 0.0)


class _Unsupported(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real


def test_failed_export_leaves_no_file(tmp_path):
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(_Diverges(), torch.randn(1, 4), tmp_path / "d.onnx")
    with pytest.raises((UnsupportedLayer, ExportError)):
        export_onnx(_Unsupported(), torch.randn(1, 8), tmp_path / "u.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_the_model_in_the_modes_it_came_in(tmp_path):
    """Export runs in eval mode (dropout off, batch norm on its running statistics) but used to leave the
    caller's model there: a model still being trained lost its dropout. Each module's own mode comes back,
    after a successful and after a failed export, and the export itself is the eval-mode function."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model[1].eval()  # frozen statistics in a model that trains: a mixed state that must survive too
    x = torch.randn(16, 4)
    res = export_onnx(model, x, tmp_path / "m.onnx")
    assert [m.training for m in model] == [True, False, True, True] and model.training
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = ort_session(res.path).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    model.train()
    with pytest.raises(ExportError):
        export_onnx(model, x, tmp_path / "d.onnx", atol=-1.0)  # nothing can pass a negative tolerance
    assert all(m.training for m in model.modules())


def test_onnx_int8_static_and_dynamic(tmp_path, trained_cnn, digits):
    xtr, _, xte, yte = digits
    exp = export_onnx(trained_cnn, torch.from_numpy(xte[:1]), tmp_path / "m.onnx")
    static = quantize_onnx(
        exp.path,
        tmp_path / "s.onnx",
        mode="static",
        calibration=[{"input": xtr[i : i + 1]} for i in range(64)],
    )
    dyn = quantize_onnx(exp.path, tmp_path / "d.onnx", mode="dynamic")
    base = float((trained_cnn(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    for p in (static, dyn):
        pred = onnx_predictor(ort_session(p))(xte).argmax(1)
        assert (pred == yte).mean() >= base - 0.02
    assert static.stat().st_size < 0.45 * exp.path.stat().st_size
    with pytest.raises(ConfigError, match="calibration"):
        quantize_onnx(exp.path, tmp_path / "x.onnx", mode="static")
    assert not (tmp_path / "x.onnx").exists()


def test_torch_dynamic_quant(helpers, trained_cnn, digits):
    q = quantize_dynamic_torch(trained_cnn)
    assert helpers.acc(q, digits[2], digits[3]) >= helpers.acc(trained_cnn, digits[2], digits[3]) - 0.02
    assert (
        "Quantized" in type(q.fc1).__module__ + type(q.fc1).__name__ or "quantized" in type(q.fc1).__module__
    )


def test_ece_exact_small_case():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    labels = np.array([0, 1, 1, 0])
    # bins of width 0.5 (n_bins=2): all confidences in [0.5,1): conf mean 0.75, accuracy 3/4 -> ECE 0
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.0)
    # 10 bins: 0.9 (acc 1), 0.6 (acc 0), 0.7 (acc 1), 0.8 (acc 1): (0.1 + 0.6 + 0.3 + 0.2)/4 = 0.3
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.3)


def test_corruptions_shapes_and_semantics(digits):
    x = digits[2][:16]
    c = corruptions(x, seed=0)
    assert set(c) == {"noise", "rotation", "blur", "shift"}
    for v in c.values():
        assert v.shape == x.shape and v.dtype == np.float32
    assert np.array_equal(c["shift"][..., 1:, 1:], x[..., :-1, :-1]) and not c["shift"][..., 0, :].any()
    assert np.array_equal(corruptions(x, seed=0)["noise"], c["noise"])
    assert not np.array_equal(corruptions(x, seed=1)["noise"], c["noise"])
    assert c["noise"].min() >= 0 and c["noise"].max() <= 1
    assert abs(c["blur"].sum() - x.sum()) / x.sum() < 0.2  # blur moves mass, roughly conserves it
    with pytest.raises(ConfigError):
        corruptions(x[0])


def test_evaluate_and_compare_flags(trained_cnn, digits):
    xte, yte = digits[2], digits[3]
    ev = evaluate("m", torch_predictor(trained_cnn), xte, yte, variants=corruptions(xte), latency_iters=20)
    assert set(ev.accuracy) == {"clean", "noise", "rotation", "blur", "shift"} and ev.accuracy["clean"] > 0.9
    assert set(ev.latency) == {1, 32} and ev.latency[1].p95_us >= ev.latency[1].p50_us > 0
    lat = {1: Latency(1, 10.0, 12.0)}
    base = Evaluation("a", {"clean": 0.95, "noise": 0.90, "blur": 0.80}, 0.02, lat, 1000)
    cand = Evaluation(
        "b", {"clean": 0.94, "noise": 0.87, "blur": 0.795}, 0.03, {1: Latency(1, 4.0, 5.0)}, 100
    )
    cmp = compare(base, cand)
    assert cmp.drops["clean"] == pytest.approx(1.0) and cmp.drops["noise"] == pytest.approx(3.0)
    assert cmp.flagged == ["noise"] and cmp.latency_ratio[1] == pytest.approx(0.4) and cmp.size_ratio == 10
    assert compare(base, cand, tolerance=2.5).flagged == []
