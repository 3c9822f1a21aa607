"""Publishing a deploy: OUT is checked before any work, replaced as a whole, and is always old-complete or
new-complete; the manifest names its model files' SHA-256."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deltaplane.deploy import deploy_classifier, register_architecture, save_checkpoint
from deltaplane.errors import ConfigError


class CountingMLP(torch.nn.Module):
    """64 → 10 on flattened digits; counts forward calls, so a test can tell that no work ran."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x.flatten(1))


def _deploy(model, out, digits, **kw):
    xtr, _, xte, yte = digits
    return deploy_classifier(
        model, out, x_test=xte, y_test=yte, x_calib=xtr[:16], latency_iters=3, device_cost=False, **kw
    )


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_redeploy_replaces_the_whole_folder_and_manifest_names_its_files(tmp_path, digits):
    out = tmp_path / "out"
    _deploy(CountingMLP(), out, digits, fmt="onnx", quant="none")
    assert (out / "model.onnx").exists()
    # a second deploy into the same folder (what `make run` does): no model.onnx of the first one survives
    res = _deploy(CountingMLP(), out, digits, fmt="weights", prune="0.8", quant="int4")
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "manifest.json", "model.dpla"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "weights" and m["prune"] == "0.8" and m["quant"] == "int4"
    assert m["sha256"] == {"model.dpla": hashlib.sha256((out / "model.dpla").read_bytes()).hexdigest()}
    assert res.files == ["MODEL_CARD.md", "manifest.json", "model.dpla"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folder left beside it
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # a plain folder's mode, not mkdtemp's


@pytest.mark.parametrize(
    ("fmt", "victim", "how"),
    [
        ("onnx", "model.onnx", "flip"),
        ("onnx", "model.dpla", "swap"),
        ("onnx", "model.onnx", "remove"),
        ("weights", "model.dpla", "flip"),
        ("weights", "model.onnx", "add"),
    ],
)
def test_a_model_file_changed_after_the_gates_is_not_published(
    tmp_path, digits, monkeypatch, fmt, victim, how
):
    """The gates measured the bytes read back from the staged artifact; a staged file changed, swapped for
    another deploy's, removed or added after they ran was published under their numbers and its own hash."""
    import deltaplane.deploy.pipeline as pipeline
    from deltaplane.errors import ExportError

    _deploy(CountingMLP(), tmp_path / "other", digits, fmt=fmt, quant="none")
    other = (tmp_path / "other" / "model.dpla").read_bytes()
    real = pipeline._check_gates

    def gates_then_tamper(manifest, gates, why=None):
        real(manifest, gates, why)
        (staged,) = [p for p in tmp_path.iterdir() if p.name not in ("other", "out")]
        f = staged / victim
        if how == "flip":
            data = bytearray(f.read_bytes())
            data[-1] ^= 1
            f.write_bytes(bytes(data))
        elif how == "swap":
            f.write_bytes(other)
        elif how == "remove":
            f.unlink()
        else:  # a graph beside a weights-only artifact, which nothing evaluated
            f.write_bytes(b"not evaluated")

    monkeypatch.setattr(pipeline, "_check_gates", gates_then_tamper)
    torch.manual_seed(1)
    with pytest.raises(ExportError, match="bytes that were evaluated") as e:
        _deploy(CountingMLP(), tmp_path / "out", digits, fmt=fmt, quant="none")
    assert victim in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no OUT, no staging left


def test_bad_out_is_refused_before_any_work(tmp_path, digits):
    model = CountingMLP()
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for bad, match in ((afile, "is a file"), (afile / "sub", "is a file, not a folder")):
        with pytest.raises(ConfigError, match=match):
            _deploy(model, bad, digits)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="pass --overwrite"):
        _deploy(model, foreign, digits)
    assert model.calls == 0  # refused before pruning, export or evaluation ran
    assert afile.read_text() == "mine" and _snapshot(foreign) == {"notes.txt": b"mine"}
    # overwrite=True replaces the foreign folder as a whole
    _deploy(model, foreign, digits, quant="none", overwrite=True)
    names = ["MODEL_CARD.md", "manifest.json", "model.dpla", "model.onnx"]
    assert sorted(p.name for p in foreign.iterdir()) == names


def test_overwrite_replaces_a_folder_that_is_not_a_deploy(tmp_path, digits):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").mkdir()  # the review's partial-publish case: a directory where a file goes
    with pytest.raises(ConfigError, match="not a deploy's output"):
        _deploy(CountingMLP(), out, digits, quant="none")
    assert (out / "model.onnx").is_dir() and len(list(out.iterdir())) == 1
    _deploy(CountingMLP(), out, digits, quant="none", overwrite=True)
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "move-aside"])
def test_a_failed_publish_leaves_the_old_deploy_whole(tmp_path, digits, monkeypatch, exchange):
    import deltaplane.deploy.publish as publish

    out = tmp_path / "out"
    _deploy(CountingMLP(), out, digits, quant="none")
    before = _snapshot(out)
    real_rename = os.rename

    def failing_rename(src, dst):
        if (
            ".out." in str(src) and ".old-" not in str(src) and str(dst) == str(out)
        ):  # the step that puts the new folder in place
            raise OSError(5, "I/O error (injected)")
        return real_rename(src, dst)

    if exchange:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(5, "EIO")))
    else:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
        monkeypatch.setattr(publish.os, "rename", failing_rename)
    with pytest.raises(ConfigError, match="nothing was changed"):
        _deploy(CountingMLP(), out, digits, fmt="weights", quant="int4")
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    import deltaplane.deploy.publish as publish

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not publish._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


@pytest.fixture()
def app(app):
    """conftest's deploy app, with DigitsCNN registered as an architecture."""
    from deltaplane.sim.model import DigitsCNN

    register_architecture("DigitsCNN", lambda cfg: DigitsCNN())
    return app


def test_cli_checks_out_before_loading_and_takes_overwrite(tmp_path, app, trained_cnn):
    from deltaplane.sim.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(trained_cnn.state_dict())
    ckpt = save_checkpoint(model, tmp_path / "ckpt", {"architecture": "DigitsCNN"})
    afile = tmp_path / "afile"
    afile.write_text("x")
    fast = ["--quant", "none", "--attack-eps", "0", "--no-gates"]
    r = CliRunner().invoke(app, ["deploy", str(tmp_path / "missing"), "-o", str(afile), *fast])
    assert r.exit_code == 2 and "is a file" in r.output, r.output  # before the (missing) model is read
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    r = CliRunner().invoke(app, ["deploy", str(ckpt), "-o", str(foreign), *fast])
    assert r.exit_code == 2 and "--overwrite" in r.output and (foreign / "keep.txt").exists()
    r = CliRunner().invoke(app, ["deploy", str(ckpt), "-o", str(foreign), "--overwrite", *fast])
    assert r.exit_code == 0, r.output
    assert not (foreign / "keep.txt").exists() and (foreign / "model.dpla").exists()
    # and again without --overwrite: a previous deploy's output is replaced
    r = CliRunner().invoke(app, ["deploy", str(ckpt), "-o", str(foreign), "--format", "weights", *fast])
    assert r.exit_code == 0, r.output
    assert not (foreign / "model.onnx").exists()
    assert np.isclose(json.loads((foreign / "manifest.json").read_text())["weight_sparsity"], 0.0)
