"""A version's cohorts must be names a consent withdrawal can be recorded under, given as lists."""

import pytest
import torch

from deltaplane.errors import ConfigError
from deltaplane.registry import Governance, Registry, state_to_bytes


@pytest.fixture
def reg(tmp_path):
    return Registry.create(tmp_path / "home", encrypt=False)


DATA = state_to_bytes({"w": torch.zeros(1)})


@pytest.mark.parametrize("cohort", ["EU West", "../eu", "eu\x00", "ＥＵ", "x" * 129, ""])
def test_a_cohort_no_withdrawal_could_name_is_refused_at_registration(reg, cohort):
    # withdraw_cohort (and `deltaplane registry withdraw`) takes only registry names: a version recorded with
    # another cohort name would keep that cohort's data for good
    with pytest.raises(ConfigError):
        reg.withdraw_cohort(cohort)
    for gov in (Governance(cohorts=(cohort,)), {"excluded_cohorts": [cohort]}):
        with pytest.raises(ConfigError, match="cohort must be"):
            reg.register_model("m", DATA, governance=gov)
    assert reg.versions() == []


def test_cohorts_given_as_a_string_are_refused_not_split_into_letters(reg):
    # {"cohorts": "eu"} used to record cohorts 'e' and 'u': withdrawing "eu" then reached no version
    for gov in ({"cohorts": "eu"}, {"data_sources": "digits"}, {"cohorts": 5}):
        with pytest.raises(ConfigError, match="must be a list of names"):
            reg.register_model("m", DATA, governance=gov)
    with pytest.raises(ConfigError, match="must be a list of names"):
        Governance(cohorts="eu")  # type: ignore[arg-type]
    art = reg.register_model("m", DATA, governance={"cohorts": ["eu"]})
    assert [a.ref for a in reg.withdraw_cohort("eu")] == [art.ref]


def test_the_cli_refuses_a_cohort_it_could_not_withdraw(tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from deltaplane.cli import app

    home = tmp_path / "home"
    Registry.create(home, encrypt=False)
    save_file({"w": torch.zeros(2)}, tmp_path / "s.safetensors")
    out = CliRunner().invoke(
        app,
        [
            "registry",
            "register",
            "m",
            str(tmp_path / "s.safetensors"),
            "--cohort",
            "EU West",
            "--home",
            str(home),
        ],
    )
    assert out.exit_code == 2, out.output
    assert "cohort must be" in out.output
    assert Registry(home).versions() == []
