"""The ONNX export's parity check refuses NaN/Inf outputs (``max(0.0, nan)`` is ``0.0`` in Python)."""

import pytest
import torch
from torch import nn

from deltaplane.deploy.onnx import export_onnx
from deltaplane.errors import ExportError


class _DivergesWhenTraced(nn.Module):
    """Stands in for an op ONNX Runtime computes differently: the exported graph yields NaN for two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if torch.jit.is_tracing():
            y = y * torch.tensor([1.0, 1.0, float("nan"), float("nan")])
        return y


def test_export_parity_check_catches_nan_outputs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    with pytest.raises(
        ExportError, match="PyTorch gives 0 and ONNX Runtime 2 NaN/Inf"
    ):  # max(0.0, nan) is 0.0 in Python
        export_onnx(_DivergesWhenTraced().eval(), x[:1], tmp_path / "d.onnx", verify_inputs=[x])
    assert list(tmp_path.iterdir()) == []


def test_large_logits_export_within_float32_rounding(tmp_path, trained_cnn, digits):
    """The digits CNN with its logits ×100 (up to ~2,000) differs by ~1e-3 between PyTorch and ONNX Runtime —
    float32 rounding, not another computation — and was refused against the absolute atol of 1e-4."""
    import copy

    _, _, xte, _ = digits
    hot = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        hot.fc2.weight.mul_(100)
        hot.fc2.bias.mul_(100)
    x = torch.from_numpy(xte[:64])
    res = export_onnx(hot, x[:1], tmp_path / "hot.onnx", verify_inputs=[x])
    with torch.no_grad():
        top = float(hot(x).abs().max())
    assert 1e-4 < res.max_abs_diff < 1e-5 * top


class _OffByOnePercent(nn.Module):
    """The exported graph scales the outputs by 1.01: a different computation, at any magnitude."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) * self.scale
        return y * 1.01 if torch.jit.is_tracing() else y


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_a_diverging_export_is_refused_at_any_magnitude(tmp_path, scale):
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    with pytest.raises(ExportError, match="on output 'output' > atol \\+ rtol"):
        export_onnx(_OffByOnePercent(scale).eval(), x[:1], tmp_path / "d.onnx", verify_inputs=[x])
    assert list(tmp_path.iterdir()) == []
