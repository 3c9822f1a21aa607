"""Distillation from fp32 wins back what pruning broke, without labels, keeping the sparsity pattern."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deltaplane.deploy import deploy_classifier, load_checkpoint, save_checkpoint
from deltaplane.deploy.recovery import distill_recover
from deltaplane.deploy.tokens import deploy_token_model, random_tokens
from deltaplane.errors import ConfigError


def test_distill_recovers_a_broken_pruned_cnn_without_labels(tmp_path, trained_cnn, digits):
    xtr, _, xte, yte = digits
    rec = distill_recover(trained_cnn, xtr[:512], task="classification", epochs=8, lr=1e-3)
    res = deploy_classifier(
        trained_cnn,
        tmp_path / "o",
        x_test=xte,
        y_test=yte,
        x_calib=xtr[:64],
        prune="0.95",
        quant="none",
        finetune=rec,
        latency_iters=3,
        device_cost=False,
    )
    r = res.manifest["recovery"]
    assert r["method"] == "distill" and r["distill_loss_after"] < r["distill_loss_before"]
    assert (
        r["accuracy_recovered"] > r["accuracy_pruned"] + 0.05
    )  # 95% magnitude pruning breaks it; KD repairs
    assert res.manifest["weight_sparsity"] == pytest.approx(0.95, abs=0.01)  # masks held through training
    assert "recovery after pruning: distilled" in (tmp_path / "o" / "MODEL_CARD.md").read_text()
    with pytest.raises(ConfigError):
        distill_recover(trained_cnn, xtr, task="classification", epochs=0)


def test_distill_recovers_a_2_4_pruned_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "b")
    ck = load_checkpoint(tmp_path / "b")
    cal = random_tokens(97, 64, 10, seed=2)
    res = deploy_token_model(
        ck.model,
        tmp_path / "o",
        task="sentence-embedding",
        eval_tokens=random_tokens(97, 16, 10, seed=1),
        calib_tokens=cal,
        prune="2:4",
        quant="none",
        recover=distill_recover(ck.model, cal, task="sentence-embedding", epochs=15, lr=3e-3),
        latency_iters=2,
        device_cost=False,
    )
    r = res.manifest["recovery"]
    before, after = r["fidelity_pruned"]["cosine_mean"], r["fidelity_recovered"]["cosine_mean"]
    assert after > before + 0.05, (before, after)
    assert res.manifest["fidelity"]["cosine_mean"] == pytest.approx(after, abs=1e-3)  # shipped = recovered
    assert res.manifest["weight_sparsity"] == pytest.approx(0.5)


def test_cli_recover_distill(app, tmp_path, trained_cnn):
    from deltaplane.sim.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(trained_cnn.state_dict())
    ckpt = save_checkpoint(model, tmp_path / "ckpt", {"architecture": "DigitsCNN"})
    args = [
        "deploy",
        str(ckpt),
        "--prune",
        "0.9",
        "--recover",
        "distill",
        "--epochs",
        "3",
        "--attack-eps",
        "0",
    ]
    r = CliRunner().invoke(app, [*args, "--no-gates", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "recovering" in r.output or "fine-tuning" in r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["recovery"]["epochs"] == 3 and np.isfinite(m["recovery"]["accuracy_recovered"])
    r = CliRunner().invoke(app, ["deploy", str(ckpt), "--recover", "distill", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs a --prune spec" in r.output
    # 'NONE' is no pruning to parse_prune, so it is no pruning here too (it passed as a spec and distilled an
    # unpruned model before)
    r = CliRunner().invoke(
        app, ["deploy", str(ckpt), "--prune", "NONE", "--recover", "distill", "-o", str(tmp_path / "y")]
    )
    assert r.exit_code == 2 and "needs a --prune spec" in r.output, r.output
