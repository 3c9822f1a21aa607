"""deploy reads what `deltaplane merge --max-shard-size` writes (index + shards), through one strict index reader.

Before: a sharded folder was refused ("merge again with a larger --max-shard-size"), and registry register read
an index that named ``../x.safetensors`` or left a tensor duplicated across shards without a word.
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from deltaplane.deploy import register_architecture, save_checkpoint
from deltaplane.deploy.artifact import read_artifact
from deltaplane.deploy.bundle import load_deployable

LOOSE = [
    "--max-accuracy-drop",
    "100",
    "--max-ood-drop",
    "100",
    "--max-disagreement",
    "100",
    "--attack-eps",
    "0",
]


def _merge_app():
    import typer

    from deltaplane.commands.merging import register

    a = typer.Typer()
    register(a)
    a.command("version")(lambda: None)  # a second command so typer keeps `merge` as a subcommand
    return a


def _merge(tmp_path, src, out, *extra):
    cfg = {"merge_method": "linear", "models": [{"model": str(src), "parameters": {"weight": 1.0}}] * 2}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(_merge_app(), ["merge", str(tmp_path / "m.yaml"), "-o", str(out), "-q", *extra])
    assert r.exit_code == 0, r.output
    return out


def test_deploy_of_a_sharded_merge_equals_deploy_of_the_one_file_merge(app, tmp_path, trained_cnn):
    from deltaplane.sim.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(trained_cnn.state_dict())
    ck = save_checkpoint(model, tmp_path / "ck", {"architecture": "DigitsCNN"})
    one = _merge(tmp_path, ck, tmp_path / "one")
    sharded = _merge(tmp_path, ck, tmp_path / "sharded", "--max-shard-size", "2KB")
    assert (
        len(list(sharded.glob("model-*-of-*.safetensors"))) >= 3
        and not (sharded / "model.safetensors").exists()
    )
    base = ["deploy", "--prune", "0.5", "--finetune-epochs", "0", "--seed", "0", *LOOSE]
    for folder in (one, sharded):
        r = CliRunner().invoke(
            app, [*base[:1], str(folder), *base[1:], "-o", str(tmp_path / f"d_{folder.name}")]
        )
        assert r.exit_code == 0, r.output
    a = read_artifact(tmp_path / "d_one" / "model.dpla").state_dict()
    b = read_artifact(tmp_path / "d_sharded" / "model.dpla").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("d_one", "d_sharded"))
    assert ma["quality"] == mb["quality"]
    # registry register reads the same folder through the same loader
    assert load_deployable(sharded).state.keys() == load_file(one / "model.safetensors").keys()


def _tiny(tmp_path):
    register_architecture("TinyShardMLP", lambda cfg: torch.nn.Sequential(torch.nn.Linear(64, 10)))
    ck = save_checkpoint(
        torch.nn.Sequential(torch.nn.Linear(64, 10)), tmp_path / "ck", {"architecture": "TinyShardMLP"}
    )
    out = _merge(tmp_path, ck, tmp_path / "sh", "--max-shard-size", "1KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    return out, index


def _write(out, index):
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def _hostile(kind, out, index, tmp_path):
    wm = index["weight_map"]
    first, second = sorted(set(wm.values()))[:2]
    name = next(k for k, v in wm.items() if v == first)
    if kind == "dotdot":
        (tmp_path / "x.safetensors").write_bytes((out / first).read_bytes())
        wm[name] = "../x.safetensors"
        return "bare .safetensors file name"
    if kind == "absolute":
        wm[name] = str((out / first).resolve())
        return "bare .safetensors file name"
    if kind == "missing":
        (out / second).unlink()
        return "missing from"
    if kind == "claimed":
        wm[name] = second
        return "does not hold them"
    if kind == "duplicated":
        t = load_file(out / second)
        t.update({name: load_file(out / first)[name]})
        save_file(t, out / second)
        return "duplicated across shards"
    if kind == "huge":
        index["padding"] = "x" * (100 * 2**20)
        return "safetensors index"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "missing", "claimed", "duplicated", "huge"])
def test_a_hostile_index_is_refused_by_deploy_and_register_and_nothing_is_written(app, tmp_path, kind):
    from deltaplane.errors import DecodeError

    out, index = _tiny(tmp_path)
    expect = _hostile(kind, out, index, tmp_path)
    _write(out, index)
    r = CliRunner().invoke(app, ["deploy", str(out), "-o", str(tmp_path / "dep")])
    assert r.exit_code == 1, r.output
    assert expect in " ".join(r.output.split()) and not (tmp_path / "dep").exists(), r.output
    with pytest.raises(DecodeError, match=expect):
        load_deployable(out)
