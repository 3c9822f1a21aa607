"""A pulled version of a cohort that withdrew consent is never an input silently: ``merge``, ``deploy`` and
``extract-lora`` read folders, not the registry, and warn (on stderr, whatever ``-q`` says) when one is."""

import hashlib
import json

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from deltaplane.cli import app
from deltaplane.registry import Registry
from deltaplane.registry.lineage import summarize_lineage

WARNING = "which withdrew consent (its manifest.json says so)"


def _pulled(tmp_path, *, quiet=False):
    """A registry in ``tmp_path/h`` holding a@1 (cohort eu) and b@1 (us), both pulled into ``tmp_path/a`` and
    ``tmp_path/b``; and a CLI runner (``-q`` before every command with ``quiet``)."""
    home = tmp_path / "h"
    reg = Registry.create(home)
    g = torch.Generator().manual_seed(0)
    reg.register_model("a", {"layer.weight": torch.randn(8, 8, generator=g)}, governance={"cohorts": ["eu"]})
    reg.register_model("b", {"layer.weight": torch.randn(8, 8, generator=g)}, governance={"cohorts": ["us"]})
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [*(["-q"] if quiet else []), *map(str, args)], terminal_width=300)

    for ref in ("a@1", "b@1"):
        assert run("registry", "pull", ref, "-o", tmp_path / ref[0], "--home", home).exit_code == 0
    return home, reg, run


def test_commands_that_read_a_pulled_withdrawn_version_say_so(tmp_path):
    home, reg, run = _pulled(tmp_path, quiet=True)
    reg.withdraw_cohort("eu")
    assert (
        run("registry", "pull", "a@1", "-o", tmp_path / "a", "--home", home).exit_code == 0
    )  # its manifest now
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    merged = run("merge", config, "-o", tmp_path / "merged")
    lora = run("extract-lora", tmp_path / "b", "--base", tmp_path / "a", "--rank", 2, "-o", tmp_path / "ad")
    deployed = run("deploy", tmp_path / "a" / "model.safetensors", "-o", tmp_path / "dep")
    for r in (merged, lora):
        assert r.exit_code == 0, r.output
    for r in (merged, lora, deployed):
        said = " ".join(r.stderr.split())
        assert f"{tmp_path / 'a'}" in said and f"trained on 'eu', {WARNING}" in said, said
    clean = run("extract-lora", tmp_path / "a", "--base", tmp_path / "b", "--rank", 2, "-o", tmp_path / "ad2")
    assert clean.exit_code == 0 and WARNING in clean.stderr  # the fine-tune is the withdrawn one here
    save_file({"layer.weight": torch.zeros(8, 8)}, tmp_path / "z.safetensors")
    plain = run(
        "extract-lora", tmp_path / "z.safetensors", "--base", tmp_path / "b", "-r", 2, "-o", tmp_path / "x"
    )
    assert plain.exit_code == 0 and WARNING not in plain.stderr


# -- a merge output names the versions it read, and `registry register` carries their consent ----------------
def _merge(run, tmp_path, *folders):
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: linear\nmodels:\n"
        + "".join(f"  - model: {f}\n    parameters: {{weight: 1.0}}\n" for f in folders)
        + "dtype: float32\n"
    )
    r = run("merge", config, "-o", tmp_path / "merged", "--overwrite")
    assert r.exit_code == 0, r.output
    return tmp_path / "merged"


def _three_inputs(tmp_path):
    """a@1 (cohort eu) and b@1 (us) pulled into folders, c@1 (apac) registered from a folder of its own."""
    home, reg, run = _pulled(tmp_path)
    (tmp_path / "c").mkdir()
    save_file({"layer.weight": torch.ones(8, 8)}, tmp_path / "c" / "model.safetensors")
    assert run("registry", "register", "c", tmp_path / "c", "--cohort", "apac", "--home", home).exit_code == 0
    return home, reg, run


def test_a_registered_merge_carries_its_inputs_cohorts_and_their_withdrawal(tmp_path):
    # registered without --lineage sources, a merge dropped its inputs' cohorts: a withdrawal of eu never
    # reached the merged version, which stayed free to promote and serve
    home, reg, run = _three_inputs(tmp_path)
    merged = _merge(run, tmp_path, tmp_path / "a", tmp_path / "b", tmp_path / "c")
    r = run("registry", "register", "m", merged, "--home", home)
    assert r.exit_code == 0, r.output
    assert "sources a@1, b@1, c@1: they hold the weights the merge read" in " ".join(r.stderr.split())
    m = reg.get("m", 1)
    assert m.lineage["sources"] == ["a@1", "b@1", "c@1"]
    assert m.lineage["merge"]["method"] == "linear" and len(m.lineage["merge"]["inputs"]) == 3
    assert m.governance.cohorts == ("apac", "eu", "us")
    assert reg.governance_problems(m) == []
    assert "merge linear of 3 models" in summarize_lineage(m.lineage)[0]  # what `registry list` prints
    w = run("registry", "withdraw", "--cohort", "EU", "--home", home)
    assert w.exit_code == 0 and "affected versions: a@1, m@1" in w.output, w.output
    assert reg.governance_problems(m) == ["m@1 was trained on withdrawn cohort 'eu'"]
    evaluator = tmp_path / "ev.py"
    evaluator.write_text("def ev(state):\n    return {'accuracy': 1.0, 'ood_accuracy': 1.0}\n")
    p = run("registry", "promote", "m@1", "--evaluator", f"{evaluator}:ev", "--home", home)
    assert p.exit_code != 0 and "withdrawn cohort 'eu'" in " ".join(p.output.split()), p.output
    assert reg.tags("m", verify=True) == {}
    pulled = run("registry", "pull", "m@1", "-o", tmp_path / "mp", "--home", home)
    assert pulled.exit_code == 0 and "'eu', which withdrew consent" in " ".join(pulled.stderr.split())
    # a version derived from the merge (a fine-tune of it) inherits the withdrawal through it
    ft = reg.register_model("m", {"layer.weight": torch.zeros(8, 8)}, parent=1)
    assert reg.governance_problems(ft) == ["m@2 was trained on withdrawn cohort 'eu'"]


def test_a_merge_of_a_withdrawn_version_registers_with_a_warning(tmp_path):
    home, reg, run = _three_inputs(tmp_path)
    reg.withdraw_cohort("us")
    merged = _merge(run, tmp_path, tmp_path / "a", tmp_path / "b")
    r = run("registry", "register", "m", merged, "--home", home)
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())
    assert "warning: m@1 was trained on withdrawn cohort 'us': it may not be promoted, served" in said, said
    assert reg.get("m", 1).lineage["sources"] == ["a@1", "b@1"]
    quiet = run("-q", "registry", "register", "m2", merged, "--home", home)  # -q does not silence it
    assert quiet.exit_code == 0 and "withdrawn cohort 'us'" in quiet.stderr


def test_a_merge_of_pulled_versions_is_refused_where_no_version_holds_them(tmp_path):
    # registered into another registry, the pulled inputs' versions cannot be linked: their cohorts would be
    # dropped silently, so register refuses and says how to name the sources
    home, _, run = _three_inputs(tmp_path)
    merged = _merge(run, tmp_path, tmp_path / "a", tmp_path / "c")
    other = tmp_path / "other"
    Registry.create(other)
    r = run("registry", "register", "m", merged, "--home", other)
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "pulled from a registry as a@1, but no version in this registry" in said, said
    assert '--lineage \'{"sources": ["a@1", ...]}\'' in said
    assert Registry(other).versions() == []
    # --lineage naming its own sources is the user's word: not overridden, and not refused
    own = run("registry", "register", "m", merged, "--home", home, "--lineage", '{"sources": ["b@1"]}')
    assert own.exit_code == 0 and "not linked, as --lineage names its own sources" in own.stderr, own.output
    assert Registry(home).get("m", 1).lineage["sources"] == ["b@1"]


def test_a_merge_of_unregistered_models_registers_with_a_note(tmp_path):
    run = CliRunner()
    home = tmp_path / "h"
    Registry.create(home)
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        save_file(
            {"layer.weight": torch.full((4, 4), float(len(name)))}, tmp_path / name / "model.safetensors"
        )
    merged = _merge(lambda *a: run.invoke(app, [*map(str, a)]), tmp_path, tmp_path / "x", tmp_path / "y")
    record = json.loads((merged / "merge_sources.json").read_text())
    assert [i["sha256"] for i in record["inputs"]] == [
        hashlib.sha256((tmp_path / n / "model.safetensors").read_bytes()).hexdigest() for n in ("x", "y")
    ]
    r = run.invoke(app, ["registry", "register", "m", str(merged), "--home", str(home)], terminal_width=300)
    assert r.exit_code == 0 and "no registered version holds the weights of" in r.stderr, r.output
    assert "sources" not in Registry(home).get("m", 1).lineage
    (merged / "merge_sources.json").write_text('{"kind": "deltaplane-merge", "inputs": [{"sha256": "x"}]}')
    bad = run.invoke(app, ["registry", "register", "m", str(merged), "--home", str(home)], terminal_width=300)
    assert bad.exit_code != 0 and "input 0 has no SHA-256" in " ".join(bad.output.split()), bad.output
