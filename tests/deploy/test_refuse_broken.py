"""`deploy` refuses a broken model, not only a broken compression.

Every case here shipped with exit 0 before: a checkpoint or ONNX file with NaN/Inf weights, a model whose outputs
overflow, an export whose NaN outputs passed the parity check, a shipped model that computes something else than
its source (even with a *higher* accuracy), an untrained model, a regressor or embedding judged by a per-row
cosine of one element or by argmax alone. ``--no-gates`` is recorded as "off", not as "passed".
"""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from deltaplane.deploy import deploy_classifier, save_checkpoint
from deltaplane.deploy.bundle import load_deployable
from deltaplane.deploy.gates import Gates
from deltaplane.deploy.onnx import export_onnx
from deltaplane.deploy.onnx_input import deploy_onnx_model, onnx_feeds
from deltaplane.errors import ExportError, InvalidUpdate, QualityGateFailed

FAST = {"latency_iters": 3, "device_cost": False}


def _digits_ckpt(folder, state):
    from deltaplane.sim.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(state)
    return save_checkpoint(model, folder, {"architecture": "DigitsCNN"})


@pytest.mark.parametrize(
    ("tensor", "value", "quant"),
    [("fc2.bias", float("nan"), "none"), ("fc1.weight", float("inf"), "int8-dynamic")],
)
def test_cli_refuses_a_checkpoint_with_non_finite_weights(app, tmp_path, trained_cnn, tensor, value, quant):
    state = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    state[tensor].view(-1)[0] = value
    ckpt = _digits_ckpt(tmp_path / "ckpt", state)
    out = tmp_path / "out"
    args = ["deploy", str(ckpt), "--quant", quant, "--attack-eps", "0", "-o", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output  # a broken input, not a gate: refused before anything is measured
    assert f"'{tensor}'" in r.output and ("NaN" in r.output or "Inf" in r.output)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_onnx_input_with_a_nan_initializer_is_refused(tmp_path, trained_cnn, digits):
    src = export_onnx(trained_cnn.eval(), torch.from_numpy(digits[2][:1]), tmp_path / "cnn.onnx").path
    m = onnx.load(str(src))
    init = next(i for i in m.graph.initializer if i.name == "fc2.bias")
    init.CopyFrom(numpy_helper.from_array(np.full(10, np.nan, np.float32), "fc2.bias"))
    onnx.save(m, str(tmp_path / "nan.onnx"))
    feeds = [{"input": digits[2][i : i + 1]} for i in range(32)]
    with pytest.raises(InvalidUpdate, match="'fc2.bias' holds 10 NaN"):
        deploy_onnx_model(tmp_path / "nan.onnx", tmp_path / "out", eval_feeds=feeds, gates=Gates())
    assert not (tmp_path / "out").exists()


def test_model_whose_outputs_overflow_is_refused(tmp_path, digits):
    # finite weights, infinite outputs: 64 inputs × 1e38 overflow float32 (max 3.4e38)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        net[1].weight.fill_(1e38)
    xtr, _, xte, yte = digits
    with pytest.raises(InvalidUpdate, match="fp32 model .* outputs NaN or Inf on 397 of 397"):
        deploy_classifier(net, tmp_path / "o", x_test=xte, y_test=yte, x_calib=xtr[:32], quant="none", **FAST)
    assert not (tmp_path / "o").exists()


def test_shipped_model_that_disagrees_with_fp32_is_refused_even_if_more_accurate(
    tmp_path, trained_cnn, digits
):
    xtr, _, xte, yte = digits
    # the fp32 reference answers 3 for 8 and 8 for 3: the shipped model (the unswapped weights) scores higher
    # and disagrees with it on every 3 and 8 — it is not a compression of that reference
    reference = copy.deepcopy(trained_cnn).eval()
    with torch.no_grad():
        reference.fc2.weight[[3, 8]] = reference.fc2.weight[[8, 3]].clone()
        reference.fc2.bias[[3, 8]] = reference.fc2.bias[[8, 3]].clone()
    with pytest.raises(QualityGateFailed) as e:
        deploy_classifier(
            trained_cnn, tmp_path / "o", x_test=xte, y_test=yte, x_calib=xtr[:64], quant="none",
            reference=reference, gates=Gates(), **FAST,
        )  # fmt: skip
    failed = {r.gate: r for r in e.value.results if not r.passed}
    assert set(failed) == {"max-disagreement"}, failed
    assert failed["max-disagreement"].what == "top-1 disagreement with the fp32 source"
    assert e.value.manifest["quality"]["accuracy_drop_points"] < -10  # accuracy went *up*
    assert failed["max-disagreement"].measured > 10
    assert not (tmp_path / "o").exists()


def test_after_fine_tuning_agreement_is_with_the_fine_tuned_model(tmp_path, helpers, trained_cnn, digits):
    xtr, ytr, xte, yte = digits
    source = copy.deepcopy(trained_cnn).eval()  # answers 3 for 8 and 8 for 3; fine-tuning on labels fixes it
    with torch.no_grad():
        source.fc2.weight[[3, 8]] = source.fc2.weight[[8, 3]].clone()
        source.fc2.bias[[3, 8]] = source.fc2.bias[[8, 3]].clone()

    def finetune(model, result):
        helpers.fit(model, xtr, ytr, epochs=3, lr=0.01, masks=result.masks)

    r = deploy_classifier(
        source, tmp_path / "o", x_test=xte, y_test=yte, x_calib=xtr[:64], prune="0.5", quant="none",
        finetune=finetune, gates=Gates(), **FAST,
    )  # fmt: skip
    q = r.manifest["quality"]
    assert q["disagreement_with"] == "fine-tuned fp32 model" and q["disagreement_points"] <= 5
    assert q["disagreement_vs_source_points"] > 10 and q["accuracy_drop_points"] < -10  # recorded, not gated


def test_untrained_classifier_is_refused_and_min_accuracy_applies(tmp_path, helpers, trained_cnn, digits):
    xtr, _, xte, yte = digits
    torch.manual_seed(1)
    untrained = helpers.cnn().eval()
    kw = {"x_test": xte, "y_test": yte, "x_calib": xtr[:64], "quant": "none", **FAST}
    with pytest.raises(QualityGateFailed, match="min-above-chance") as e:
        deploy_classifier(untrained, tmp_path / "o", gates=Gates(), **kw)
    chance = e.value.manifest["quality"]["chance"]
    assert chance == pytest.approx(max(0.1, np.bincount(yte).max() / len(yte)))
    assert not (tmp_path / "o").exists()
    # the operator can turn that gate off explicitly
    deploy_classifier(untrained, tmp_path / "o", gates=Gates(min_above_chance=None), **kw)
    # an absolute floor: the trained model (≈ 99%) is refused below a 99.9% floor, shipped at 90%
    with pytest.raises(QualityGateFailed, match="min-accuracy: clean accuracy"):
        deploy_classifier(trained_cnn, tmp_path / "o2", gates=Gates(min_accuracy=0.999), **kw)
    r = deploy_classifier(trained_cnn, tmp_path / "o2", gates=Gates(min_accuracy=0.9), **kw)
    gates = {g["gate"]: g for g in r.manifest["gates"]["results"]}
    assert gates["min-accuracy"]["passed"] and gates["min-above-chance"]["passed"]


class _AlwaysThree(nn.Module):
    """A collapsed classifier: logits that ignore the input and always name class 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * 0 + torch.eye(10)[3] * 5


def test_a_constant_model_is_refused_on_a_test_set_of_one_label(tmp_path, digits):
    """On a test set holding only label 3, "always 3" scores 100% = chance and passed every gate; even at
    ``min_above_chance=0`` such a test set cannot tell a model from a constant."""
    xtr, _, xte, yte = digits
    keep = yte == 3
    kw = {"x_test": xte[keep], "y_test": yte[keep], "x_calib": xtr[:16], "quant": "none", **FAST}
    for gates in (Gates(), Gates(min_above_chance=0.0)):
        with pytest.raises(QualityGateFailed, match="every test label is the same") as e:
            deploy_classifier(_AlwaysThree(), tmp_path / "o", gates=gates, **kw)
        assert e.value.manifest["quality"]["chance"] == 1.0 and not (tmp_path / "o").exists()
    # two labels: the same model is an ordinary at-chance refusal, and a real one passes
    assert Gates().check({"accuracy_fp32": 0.99, "chance": 0.5, "num_classes": 10})[0].passed


def test_cli_min_accuracy_and_no_gates_recorded_as_off(app, tmp_path, trained_cnn):
    from deltaplane.sim.model import DigitsCNN

    torch.manual_seed(0)
    untrained = _digits_ckpt(tmp_path / "untrained", DigitsCNN().state_dict())
    args = ["deploy", str(untrained), "--quant", "none", "--attack-eps", "0", "-o", str(tmp_path / "u")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 3 and "min-above-chance" in r.output and not (tmp_path / "u").exists()
    r = CliRunner().invoke(app, [*args, "--min-above-chance", "0", "--min-accuracy", "0.5"])
    assert r.exit_code == 3 and "min-accuracy" in r.output and "min-above-chance" not in r.output
    ckpt = _digits_ckpt(tmp_path / "ckpt", trained_cnn.state_dict())
    base = ["deploy", str(ckpt), "--quant", "none", "--attack-eps", "0"]
    r = CliRunner().invoke(app, [*base, "--min-accuracy", "90", "-o", str(tmp_path / "a")])
    assert r.exit_code == 2 and "fraction" in r.output  # 90 meant 90%: said loudly, not read as 9000%
    out = tmp_path / "off"
    r = CliRunner().invoke(app, [*base, "--no-gates", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "OFF" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["gates"]["off"] is True and m["gates"]["passed"] is None and m["gates"]["results"] == []
    assert "Quality gates were OFF" in (out / "MODEL_CARD.md").read_text()
    lineage = load_deployable(out).lineage["deploy"]  # what the registry records: not "passed"
    assert lineage["gates"]["passed"] is None and lineage["gates"]["off"] is True


def test_manifest_json_refuses_nan_metrics():
    from deltaplane.deploy.pipeline import manifest_json

    with pytest.raises(ExportError, match=r"baseline\.accuracy\.1 is NaN or Inf"):
        manifest_json({"model": "m", "baseline": {"accuracy": [0.9, float("nan")]}})
    assert json.loads(manifest_json({"a": [1.0, {"b": 2}]})) == {"a": [1.0, {"b": 2}]}


def _linear_onnx(path, w: np.ndarray, b: np.ndarray):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "g",
        [x],
        [y],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return m


def test_onnx_scalar_and_embedding_outputs_are_gated_on_what_they_are(tmp_path):
    rng = np.random.default_rng(0)
    # a regressor with an offset: 90% pruning moves every output, but each 1-element "cosine" stays 1
    scalar = _linear_onnx(
        tmp_path / "s.onnx", rng.normal(size=(16, 1)).astype(np.float32) * 3, np.array([200.0], np.float32)
    )
    feeds = onnx_feeds(scalar, 64, seed=1)
    with pytest.raises(QualityGateFailed, match="min-r2") as e:
        deploy_onnx_model(tmp_path / "s.onnx", tmp_path / "o", eval_feeds=feeds, prune="0.9", quant="none",
                          gates=Gates())  # fmt: skip
    assert e.value.manifest["fidelity"]["r2"] < 0.9
    r = deploy_onnx_model(tmp_path / "s.onnx", tmp_path / "o", eval_feeds=feeds, quant="int8", gates=Gates())
    assert r.manifest["fidelity"]["r2"] > 0.95  # the control: int8 alone keeps the outputs
    # an embedding whose first coordinate dominates: argmax always agrees, the direction does not
    w = rng.normal(size=(16, 32)).astype(np.float32) * 10
    w[:, 0] = 0
    _linear_onnx(tmp_path / "e.onnx", w, np.r_[200.0, np.zeros(31)].astype(np.float32))
    with pytest.raises(QualityGateFailed, match="min-cosine") as e:
        deploy_onnx_model(tmp_path / "e.onnx", tmp_path / "o2", eval_feeds=feeds, prune="0.9", quant="none",
                          gates=Gates())  # fmt: skip
    assert e.value.manifest["fidelity"]["top1_agreement"] == 1.0
    assert not (tmp_path / "o2").exists()
