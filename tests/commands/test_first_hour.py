"""The registry commands as a new user types them (issue 22): HF folders, evaluators by file, clear gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from deltaplane.cli import app
from deltaplane.registry import Registry

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("DELTAPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    Registry.create(tmp_path / "home")
    return tmp_path / "home"


def _hf_folder(path: Path, scale: float, *, sharded: bool = False) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["MyMLP"], "model_type": "mlp"}))
    a, b = {"fc1.weight": torch.full((4, 4), scale)}, {"fc2.weight": torch.full((2, 4), scale)}
    if sharded:
        save_file(a, str(path / "model-00001-of-00002.safetensors"))
        save_file(b, str(path / "model-00002-of-00002.safetensors"))
        index = {
            "weight_map": {
                "fc1.weight": "model-00001-of-00002.safetensors",
                "fc2.weight": "model-00002-of-00002.safetensors",
            }
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(a | b, str(path / "model.safetensors"))
    return path


def test_register_a_hugging_face_folder_plain_or_sharded(home: Path, tmp_path: Path) -> None:
    for name, sharded in (("plain", False), ("sharded", True)):
        folder = _hf_folder(tmp_path / name, 0.5, sharded=sharded)
        r = runner.invoke(app, ["registry", "register", "mlp", str(folder)])
        assert r.exit_code == 0, r.output
    reg = Registry(home)
    for v in (1, 2):
        art = reg.get("mlp", v)
        assert art.lineage["hf_config"] == {"architectures": ["MyMLP"], "model_type": "mlp"}
        state = reg.load_state(art)
        assert set(state) == {"fc1.weight", "fc2.weight"} and float(state["fc2.weight"][0, 0]) == 0.5
    bad = tmp_path / "bin"
    bad.mkdir()
    torch.save({"w": torch.ones(1)}, bad / "pytorch_model.bin")
    r = runner.invoke(app, ["registry", "register", "mlp", str(bad)])
    assert r.exit_code == 2 and "converted" in r.output and "Traceback" not in r.output


EVALUATOR = """
def evaluate(state):
    return {"accuracy": float(state["fc1.weight"].mean())}
"""


def test_promote_with_an_evaluator_file_or_a_module_in_the_working_directory(
    home: Path, tmp_path: Path
) -> None:
    for scale in (0.9, 0.95, 0.2):
        runner.invoke(app, ["registry", "register", "mlp", str(_hf_folder(tmp_path / f"m{scale}", scale))])
    (tmp_path / "gate.py").write_text(EVALUATOR)
    # a module next to the user's files works without PYTHONPATH=.; the default gate names what it needs
    r = runner.invoke(app, ["registry", "promote", "mlp@1", "--evaluator", "gate:evaluate"])
    assert r.exit_code == 3 and "ood_accuracy" in r.output and "--tolerance accuracy=0.01" in r.output
    r = runner.invoke(
        app,
        ["registry", "promote", "mlp@1", "--evaluator", "gate.py:evaluate", "--tolerance", "accuracy=0.01"],
    )
    assert r.exit_code == 0 and "mlp@1 promoted to mlp:production" in r.output, r.output
    # an evaluator may declare its own gate
    (tmp_path / "declared.py").write_text(EVALUATOR + "\nevaluate.tolerance = {'accuracy': 0.1}\n")
    r = runner.invoke(
        app, ["registry", "promote", "mlp@2", "--evaluator", str(tmp_path / "declared.py") + ":evaluate"]
    )
    assert r.exit_code == 0 and "promoted to mlp:production (it held mlp@1)" in r.output, r.output
    r = runner.invoke(app, ["registry", "promote", "mlp@3", "--evaluator", "declared.py:evaluate"])
    assert r.exit_code == 3 and "mlp@3 REFUSED for mlp:production (it stays at mlp@2)" in r.output
    r = runner.invoke(app, ["registry", "promote", "mlp@3", "--evaluator", "missing.py:evaluate"])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_rollback_of_an_unknown_model_says_so(home: Path) -> None:
    r = runner.invoke(app, ["registry", "rollback", "nope"])
    assert r.exit_code == 1 and "no model 'nope'" in r.output and "history" not in r.output


def test_a_pulled_model_keeps_its_config_and_deploys_like_the_registered_folder(
    home: Path, tmp_path: Path
) -> None:
    """merge → register → pull → deploy: the pulled folder used to hold only model.safetensors + manifest.json,
    so `deltaplane deploy` (and load_checkpoint) refused it ("must hold config.json and model.safetensors") — the
    registered folder's config.json, naming the user's architecture, was lost (the lineage kept only
    architectures / model_type / torch_dtype). A run model's config metadata is kept the same way."""
    from deltaplane.deploy.checkpoint import load_checkpoint

    config = {"architecture": "WalkMLP", "d_in": 4, "classes": 2}
    folder = tmp_path / "merged"
    folder.mkdir()
    state = {"weight": torch.randn(2, 4), "bias": torch.zeros(2)}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "run.safetensors"), metadata={"config": json.dumps(config)})
    for ref, path in (("mlp@1", folder), ("mlp@2", tmp_path / "run.safetensors")):
        assert runner.invoke(app, ["registry", "register", "mlp", str(path)]).exit_code == 0
        r = runner.invoke(app, ["registry", "pull", ref, "-o", str(tmp_path / "pulled")])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / "pulled" / "config.json").read_text()) == config
        ck = load_checkpoint(tmp_path / "pulled", builder=lambda c: torch.nn.Linear(c["d_in"], c["classes"]))
        assert torch.equal(ck.model.weight, state["weight"])
    # a version registered without a config: a previous pull's config.json is not left beside its weights
    save_file(state, str(tmp_path / "bare.safetensors"))
    assert (
        runner.invoke(app, ["registry", "register", "mlp", str(tmp_path / "bare.safetensors")]).exit_code == 0
    )
    assert runner.invoke(app, ["registry", "pull", "mlp@3", "-o", str(tmp_path / "pulled")]).exit_code == 0
    assert not (tmp_path / "pulled" / "config.json").exists()


def test_an_evaluator_or_builder_file_imports_the_modules_beside_it(
    home: Path, tmp_path: Path, monkeypatch
) -> None:
    """`--evaluator project/evals.py:evaluate` whose evals.py does `from mymodel import ...` (the user's own model
    module in the same folder) failed with "No module named 'mymodel'" unless the working directory was that
    folder and on sys.path; a file now imports as `python project/evals.py` would run it. The same for
    `deploy --builder file.py:fn`."""
    import sys

    from deltaplane.commands.ops import load_evaluator
    from deltaplane.deploy.checkpoint import resolve_builder

    project = tmp_path / "project"
    project.mkdir()
    (project / "walkmodel37.py").write_text(
        "SCALE = 2.0\nimport torch\ndef make(c):\n    return torch.nn.Linear(4, 2)\n"
    )
    (project / "evals.py").write_text(
        "from walkmodel37 import SCALE\ndef evaluate(state):\n    return {'accuracy': SCALE / 4}\n"
    )
    (project / "build.py").write_text("from walkmodel37 import make\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(project))])
    monkeypatch.delitem(sys.modules, "walkmodel37", raising=False)
    assert load_evaluator(f"{project / 'evals.py'}:evaluate")({}) == {"accuracy": 0.5}
    assert isinstance(resolve_builder(f"{project / 'build.py'}:make")({}), torch.nn.Linear)
