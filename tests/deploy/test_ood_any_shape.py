"""Every digits-shaped classifier gets the OOD evaluation (corrupted as 8×8 images, then reshaped to the model's
input), and where OOD cannot be computed the max-ood-drop gate is reported as not evaluated, never silently
skipped."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deltaplane.deploy import Gates, deploy_classifier, save_checkpoint
from deltaplane.deploy.profile import corruptions

SPLITS = {"noise", "rotation", "blur", "shift"}
FAST = ["--quant", "none", "--attack-eps", "0"]


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


@pytest.fixture()
def mlp_ckpt(tmp_path, digits, helpers):
    """A trained MLP on flat 8×8 digits, config input_shape [64], built by a user --builder file."""
    xtr, ytr, _, _ = digits
    model = helpers.fit(_mlp(), xtr.reshape(len(xtr), 64), ytr, epochs=10)
    builder = tmp_path / "mlp_builder.py"
    builder.write_text(
        "from torch import nn\n\n\ndef build(cfg):\n"
        "    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"
    )
    ck = save_checkpoint(model, tmp_path / "ck", {"architecture": "MLP", "input_shape": [64]})
    return ck, f"{builder}:build", model


def test_an_mlp_on_digits_gets_the_ood_evaluation_and_gate(tmp_path, app, mlp_ckpt, digits):
    ck, builder, model = mlp_ckpt
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["deploy", str(ck), "--builder", builder, "-o", str(out), *FAST])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["quality"]["ood_excess_drop_points"]) == SPLITS
    assert {r["what"].split()[0] for r in m["gates"]["results"] if r["gate"] == "max-ood-drop"} == SPLITS
    # --attack-eps 0: only the adversarial gate is not evaluated
    assert [g["gate"] for g in m["gates"]["not_evaluated"]] == [
        "max-adv-drop"
    ] and "accuracy rotation" in r.output
    # independently: the rotated digits as images, flattened for the MLP, give the fp32 accuracy recorded
    from deltaplane.data.digits import load_digits, train_test_split

    _, test = train_test_split(load_digits(), seed=0)
    rot = corruptions(test.x.numpy(), seed=0)["rotation"].reshape(len(test.y), 64)
    with torch.inference_mode():
        acc = float((model(torch.from_numpy(rot)).argmax(1).numpy() == test.y.numpy()).mean())
    assert m["baseline"]["accuracy"]["rotation"] == pytest.approx(acc)


def test_flat_data_reports_the_ood_gate_as_not_evaluated(tmp_path, app, mlp_ckpt, digits):
    ck, builder, _ = mlp_ckpt
    xtr, ytr, xte, yte = digits
    data = tmp_path / "flat.npz"
    np.savez(data, x_train=xtr.reshape(-1, 64), y_train=ytr, x_test=xte.reshape(-1, 64), y_test=yte)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["deploy", str(ck), "--builder", builder, "--data", str(data), "-o", str(out), *FAST]
    )
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "not evaluated" in text and "No OOD evaluation" in text
    m = json.loads((out / "manifest.json").read_text())
    assert m["ood"]["evaluated"] is False
    assert [g["gate"] for g in m["gates"]["not_evaluated"]] == [
        "max-ood-drop",
        "max-adv-drop",
    ]  # --attack-eps 0
    assert "No OOD evaluation" in (out / "MODEL_CARD.md").read_text()


def test_library_without_variants_lists_the_gate_as_not_evaluated(tmp_path, digits, helpers):
    xtr, ytr, xte, yte = digits
    model = helpers.fit(_mlp(), xtr.reshape(len(xtr), 64), ytr, epochs=3)
    res = deploy_classifier(
        model,
        tmp_path / "out",
        x_test=xte.reshape(-1, 64),
        y_test=yte,
        x_calib=xtr[:16].reshape(-1, 64),
        quant="none",
        latency_iters=3,
        device_cost=False,
        gates=Gates(min_cosine=None, max_accuracy_drop=5.0),
    )
    listed = {g["gate"]: g["why"] for g in res.manifest["gates"]["not_evaluated"]}
    assert "No OOD evaluation" in listed["max-ood-drop"] and "adversarial_eps" in listed["max-adv-drop"]
    assert "No OOD evaluation" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
