"""Every named choice of a run config comes from one registry (deltaplane.choices): the config, the CLI's help
and choices, and the implementations' tables read it; an unknown name is one typed line naming the known ones."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from deltaplane.choices import AGGREGATORS, ENGINES, PERSONALIZATIONS, TASKS, TRANSPORTS
from deltaplane.cli import app
from deltaplane.engine import RunConfig
from deltaplane.engine.config import CHOICES
from deltaplane.errors import ConfigError


@pytest.mark.parametrize("field", sorted(CHOICES))
def test_an_unknown_name_is_one_line_listing_the_registry(field) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({field: "nope"})
    message = str(info.value)
    assert "\n" not in message and f"unknown {CHOICES[field].kind} 'nope'" in message
    assert f"choose one of {CHOICES[field].names()}" in message
    for name in CHOICES[field]:  # every registered name is accepted (the registry is the vocabulary)
        if field == "personalization" and name == "fedbn":
            continue  # the digits CNN has no batch-norm layer: refused when the model is known
        assert getattr(RunConfig.from_mapping({field: name}), field) == name


def test_the_same_names_in_yaml_sections() -> None:
    cfg = RunConfig.from_mapping(
        {"engine": {"name": "batched", "transport": "http"}, "task": {"path": "charlm"}}
    )
    assert (cfg.engine, cfg.transport, cfg.task) == ("batched", "http", TASKS["charlm"].target)
    with pytest.raises(ConfigError, match="unknown engine 'warp'; choose one of sequential, batched"):
        RunConfig.from_mapping({"engine": {"name": "warp"}})


def test_implementation_tables_are_built_from_the_registries() -> None:
    from deltaplane.aggregation.factory import SERVER_OPTIMIZERS
    from deltaplane.personalization import PERSONALIZERS, Ditto, FedPer

    assert list(SERVER_OPTIMIZERS) == list(AGGREGATORS) and list(PERSONALIZERS) == list(PERSONALIZATIONS)
    ditto = RunConfig(personalization="ditto", ditto_lambda=0.3, personal_epochs=3).make_personalizer()
    assert isinstance(ditto, Ditto) and (ditto.lam, ditto.epochs) == (0.3, 3)
    fedper = RunConfig(personalization="fedper", fedper_head="fc1, fc2").make_personalizer()
    assert isinstance(fedper, FedPer) and fedper.head == ("fc1", "fc2")
    assert RunConfig(aggregator="fedyogi", clip="1.0").describe_aggregation() == "FedYogi + clip 1.0"


def test_cli_help_and_choices_read_the_registries() -> None:
    out = CliRunner().invoke(app, ["run", "--help"], terminal_width=400).output
    for registry in (ENGINES, TRANSPORTS, AGGREGATORS, PERSONALIZATIONS, TASKS):
        for name in registry:
            assert name in out, (registry.kind, name)
    bad = CliRunner().invoke(app, ["run", "--transport", "pigeon", "--rounds", "1"])
    assert (
        bad.exit_code == 2
        and "--transport: unknown transport 'pigeon'; choose one of inproc, http" in bad.output
    )
