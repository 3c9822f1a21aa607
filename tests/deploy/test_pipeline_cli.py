import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from deltaplane.deploy import (
    deploy_classifier,
    load_checkpoint,
    parse_prune,
    read_artifact,
    register_architecture,
    save_checkpoint,
)
from deltaplane.errors import ConfigError, ExportError, ShapeMismatch, UnsupportedLayer


def test_parse_prune_specs():
    assert parse_prune("2:4") == {"method": "nm", "n": 2, "m": 4}
    assert parse_prune("wanda:2:4") == {"method": "wanda", "n": 2, "m": 4}
    assert parse_prune("0.8") == {"method": "magnitude", "sparsity": 0.8}
    assert parse_prune("layer:0.5") == {"method": "layer", "sparsity": 0.5}
    assert parse_prune("channels:0.25") == {"method": "channels", "sparsity": 0.25}
    assert parse_prune("none") is None
    for bad in ("1.5", "0", "1", "-0.1", "channels:1.0"):
        with pytest.raises(ConfigError, match="strictly between 0 and 1"):
            parse_prune(bad)
    with pytest.raises(ConfigError, match="not understood"):
        parse_prune("sometimes")
    # N:M with n >= m or n = 0 is refused when the spec is read, before a model is loaded and calibrated
    for bad in ("4:2", "4:4", "0:4", "wanda:5:4", "sparsegpt:0:2"):
        with pytest.raises(ConfigError, match="needs 0 < n < m"):
            parse_prune(bad)


def test_parse_prune_reads_the_spec_grammar():
    # the grammar forms mean the same as the short forms (docs/deploy.md)
    assert parse_prune("nm(n=2, m=4)") == parse_prune("2:4") == parse_prune("nm(2, 4)")
    assert parse_prune("magnitude(0.8)") == parse_prune("0.8") == {"method": "magnitude", "sparsity": 0.8}
    assert parse_prune("wanda(n=2, m=4)") == parse_prune("wanda:2:4")
    assert parse_prune("sparsegpt(0.5)") == {"method": "sparsegpt", "sparsity": 0.5}
    assert parse_prune("layer(sparsity=0.5)") == {"method": "layer", "sparsity": 0.5}
    with pytest.raises(ConfigError, match="needs 0 < n < m"):
        parse_prune("nm(n=4, m=2)")
    with pytest.raises(ConfigError, match="takes sparsity, got \\['m', 'n'\\]"):
        parse_prune("layer(n=2, m=4)")
    # non-ASCII digits used to read as 2:4 (Arabic-Indic) and 0.5; a spec is ASCII, as a codec spec is
    for bad in ("\u0662:\u0664", "0.\u0665", "nm(n=\u0662, m=4)"):
        with pytest.raises(ConfigError, match="non-ASCII character .*retype it with the digits 0-9"):
            parse_prune(bad)
    # numbers are the grammar's: no leading '+', finite, no '_' or hex
    for bad in ("+0.5", "layer:+0.5", "+2:4", "magnitude(+0.5)"):
        with pytest.raises(ConfigError, match="without a leading '\\+'"):
            parse_prune(bad)
    for bad, why in (
        ("1e999", "out of the float range"),
        ("1_0:16", "cannot read number"),
        ("nan", "unknown method"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_prune(bad)


def test_deploy_classifier_end_to_end(tmp_path, helpers, trained_cnn, digits):
    xtr, ytr, xte, yte = digits

    def finetune(model, result):
        helpers.fit(model, xtr, ytr, epochs=3, lr=0.01, masks=result.masks)

    res = deploy_classifier(
        trained_cnn,
        tmp_path / "out",
        x_test=xte,
        y_test=yte,
        x_calib=xtr[:128],
        prune="0.8",
        quant="int8",
        finetune=finetune,
        exclude=["conv1"],
        latency_iters=30,
    )
    assert sorted(res.files) == ["MODEL_CARD.md", "manifest.json", "model.dpla", "model.onnx"]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["sizes"]["artifact_bytes"] == (tmp_path / "out" / "model.dpla").stat().st_size
    assert m["sizes"]["compression_ratio"] > 6.0
    assert 0.6 < m["weight_sparsity"] < 0.8  # conv1 excluded
    assert res.comparison.drops["clean"] <= 2.0
    assert m["export_max_abs_diff"] < 1e-4 and len(m["source_sha256"]) == 64
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    for section in ("## Intended use", "## Data", "## Metrics", "## Limitations"):
        assert section in card
    art = read_artifact(tmp_path / "out" / "model.dpla")
    assert art.graph is not None and any(v.dtype == np.int8 for v in art.tensors.values())
    assert art.manifest["source_sha256"] == m["source_sha256"] and art.manifest["prune"] == "0.8"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind


def test_weights_format_int4(tmp_path, trained_cnn, digits):
    xtr, _, xte, yte = digits
    res = deploy_classifier(
        trained_cnn,
        tmp_path / "w",
        x_test=xte,
        y_test=yte,
        x_calib=xtr[:32],
        quant="int4",
        fmt="weights",
        latency_iters=10,
    )
    assert res.manifest["sizes"]["compression_ratio"] > 5.0
    assert res.comparison.drops["clean"] <= 2.0
    sd = read_artifact(res.artifact).state_dict()
    assert sd["fc1.weight"].shape == (64, 256)


def test_failed_deploy_leaves_no_partial_output(tmp_path, digits):
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return torch.fft.fft(self.fc(x.flatten(1))).real  # no ONNX export for complex FFT

    xtr, _, xte, yte = digits
    with pytest.raises((ExportError, UnsupportedLayer)):
        deploy_classifier(Bad(), tmp_path / "out", x_test=xte, y_test=yte, x_calib=xtr[:8], latency_iters=5)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def checkpoint(tmp_path, trained_cnn):
    """A DigitsCNN checkpoint (the simulator's model class; same layer names and shapes as the test CNN)."""
    from deltaplane.sim.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(trained_cnn.state_dict())
    register_architecture("DigitsCNN", lambda cfg: DigitsCNN())  # what `deltaplane deploy` registers too
    register_architecture("SmallCNN", lambda cfg: DigitsCNN())
    return save_checkpoint(model, tmp_path / "ckpt", {"architecture": "DigitsCNN"})


def test_checkpoint_config_must_match_weights(tmp_path, checkpoint, trained_cnn):
    ck = load_checkpoint(checkpoint)
    assert torch.equal(ck.model.fc1.weight, trained_cnn.fc1.weight) and len(ck.sha256) == 64
    # a config whose architecture has different shapes than the weights
    register_architecture("Wider", lambda cfg: torch.nn.Sequential(torch.nn.Linear(8, 8)))
    (checkpoint / "config.json").write_text(json.dumps({"architecture": "Wider"}))
    with pytest.raises(ShapeMismatch, match="do not match the Wider config"):
        load_checkpoint(checkpoint)
    sd = {k: v.contiguous() for k, v in trained_cnn.state_dict().items()}
    sd["fc1.weight"] = torch.zeros(32, 256)
    save_file(sd, str(checkpoint / "model.safetensors"))
    (checkpoint / "config.json").write_text(json.dumps({"architecture": "SmallCNN"}))
    with pytest.raises(ShapeMismatch, match=r"fc1.weight: weights \(32, 256\) vs config \(64, 256\)"):
        load_checkpoint(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({"architecture": "Nope"}))
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_checkpoint(checkpoint)
    with pytest.raises(ConfigError):
        load_checkpoint(tmp_path / "missing")


def test_cli_deploy_prints_table_and_writes_outputs(app, tmp_path, checkpoint):
    # a path over 120 characters with [..] in it: printed whole (rich wraps at 80 columns when stdout is no
    # terminal, and reads [..] as markup), so it can be copied from the output
    out = tmp_path / ("out-" + "x" * 100) / "[v2]"
    r = CliRunner().invoke(
        app,
        [
            "deploy",
            str(checkpoint),
            "--prune",
            "2:4",
            "--quant",
            "int8",
            "--format",
            "onnx",
            "-o",
            str(out),
            "--finetune-epochs",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    for word in (
        "size (bytes)",
        "accuracy clean",
        "accuracy rotation",
        "latency b=1",
        "ECE",
        "not pruned: conv1",
    ):
        assert word in r.output
    assert f"to {out}\n" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "MODEL_CARD.md",
        "manifest.json",
        "model.dpla",
        "model.onnx",
    ]
    r = CliRunner().invoke(app, ["deploy", str(checkpoint), "--prune", "1.5", "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and r.output.startswith("error:") and "strictly between 0 and 1" in r.output
    assert not (tmp_path / "bad").exists()
    r = CliRunner().invoke(app, ["deploy", str(checkpoint), "--quant", "int3", "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "quant must be one of" in r.output
    (checkpoint / "config.json").write_text(json.dumps({"architecture": "Wider"}))
    register_architecture("Wider", lambda cfg: torch.nn.Sequential(torch.nn.Linear(8, 8)))
    r = CliRunner().invoke(app, ["deploy", str(checkpoint), "-o", str(tmp_path / "bad")])
    assert (
        r.exit_code == 1 and "do not match" in r.output and "config.json belongs to these weights" in r.output
    )
    assert not (tmp_path / "bad").exists()


def test_single_file_checkpoint_with_config_metadata(tmp_path, helpers, trained_cnn):
    register_architecture("SmallCNN", lambda cfg: helpers.cnn())
    sd = {k: v.contiguous() for k, v in trained_cnn.state_dict().items()}
    save_file(
        sd, str(tmp_path / "m.safetensors"), metadata={"config": json.dumps({"architecture": "SmallCNN"})}
    )
    ck = load_checkpoint(tmp_path / "m.safetensors")
    assert ck.architecture == "SmallCNN" and torch.equal(ck.model.conv2.weight, trained_cnn.conv2.weight)
    assert ck.weights_nbytes == (tmp_path / "m.safetensors").stat().st_size
    save_file(sd, str(tmp_path / "n.safetensors"))
    with pytest.raises(ConfigError, match="no 'config' metadata"):
        load_checkpoint(tmp_path / "n.safetensors")


def test_config_less_checkpoint_deploys_with_a_builder(tmp_path, helpers, trained_cnn):
    """A federated task's model (`registry pull` after docs/fleet.md) is plain weights, no config metadata.
    Before: refused even with --builder, telling the user to write a config.json; now the builder gets {} and
    the refusal without one names --builder."""
    sd = {k: v.contiguous() for k, v in trained_cnn.state_dict().items()}
    save_file(sd, str(tmp_path / "n.safetensors"))
    with pytest.raises(ConfigError, match="pass --builder file.py:function"):
        load_checkpoint(tmp_path / "n.safetensors")
    seen: list[object] = []
    ck = load_checkpoint(tmp_path / "n.safetensors", builder=lambda cfg: seen.append(cfg) or helpers.cnn())
    assert seen == [{}] and ck.config == {}
    assert torch.equal(ck.model.conv2.weight, trained_cnn.conv2.weight)


def test_deploy_refuses_numbers_it_would_choke_on_or_ignore(app, tmp_path):
    """Before: --seed -1 (or 2**64) was a numpy / torch ValueError traceback after the model was loaded,
    --finetune-epochs -1, --attack-eps nan or -1 and --recover-lr nan were taken silently (no fine-tuning, a
    skipped attack, NaN weights), and --data naming a FIFO hung for good in np.load. Now each is a usage error
    (exit 2) naming the option, before anything is loaded or written."""
    import os

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")  # never read: the options are checked first
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    for args, message in (
        (["--seed", "-1"], "--seed must be an integer from 0 to 2**64 - 1. Found -1"),
        (["--seed", str(2**64)], "--seed must be an integer from 0 to 2**64 - 1"),
        (["--finetune-epochs", "-1"], "--finetune-epochs must be >= 0"),
        (["--attack-eps", "0.05", "--attack-eps", "nan"], "--attack-eps must be a finite number >= 0"),
        (["--attack-eps", "-1"], "--attack-eps must be a finite number >= 0"),
        (["--recover-lr", "nan"], "--recover-lr must be a positive finite learning rate"),
        (["--data", str(fifo)], "must be a regular file, not a FIFO (named pipe)"),
    ):
        r = CliRunner().invoke(app, ["deploy", str(model), "-o", str(tmp_path / "out"), *args])
        assert r.exit_code == 2 and message in r.output, (args, r.output, r.exception)
        assert not (tmp_path / "out").exists()


def test_deploy_refuses_options_the_model_would_not_use(app, tmp_path, checkpoint):
    """`--sentences` (and the other token-model inputs) on a classifier, `--exclude` without `--prune`, and the
    classifier's `--data`/`--exclude` on an ONNX file were silently ignored: the model shipped was measured on
    other inputs, or pruned otherwise, than the command line said. Each is now a usage error naming the option."""
    sentences = tmp_path / "s.txt"
    sentences.write_text("a sentence\n")
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")  # never read: the options are refused first
    for model, args, message in (
        (checkpoint, ["--sentences", str(sentences)], "--sentences feeds a token model's evaluation text"),
        (checkpoint, ["--random-tokens"], "--random-tokens feeds a token model random ids"),
        (checkpoint, ["--exclude", "fc2"], "nothing is pruned: pass a --prune spec, or drop --exclude"),
        (onnx_file, ["--prune", "0.5", "--exclude", "fc2"], "the model to deploy is an ONNX file"),
        (onnx_file, ["--data", str(data)], "--data feeds a classifier's training and test images"),
    ):
        r = CliRunner().invoke(
            app, ["deploy", str(model), "--quant", "none", "-o", str(tmp_path / "out"), *args]
        )
        assert r.exit_code == 2 and message in r.output, (args, r.output, r.exception)
        assert not (tmp_path / "out").exists()
