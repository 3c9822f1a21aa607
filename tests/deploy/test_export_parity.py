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
