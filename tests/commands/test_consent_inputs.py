"""A pulled version of a cohort that withdrew consent is never an input silently: ``merge``, ``deploy`` and
``extract-lora`` read folders, not the registry, and warn (on stderr, whatever ``-q`` says) when one is."""

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from deltaplane.cli import app
from deltaplane.registry import Registry

WARNING = "which withdrew consent (its manifest.json says so)"


def test_commands_that_read_a_pulled_withdrawn_version_say_so(tmp_path):
    home = tmp_path / "h"
    reg = Registry.create(home)
    g = torch.Generator().manual_seed(0)
    reg.register_model("a", {"layer.weight": torch.randn(8, 8, generator=g)}, governance={"cohorts": ["eu"]})
    reg.register_model("b", {"layer.weight": torch.randn(8, 8, generator=g)}, governance={"cohorts": ["us"]})
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["-q", *map(str, args)], terminal_width=300)

    for ref in ("a@1", "b@1"):
        assert run("registry", "pull", ref, "-o", tmp_path / ref[0], "--home", home).exit_code == 0
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
