"""A corrupt checkpoint is a typed error naming the file, never a SafetensorError / JSONDecodeError traceback."""

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from deltaplane.deploy import load_checkpoint, register_architecture, save_checkpoint
from deltaplane.errors import ConfigError, DecodeError


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 10))


@pytest.fixture(autouse=True)
def _arch():
    register_architecture("TinyMLP", lambda cfg: _model())


def _folder(tmp_path):
    return save_checkpoint(_model(), tmp_path / "ck", {"architecture": "TinyMLP"})


def test_truncated_weights_are_a_decode_error_naming_the_file(tmp_path):
    ck = _folder(tmp_path)
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(DecodeError, match=r"model.safetensors is not a readable safetensors file"):
        load_checkpoint(ck)


def test_junk_single_file_is_a_decode_error(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\xff" * 64)
    with pytest.raises(DecodeError, match="junk.safetensors is not a readable safetensors file"):
        load_checkpoint(p)


def test_bad_config_metadata_is_a_config_error(tmp_path):
    sd = {k: v.contiguous() for k, v in _model().state_dict().items()}
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p), metadata={"config": "{architecture: TinyMLP"})
    with pytest.raises(ConfigError, match=r"'config' metadata of .*m.safetensors is not valid JSON"):
        load_checkpoint(p)
    save_file(sd, str(p), metadata={"config": json.dumps(["TinyMLP"])})
    with pytest.raises(ConfigError, match="must be a JSON object, not list"):
        load_checkpoint(p)


def test_config_json_that_is_not_an_object(tmp_path):
    ck = _folder(tmp_path)
    (ck / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config.json\) must be a JSON object"):
        load_checkpoint(ck)


def test_cli_says_error_and_exits_1(app, tmp_path):
    """A DecodeError is exit 1 (a failure reading an input), like every DecodeError in the CLI (docs/cli.md)."""
    ck = _folder(tmp_path)
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[:20])
    r = CliRunner().invoke(app, ["deploy", str(ck), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and "error:" in r.output, r.output
    assert "model.safetensors is not a readable safetensors file" in " ".join(r.output.split())


def test_a_fifo_checkpoint_is_refused_not_waited_on(tmp_path):
    """Before: `deltaplane deploy pipe.safetensors` (or a folder whose model.safetensors is a FIFO) hung for good
    in safetensors' open (holding the GIL, so only a separate process can time it out); now a ConfigError
    (exit 2) naming the file and what it is, before anything is written."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    ck = _folder(tmp_path)
    (ck / "model.safetensors").unlink()
    os.mkfifo(ck / "model.safetensors")
    for model, message in (
        (fifo, "pipe.safetensors: a checkpoint must be a regular file, not a FIFO (named pipe)"),
        (ck, "model.safetensors: a weights file must be a regular file, not a FIFO (named pipe)"),
    ):
        code = (
            "from deltaplane.deploy import load_checkpoint, register_architecture\n"
            "import torch\n"
            "register_architecture('TinyMLP', lambda cfg: torch.nn.Sequential(torch.nn.Linear(64, 10)))\n"
            f"load_checkpoint({str(model)!r})\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "deltaplane.errors.ConfigError" in proc.stderr and message in proc.stderr, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "deltaplane", "deploy", str(fifo), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not a FIFO (named pipe)" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_path_that_is_not_utf8_is_a_usage_error_saying_to_rename_it(app, tmp_path):
    """Before: a checkpoint, folder, registry source or PEFT adapter whose path is not UTF-8 (Linux allows any
    bytes in a name) came back as 'is not a readable safetensors file: Path ... is not valid UTF-8', a
    DecodeError (exit 1) as if the file were corrupt; the file is fine, only the safetensors library cannot
    take its name. Now a ConfigError (exit 2) that says to rename it; the same bytes under a UTF-8 name load."""
    import os

    from deltaplane.adapters import LoRADelta, LoRALayer, load_peft, save_peft
    from deltaplane.deploy.bundle import load_deployable

    good = _folder(tmp_path)
    layer = LoRALayer(torch.randn(2, 64), torch.randn(10, 2), alpha=4.0)
    save_peft(LoRADelta({"0.weight": layer}), tmp_path / "ad")
    bad_adapter = tmp_path / os.fsdecode(b"ad\xfd")
    os.rename(tmp_path / "ad", bad_adapter)
    bad_file = tmp_path / os.fsdecode(b"m\xff.safetensors")
    sd = {k: v.contiguous() for k, v in _model().state_dict().items()}
    save_file(
        sd, str(tmp_path / "m.safetensors"), metadata={"config": json.dumps({"architecture": "TinyMLP"})}
    )
    os.rename(tmp_path / "m.safetensors", bad_file)
    bad_folder = tmp_path / os.fsdecode(b"ck\xfe")
    os.rename(good, bad_folder)
    rename = "whose path is not UTF-8; rename the file"
    for load, path in (
        (load_checkpoint, bad_file),
        (load_checkpoint, bad_folder),
        (load_deployable, bad_file),
        (load_peft, bad_adapter),
    ):
        with pytest.raises(ConfigError, match=rename):
            load(path)
    r = CliRunner().invoke(app, ["deploy", str(bad_file), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and rename in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out").exists()
    os.rename(bad_file, tmp_path / "m.safetensors")
    assert set(load_checkpoint(tmp_path / "m.safetensors").model.state_dict()) == set(sd)


def test_a_sharded_merge_output_loads_as_the_one_file_merge_does(tmp_path):
    """`deltaplane merge --max-shard-size` writes model-0000N-of-0000M.safetensors + an index: deploy read it as a
    folder with no weights, then refused it as sharded; it now loads the same weights as the one-file merge."""
    from deltaplane.merging import merge_files

    ck = _folder(tmp_path)
    cfg = {"merge_method": "linear", "models": [{"model": str(ck), "parameters": {"weight": 1.0}}] * 2}
    merge_files(cfg, tmp_path / "merged", max_shard_bytes=1024)
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    sharded = load_checkpoint(tmp_path / "merged").model.state_dict()
    merge_files(cfg, tmp_path / "one", overwrite=True)
    one = load_checkpoint(tmp_path / "one").model.state_dict()
    assert sharded.keys() == one.keys() and all(torch.equal(sharded[k], one[k]) for k in one)
    merge_files(cfg, tmp_path / "merged", overwrite=True)  # as the message says: one file, which deploys
    load_checkpoint(tmp_path / "merged")
