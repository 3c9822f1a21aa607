"""`deltaplane registry register` takes what `deploy` wrote: .dpla, .onnx and the deploy folder."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from deltaplane.commands.deploy import register as register_deploy
from deltaplane.commands.ops import register as register_ops
from deltaplane.deploy import deploy_classifier, read_artifact
from deltaplane.deploy.bundle import load_deployable
from deltaplane.deploy.gates import Gates
from deltaplane.errors import ConfigError, DecodeError
from deltaplane.registry import Registry


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, trained_cnn, digits):
    xtr, _, xte, yte = digits
    out = tmp_path_factory.mktemp("dep") / "out"
    deploy_classifier(  # with the default gates: the lineage's "passed" means they were checked
        trained_cnn,
        out,
        x_test=xte,
        y_test=yte,
        x_calib=xtr[:64],
        quant="int8",
        latency_iters=5,
        gates=Gates(),
    )
    return out


def test_load_deployable_each_kind(deployed, tmp_path):
    art = read_artifact(deployed / "model.dpla")
    d = load_deployable(deployed / "model.dpla")
    assert set(d.state) == set(art.tensors) and any(t.dtype == torch.int8 for t in d.state.values())
    assert d.lineage["deploy"]["quant"] == "int8" and len(d.lineage["source"]["sha256"]) == 64
    folder = load_deployable(deployed)
    assert folder.lineage["deploy"]["sizes"]["artifact_bytes"] == (deployed / "model.dpla").stat().st_size
    assert "gates" in folder.lineage["deploy"]
    onnx_state = load_deployable(deployed / "model.onnx").state
    for k, v in d.state.items():  # the ONNX file is exactly what the artifact decodes to
        assert torch.equal(onnx_state[k], v), k
    bad = tmp_path / "bad.dpla"
    bad.write_bytes(b"DPLA" + b"\x01" + b"\xff" * 40)
    with pytest.raises(DecodeError):
        load_deployable(bad)
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(ConfigError, match=".safetensors, .dpla, .onnx or a deploy output folder"):
        load_deployable(tmp_path / "x.bin")
    with pytest.raises(ConfigError, match="a deploy output \\(model.dpla\\)"):
        load_deployable(tmp_path)


def test_registry_register_accepts_deploy_outputs(deployed, tmp_path, monkeypatch):
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    register_ops(app)
    register_deploy(app)
    monkeypatch.setenv("DELTAPLANE_HOME", str(tmp_path / "home"))
    run = CliRunner()
    assert run.invoke(app, ["registry", "init"]).exit_code == 0
    for path in (deployed / "model.dpla", deployed, deployed / "model.onnx"):
        r = run.invoke(app, ["registry", "register", "cnn-int8", str(path), "--lineage", '{"round": 3}'])
        assert r.exit_code == 0, r.output
    reg = Registry(tmp_path / "home")
    v1 = reg.get("cnn-int8", 1)
    assert v1.lineage["round"] == 3 and v1.lineage["deploy"]["quant"] == "int8"
    assert reg.get("cnn-int8", 2).lineage["deploy"]["gates"]["passed"] is True
    bad = tmp_path / "broken.dpla"
    bad.write_bytes((deployed / "model.dpla").read_bytes()[:-10])
    r = run.invoke(app, ["registry", "register", "cnn-int8", str(bad)])
    assert (
        r.exit_code == 1 and r.output.startswith("error:") and "Traceback" not in r.output
    )  # bad input data
    assert len(r.output.strip().splitlines()) == 1
    assert json.loads(json.dumps(v1.lineage))  # lineage stays plain JSON


def test_deploy_folder_whose_manifest_describes_another_artifact_is_refused(deployed, tmp_path):
    # a refused model's model.dpla copied beside a passing deploy's manifest used to be registered with the
    # passing deploy's quality and gates in its lineage
    import shutil

    import numpy as np

    from deltaplane.deploy import write_artifact

    mixed = tmp_path / "mixed"
    shutil.copytree(deployed, mixed)
    write_artifact(mixed / "model.dpla", {"w": np.zeros((2, 2), np.float32)}, manifest={"model": "other"})
    with pytest.raises(DecodeError, match="describes another model.dpla"):
        load_deployable(mixed)
    (mixed / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DecodeError, match="not a deploy manifest"):
        load_deployable(mixed)
    (mixed / "manifest.json").write_text('"gates"')
    with pytest.raises(DecodeError, match="not a deploy manifest"):
        load_deployable(mixed)


@pytest.mark.parametrize("how", ["flip", "swap", "add"])
def test_deploy_folder_whose_model_onnx_is_not_the_deployed_one_is_refused(deployed, tmp_path, how):
    """Only model.dpla was matched against the manifest: a model.onnx changed or swapped after the deploy (the
    graph a device runs) loaded with the deploy's quality and gates in the lineage."""
    import hashlib
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(deployed, mixed)
    graph = mixed / "model.onnx"
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert (
        graph.is_file() and manifest["sha256"]["model.onnx"] == hashlib.sha256(graph.read_bytes()).hexdigest()
    )
    load_deployable(mixed)  # as deployed: fine
    if how == "flip":
        data = bytearray(graph.read_bytes())
        data[-1] ^= 1
        graph.write_bytes(bytes(data))
    elif how == "swap":
        graph.write_bytes(b"another graph")
    else:  # a graph the deploy did not write (as beside a --format weights artifact)
        del manifest["sha256"]["model.onnx"]
        (mixed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DecodeError, match="describes another model.onnx"):
        load_deployable(mixed)


def test_a_fifo_is_named_as_one_not_reported_missing(tmp_path):
    """Before: `registry register m pipe.safetensors` said 'pipe.safetensors does not exist' for a FIFO that
    does exist, which sends the user looking for a missing file; now it says what the path is."""
    import os

    from deltaplane.errors import ConfigError

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="a model file must be a regular file, not a FIFO"):
        load_deployable(fifo)
    with pytest.raises(ConfigError, match="nowhere.safetensors does not exist"):
        load_deployable(tmp_path / "nowhere.safetensors")
