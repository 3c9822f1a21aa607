from pathlib import Path

import pytest
from tests.test_textfile import _returns

from deltaplane.errors import ConfigError, DeltaplaneError
from deltaplane.sim import RunConfig


def test_defaults() -> None:
    cfg = RunConfig()
    assert (cfg.clients, cfg.alpha, cfg.batch_size, cfg.sample_fraction, cfg.seed) == (20, 0.5, 32, 1.0, 0)
    assert cfg.codec == "identity" and cfg.downlink_codec == "identity" and cfg.error_feedback
    assert cfg.server_lr == 1.0


def test_from_yaml_overrides_some_fields(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("clients: 8\ncodec: 'topk(0.05) | quant(bits=4)'\nlr: 0.1\n")
    cfg = RunConfig.from_yaml(path)
    assert (cfg.clients, cfg.codec, cfg.lr, cfg.rounds) == (
        8,
        "topk(0.05) | quant(bits=4)",
        0.1,
        RunConfig().rounds,
    )
    assert cfg.model_fields_set == {"clients", "codec", "lr"}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert RunConfig.from_yaml(empty) == RunConfig()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("clients: 0\n", "clients"),
        ("alpha: -1\n", "alpha"),
        ("sample_fraction: 1.5\n", "sample_fraction"),
        ("rounds: many\n", "rounds"),
        ("codec: 'nosuchcodec(3)'\n", "codec"),
        ("downlink_codec: 'quant(bits='\n", "downlink_codec"),
        ("learning_rate: 0.1\n", "learning_rate"),
    ],
)
def test_yaml_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"field '{field}'") as info:
        RunConfig.from_yaml(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, DeltaplaneError)


def test_unknown_field_lists_valid_ones(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="valid fields: task, task_options, clients, alpha"):
        RunConfig.from_yaml(path)


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        RunConfig.from_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("clients: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(tmp_path / "broken.yaml")


def test_replace_validates_and_config_is_frozen() -> None:
    cfg = RunConfig()
    assert cfg.replace(rounds=3).rounds == 3
    with pytest.raises(ConfigError, match="field 'rounds'"):
        cfg.replace(rounds=0)
    with pytest.raises(Exception, match="frozen"):
        cfg.rounds = 5  # type: ignore[misc]


def test_client_lr_decays_per_round() -> None:
    cfg = RunConfig(lr=0.1, lr_decay=0.5)
    assert [cfg.client_lr(r) for r in (1, 2, 3)] == [0.1, 0.05, 0.025]
    assert RunConfig(lr=0.1).client_lr(50) == 0.1


def test_to_dict_is_plain_json() -> None:
    import json

    d = RunConfig().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert RunConfig.from_mapping(d) == RunConfig()


def test_describe_aggregation_names_the_server_side() -> None:
    assert RunConfig().describe_aggregation() == "FedAvg"
    cfg = RunConfig(aggregator="fedadam", clip="1.0", dp_noise=1.1, defense="norm_bound:2.0")
    assert cfg.describe_aggregation() == "FedAdam + clip 1.0 + DP z=1.1 + norm_bound:2.0"
    assert RunConfig(prox_mu=0.1, personalization="alpha_mix").describe_aggregation() == "FedProx + alpha_mix"


@pytest.mark.parametrize(
    ("clients", "delta"),
    [(1_000_000, 1e-5), (10, 0.5), (200_000, None)],  # None: the default 1e-5, too large for 200,000 clients
)
def test_dp_delta_must_be_below_one_over_the_population(clients, delta) -> None:
    """δ ≥ 1/N admits releasing one client's data outright; it used to be accepted (/tmp/review-dp/r5_misc.py)."""
    from deltaplane.engine import RunConfig

    extra = {} if delta is None else {"dp_delta": delta}
    for dp in ({"dp_noise": 1.0, "clip": "1.0"}, {"local_dp_noise": 1.0, "clip": "1.0"}):
        with pytest.raises(ValueError, match="below 1/clients"):
            RunConfig(clients=clients, **dp, **extra)
    RunConfig(clients=clients, **extra)  # without DP δ means nothing and is not checked
    RunConfig(clients=clients, dp_noise=1.0, clip="1.0", dp_delta=0.01 / clients)


@pytest.mark.parametrize(
    "field",
    [
        "lr",
        "alpha",
        "prox_mu",
        "local_clip",
        "local_clip_relative",
        "memory_budget_mb",
        "secagg_range",
        "personal_lr",
        "ditto_lambda",
    ],
)
def test_an_infinite_value_is_refused_naming_the_field(field: str, tmp_path: Path) -> None:
    """Every float option passed `gt=0` at infinity: lr/prox_mu diverged in round 1 (InvalidUpdate), an
    infinite memory_budget_mb was a bare OverflowError in the batched engine, alpha a bare ValueError in the
    population engine's Dirichlet draw."""
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        RunConfig.from_mapping({field: float("inf")})
    path = tmp_path / "run.yaml"
    path.write_text(f"{field}: .inf\n")  # YAML's infinity
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        RunConfig.from_yaml(path)


def test_a_config_file_is_read_bounded_and_never_blocks(tmp_path):
    # a config was read whole with read_text(): a huge file filled memory and a FIFO with no writer hung
    import os

    from deltaplane.merging.config import load_config as load_merge_config
    from deltaplane.textfile import CONFIG_LIMIT, read_config_text

    assert CONFIG_LIMIT == 16 * 2**20
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(CONFIG_LIMIT + 1)  # sparse: no disk used
    with pytest.raises(ConfigError, match="over the 16 MiB limit for a config file"):
        RunConfig.from_yaml(big)
    with pytest.raises(ConfigError, match="over the 16 MiB limit for a merge config"):
        load_merge_config(big)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    exc = _returns(RunConfig.from_yaml, fifo)  # fails if reading a FIFO with no writer hangs
    assert isinstance(exc, ConfigError) and "must be a regular file, not a FIFO" in str(exc)
    with pytest.raises(ConfigError, match="must be a regular file, not a directory"):
        read_config_text(tmp_path)
    (tmp_path / "ok.yaml").write_text("rounds: 3\n")
    assert RunConfig.from_yaml(tmp_path / "ok.yaml").rounds == 3
