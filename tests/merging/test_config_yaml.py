"""Merge configs are read as strictly as run configs: one YAML loader (deltaplane.yamlio) for both."""

from __future__ import annotations

import pytest

from deltaplane.errors import ConfigError
from deltaplane.merging.config import load_config


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """PyYAML kept the last 'merge_method:' silently: this config merged with TIES, not task arithmetic."""
    path = tmp_path / "merge.yaml"
    path.write_text(
        "merge_method: task_arithmetic\nbase_model: m/base\nmerge_method: ties\nmodels:\n  - model: m/ft\n"
    )
    with pytest.raises(
        ConfigError, match=r"merge\.yaml: key 'merge_method' is given twice \(lines 1 and 3\)"
    ):
        load_config(path)


def test_the_run_config_refuses_it_the_same_way(tmp_path):
    from deltaplane.engine import RunConfig

    path = tmp_path / "run.yaml"
    path.write_text("rounds: 3\nrounds: 5\n")
    with pytest.raises(ConfigError, match=r"key 'rounds' is given twice \(lines 1 and 2\)"):
        RunConfig.from_yaml(path)
