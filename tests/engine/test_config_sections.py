"""One vocabulary for CLI and YAML: nested sections or flat fields, the same RunConfig either way."""

from __future__ import annotations

import pytest
import yaml

from deltaplane.engine import RunConfig
from deltaplane.engine.config import SECTIONS
from deltaplane.errors import ConfigError


def test_every_field_is_in_exactly_one_section() -> None:
    fields = [f for keys in SECTIONS.values() for f in keys.values()]
    assert sorted(fields) == sorted(RunConfig.model_fields)


def test_nested_yaml_equals_the_flat_one(tmp_path) -> None:
    nested = """
task: {path: "deltaplane.apps.digits:make_task", train_shifts: 1}
clients: {count: 8, alpha: 0.3, rounds: 3, prox_mu: 0.01}
codec: {uplink: "topk(0.01) | quant(bits=8)", downlink: "quant(bits=8)"}
aggregation: {optimizer: fedadam, defense: "norm_bound:5"}
privacy: {clip: adaptive, noise: 0.7, epsilon_budget: 20}
personalization: {method: alpha_mix, epochs: 1}
engine: {name: batched, transport: inproc, seed: 3}
"""
    flat = dict(
        train_shifts=1, clients=8, alpha=0.3, rounds=3, prox_mu=0.01, codec="topk(0.01) | quant(bits=8)",
        downlink_codec="quant(bits=8)", aggregator="fedadam", defense="norm_bound:5", clip="adaptive",
        dp_noise=0.7, epsilon_budget=20.0, personalization="alpha_mix", personal_epochs=1, engine="batched", seed=3,
    )  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(nested)
    assert RunConfig.from_yaml(path) == RunConfig(**flat)
    cfg = RunConfig(**flat)
    assert RunConfig.from_mapping(yaml.safe_load(yaml.safe_dump(cfg.to_sections()))) == cfg  # round trip


def test_section_mistakes_are_one_line_config_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key 'privacy.nois'; valid keys of 'privacy': clip, noise"
    ):
        RunConfig.from_mapping({"privacy": {"nois": 1.0}})
    with pytest.raises(ConfigError, match="'dp_noise' is set twice"):
        RunConfig.from_mapping({"dp_noise": 1.0, "privacy": {"noise": 1.0}, "clip": "1"})
    with pytest.raises(ConfigError, match="engine"):
        RunConfig.from_mapping({"engine": {"name": "warp"}})


def test_keyword_construction_raises_config_error_naming_the_field():
    """RunConfig(lr=-1) raised pydantic's ValidationError, which `except DeltaplaneError` does not catch."""
    with pytest.raises(ConfigError, match="field 'lr'.*greater than 0"):
        RunConfig(lr=-1)
    with pytest.raises(ConfigError, match="field 'clinets': unknown field"):
        RunConfig(clinets=3)
    assert RunConfig(lr=0.5).lr == 0.5


def test_true_and_false_are_not_numbers(tmp_path):
    """`clients: {count: true}` ran with 1 client (pydantic reads a bool as 1); only bool fields take them."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("clients: {count: true}\n")
    with pytest.raises(ConfigError, match="field 'clients.count': takes a number, not true"):
        RunConfig.from_yaml(cfg)
    with pytest.raises(ConfigError, match="field 'dp_noise': takes a number, not false"):
        RunConfig(dp_noise=False)
    assert RunConfig(error_feedback=False, secagg=True, clip="1.0").secagg is True
