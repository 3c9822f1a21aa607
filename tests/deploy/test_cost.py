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


def _bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    from deltaplane.deploy.encoder import MeanPooledEncoder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    enc = MeanPooledEncoder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    ids = torch.randint(0, 97, (1, 9))
    example = (ids, torch.ones_like(ids))
    path = export_onnx(
        enc, example, tmp_path / "bert.onnx", input_names=("input_ids", "attention_mask"), output_names=("e",)
    ).path
    return enc, example, path


def test_onnx_macs_match_pytorchs_flop_counter_on_the_same_models(tmp_path):
    from deltaplane.deploy import quantize_onnx
    from deltaplane.deploy.cost import count_onnx_macs

    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, groups=2),
        nn.Flatten(),
        nn.Linear(144, 10),
    ).eval()
    x = torch.randn(1, 1, 8, 8)
    path = export_onnx(cnn, x, tmp_path / "cnn.onnx").path
    feeds = {"input": x.numpy()}
    got = count_onnx_macs(path, feeds)
    assert got["macs"] == count_macs(cnn, x)["macs"] and set(got["by_op"]) == {"Conv", "Gemm"}
    # a transformer: its attention products (Q·Kᵀ, weights·V) are MatMuls of two activations, counted too
    enc, example, bpath = _bert(tmp_path)
    bfeeds = {"input_ids": example[0].numpy(), "attention_mask": example[1].numpy()}
    # by hand: per layer Q, K, V, output (32×32 each), FFN 32→64→32 on 9 tokens, and the attention products
    # Q·Kᵀ and weights·V: 2 heads × 9×9×16 each
    want = 2 * (9 * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 2 * 9 * 9 * 16)
    assert count_macs(enc, example)["macs"] == want  # PyTorch's counter, attention included
    assert count_onnx_macs(bpath, bfeeds)["macs"] == want
    # quantized graphs do the same multiplications in other op types
    q8 = quantize_onnx(bpath, tmp_path / "q8.onnx", mode="dynamic")
    assert count_onnx_macs(q8, bfeeds)["macs"] == want
    q4 = quantize_onnx(bpath, tmp_path / "q4.onnx", mode="int4")
    q4_count = count_onnx_macs(q4, bfeeds)
    assert "MatMulNBits" in q4_count["by_op"] and q4_count["macs"] == want


def test_onnx_nonzero_macs_follow_the_pruned_weights(tmp_path):
    from deltaplane.deploy.cost import count_onnx_macs

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    nm_prune(net, 2, 4)
    x = torch.randn(3, 16)
    path = export_onnx(net, x, tmp_path / "p.onnx").path
    got = count_onnx_macs(path, {"input": x.numpy()})
    assert got == {**count_macs(net, x), "by_op": got["by_op"]}
    assert got["nonzero_macs"] == got["macs"] // 2
