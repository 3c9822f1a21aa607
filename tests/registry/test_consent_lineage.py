"""Consent withdrawal reaches a version however it was registered: the lineage walk cannot be shed by
registering a withdrawn cohort's weights again under another name."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from deltaplane.cli import app
from deltaplane.registry import Registry


def test_a_pulled_model_registered_again_keeps_the_cohorts_of_the_version_it_came_from(tmp_path):
    # `registry pull a@1` then `registry register b PULLED` made b@1 (the same weights, no parent, no
    # cohorts) free to promote and serve: a withdrawn cohort's model laundered through a download
    home = tmp_path / "h"
    reg = Registry.create(home)
    a = reg.register_model("a", {"w": torch.arange(4.0), "b": torch.ones(2)}, governance={"cohorts": ["eu"]})
    reg.register_model("other", {"w": torch.zeros(4)}, governance={"cohorts": ["us"]})

    def run(*args: str):
        out = CliRunner().invoke(app, [*args, "--home", str(home)])
        assert out.exit_code == 0, out.output
        return out

    run("registry", "pull", "a@1", "-o", str(tmp_path / "p"))
    # re-saved with metadata added: other file bytes, the same weights in the recorded order
    pulled = tmp_path / "p" / "model.safetensors"
    with safe_open(pulled, "pt") as f:
        meta = f.metadata()
    save_file(load_file(pulled), tmp_path / "re.safetensors", metadata={**meta, "by": "me"})
    for name, path in (("b", "p"), ("c", "p/model.safetensors"), ("d", "re.safetensors")):
        said = " ".join(run("registry", "register", name, str(tmp_path / path)).stderr.split())
        assert f"note: {name}@1 holds the same weights as a@1" in said, said
    reg = Registry(home)
    copies = [reg.resolve(f"{m}@1") for m in "bcd"]
    assert [x.sha256 for x in copies] == [a.sha256] * 3
    assert [x.ref for x in reg.withdraw_cohort("eu")] == ["a@1", "b@1", "c@1", "d@1"]
    for x in copies:
        assert reg.governance_problems(x) == [f"{x.ref} was trained on withdrawn cohort 'eu'"]
    # a version registered with the same weights as a later one does not take that one's cohorts
    assert reg.contributors(reg.resolve("other@1")) == {"us"}


def test_a_rollback_onto_a_version_of_a_withdrawn_cohort_is_refused(tmp_path):
    # the rollback moved production onto the version before, unchecked: a tag held by a version every device
    # download then refused (451), where the gate refuses the same move as a promotion
    from deltaplane.errors import PromotionRefused
    from deltaplane.registry import rollback

    reg = Registry.create(tmp_path / "h")
    v1 = reg.register_model("m", {"w": torch.zeros(2)}, governance={"cohorts": ["eu"]})
    v2 = reg.register_model("m", {"w": torch.ones(2)}, governance={"cohorts": ["us"]})
    for v in (v1, v2):
        reg._move_tag("m", "production", v.number, action="promote")
    reg.withdraw_cohort("eu")
    with pytest.raises(PromotionRefused, match="m@1 was trained on withdrawn cohort 'eu'"):
        rollback(reg, "m")
    assert reg.tags("m") == {"production": 2} and reg.tag_history("m", "production")[-1]["number"] == 2
