"""Device cost: MACs against layer arithmetic, activation liveness against a hand walk, energy formulas."""

import numpy as np
import pytest
import torch
from torch import nn

from deltaplane.deploy import export_onnx, nm_prune
from deltaplane.deploy.cost import LINKS, PROFILES, activation_memory, count_macs, federated_round_cost


def test_count_macs_matches_layer_arithmetic_and_sparsity():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    x = torch.randn(1, 1, 8, 8)
    conv = 8 * 8 * 8 * (1 * 3 * 3)  # out channels × H × W × (in channels × kernel)
    fc = 512 * 10
    assert count_macs(net, x) == {"macs": conv + fc, "nonzero_macs": conv + fc}
    nm_prune(net, 2, 4)  # conv (9 inputs per row) is skipped, the Linear keeps half its weights
    assert count_macs(net, x) == {"macs": conv + fc, "nonzero_macs": conv + fc // 2}
    assert count_macs(net, torch.randn(4, 1, 8, 8))["macs"] == 4 * (conv + fc)


def test_activation_memory_liveness(tmp_path):
    net = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8)).eval()
    exp = export_onnx(net, torch.randn(1, 16), tmp_path / "m.onnx")
    mem = activation_memory(exp.path, {"input": np.zeros((1, 16), np.float32)})
    # input (64 B) lives while the first output (128 B) is made; then 128 B + the final 32 B output
    assert mem["peak_activation_bytes"] == max(64 + 128, 128 + 32)
    assert mem["total_activation_bytes"] == 128 + 32
    assert mem["weight_bytes"] == 4 * (16 * 32 + 32 + 32 * 8 + 8)


def test_federated_round_cost_uses_the_published_power_model():
    lte, wifi = LINKS["lte"], LINKS["wifi"]
    # Huang et al. 2012: P = α·t + β (mW at t Mbit/s) → nJ/bit = (α·t + β)/t; ×8/1000 → µJ per byte
    assert lte.uj_per_byte_up == pytest.approx(8 * (438.39 * 6 + 1288.04) / 6 / 1000)
    assert wifi.uj_per_byte_down == pytest.approx(8 * (137.01 * 20 + 132.86) / 20 / 1000)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    c = federated_round_cost(net, torch.randn(1, 64), samples=100, epochs=2, bytes_up=1000, bytes_down=4000)
    fwd = 64 * 32 + 32 * 10
    assert c["forward_macs_per_sample"] == fwd and c["train_macs"] == 3 * fwd * 200
    assert c["compute_uj"] == pytest.approx(3 * fwd * 200 * PROFILES["phone"].pj_per_mac_fp32 / 1e6)
    assert c["radio_uj"]["lte"] == pytest.approx(1000 * lte.uj_per_byte_up + 4000 * lte.uj_per_byte_down)
    assert c["total_uj"]["wifi"] == pytest.approx(c["compute_uj"] + c["radio_uj"]["wifi"])
    assert c["radio_uj"]["lte"] > c["radio_uj"]["wifi"]  # LTE's tail-free power is still ~2x Wi-Fi per byte
