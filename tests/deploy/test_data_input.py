"""``deploy --data FILE.npz`` is checked against the model before anything runs: bad data is exit 2 with a
message naming --data and what to fix, never a traceback or a shipped 0%-vs-0% evaluation."""

import numpy as np
import pytest
from typer.testing import CliRunner

from deltaplane.deploy import register_architecture, save_checkpoint


@pytest.fixture()
def ckpt(tmp_path, trained_cnn):
    from deltaplane.sim.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(trained_cnn.state_dict())
    register_architecture("DigitsCNN", lambda cfg: DigitsCNN())
    return save_checkpoint(model, tmp_path / "ckpt", {"architecture": "DigitsCNN"})


FAST = ["--quant", "none", "--attack-eps", "0"]


def _npz(tmp_path, name, **arrays):
    p = tmp_path / f"{name}.npz"
    np.savez(p, **arrays)
    return p


def _cases(digits):
    xtr, ytr, xte, yte = digits
    flat = {"x_train": xtr.reshape(len(xtr), 64), "x_test": xte.reshape(len(xte), 64)}
    return {
        "labels_out_of_range": (
            {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte + 100},
            r"y_test holds labels in \[100, 109\] but the model has 10 outputs",
        ),
        "negative_train_label": (
            {"x_train": xtr, "y_train": ytr - 1, "x_test": xte, "y_test": yte},
            r"y_train holds labels in \[-1, 8\]",
        ),
        "empty_test": (
            {"x_train": xtr, "y_train": ytr, "x_test": xte[:0], "y_test": yte[:0]},
            "x_test has shape .0, 1, 8, 8.; it needs at least one sample",
        ),
        "lengths_differ": (
            {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte[:10]},
            r"y_test has shape \(10,\) but x_test holds \d+ samples",
        ),
        "flat_for_a_cnn": (
            {**flat, "y_train": ytr, "y_test": yte},
            r"the model does not run on its samples of shape \(64,\)",
        ),
        "fractional_labels": (
            {"x_train": xtr, "y_train": ytr + 0.5, "x_test": xte, "y_test": yte},
            r"y_train .float64. must hold integer class indices; y_train\[0\] is .*\.5 .whole-number floats",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "labels_out_of_range",
        "negative_train_label",
        "empty_test",
        "lengths_differ",
        "flat_for_a_cnn",
        "fractional_labels",
    ],
)
def test_bad_data_is_refused_naming_data(tmp_path, app, ckpt, digits, case):
    arrays, match = _cases(digits)[case]
    data = _npz(tmp_path, case, **arrays)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["deploy", str(ckpt), "--data", str(data), "-o", str(out), *FAST])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") or "\nerror:" in r.output, r.output
    text = " ".join(r.output.split())
    assert f"--data {data}" in text
    import re

    assert re.search(match, text), text
    assert not out.exists()


def test_few_test_samples_ship_with_a_warning(tmp_path, app, ckpt, digits):
    xtr, ytr, xte, yte = digits
    data = _npz(tmp_path, "tiny", x_train=xtr, y_train=ytr, x_test=xte[:5], y_test=yte[:5])
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["deploy", str(ckpt), "--data", str(data), "-o", str(out), "--no-gates", *FAST]
    )
    assert r.exit_code == 0, r.output
    assert "only 5 test samples" in " ".join(r.output.split())
    assert "Only 5 test samples" in (out / "MODEL_CARD.md").read_text()


def test_a_tabular_model_without_data_is_told_to_pass_data(tmp_path, app):
    """A user's own MLP on 30 tabular features deployed without --data: the digits default cannot feed it, and
    the refusal said "give x_train / x_test in the model's input shape" (or only that the digits do not fit its
    input_shape) to a user who gave no x_train at all; it now says to pass --data FILE.npz."""
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    register_architecture("TabularMLP", lambda cfg: torch.nn.Sequential(
        torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))  # fmt: skip
    for name, config in (
        ("shaped", {"architecture": "TabularMLP", "input_shape": [30]}),  # 64 values per image do not reshape
        ("unshaped", {"architecture": "TabularMLP"}),  # the 1×8×8 images do not run through Linear(30, 8)
    ):
        ck = save_checkpoint(net, tmp_path / name, config)
        r = CliRunner().invoke(app, ["deploy", str(ck), "-o", str(tmp_path / f"out-{name}"), *FAST])
        assert r.exit_code == 2, r.output
        text = " ".join(r.output.split())
        assert "pass --data FILE.npz holding x_train, y_train, x_test, y_test" in text, text
        assert "give x_train / x_test" not in text


def test_whole_number_float_labels_deploy_as_their_integers(tmp_path, app, ckpt, digits):
    """docs/deploy.md: labels 0.0/1.0/… (a float array, as pandas saves them) are class indices 0/1/…; the
    artifact and its figures equal those of the same data with int64 labels."""
    import json

    xtr, ytr, xte, yte = digits
    ints = _npz(tmp_path, "ints", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    floats = _npz(
        tmp_path, "floats", x_train=xtr, y_train=ytr.astype(np.float32), x_test=xte, y_test=yte * 1.0
    )
    for name, data in (("i", ints), ("f", floats)):
        args = ["deploy", str(ckpt), "--data", str(data), *FAST, "--seed", "0", "-o", str(tmp_path / name)]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
    q = [json.loads((tmp_path / n / "manifest.json").read_text())["quality"] for n in ("i", "f")]
    assert q[0] == q[1]
    assert (tmp_path / "i" / "model.dpla").read_bytes() == (tmp_path / "f" / "model.dpla").read_bytes()
