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


def _bomb(indent: str = "") -> str:
    """A 'billion laughs' document: 9 levels of 9 aliases each, 9⁹ ≈ 387 million strings once expanded."""
    lines = [f'{indent}l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def test_a_yaml_bomb_is_refused_before_anything_expands_it(tmp_path):
    """A 700-byte config whose aliases expand to 387 million values loaded (aliases are shared objects), then
    hung the process that touched it: to_dict(), the task cache's json.dumps, pydantic's serializer."""
    from deltaplane.engine import RunConfig

    path = tmp_path / "run.yaml"
    path.write_text("task:\n  options:\n" + _bomb(indent="    "))
    with pytest.raises(ConfigError, match=r"run\.yaml: .*aliases expand"):
        RunConfig.from_yaml(path)
    merge = tmp_path / "merge.yaml"
    merge.write_text("merge_method: ties\nbase_model: m/base\nmodels:\n  - model: m/ft\n" + _bomb())
    with pytest.raises(ConfigError, match=r"merge\.yaml: .*aliases expand"):
        load_config(merge)


def test_a_recursive_alias_is_refused(tmp_path):
    from deltaplane.engine import RunConfig

    path = tmp_path / "run.yaml"
    path.write_text("task:\n  options:\n    loop: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: .*refers to itself"):
        RunConfig.from_yaml(path)


def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path):
    """PyYAML composes recursively: 5,000 nested lists raised RecursionError out of from_yaml."""
    from deltaplane.engine import RunConfig

    path = tmp_path / "run.yaml"
    path.write_text("task:\n  options:\n    deep: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: .*nested"):
        RunConfig.from_yaml(path)
    path.write_text("task:\n  options:\n    deep: " + "[" * 150 + "]" * 150 + "\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: .*nested deeper than"):
        RunConfig.from_yaml(path)


def test_an_unhashable_key_is_a_config_error_naming_the_line(tmp_path):
    """The duplicate-key check looked the key up in a dict first: a list key raised a bare TypeError."""
    path = tmp_path / "merge.yaml"
    path.write_text("merge_method: ties\n? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match=r"merge\.yaml: invalid YAML at line 2.*unhashable"):
        load_config(path)


def test_merge_keys_work_and_a_key_written_out_overrides_a_merged_one(tmp_path):
    """The duplicate-key check constructed the '<<' key itself, which has no constructor: every config using
    YAML's merge key failed to load ("could not determine a constructor for the tag ...merge")."""
    path = tmp_path / "merge.yaml"
    path.write_text(
        "merge_method: ties\nbase_model: m/base\nmodels:\n"
        "  - model: m/a\n    parameters: &p {weight: 0.5, density: 0.5}\n"
        "  - model: m/b\n    parameters:\n      <<: *p\n      weight: 0.3\n"
    )
    cfg = load_config(path)
    assert [m.parameters for m in cfg.models] == [
        {"weight": 0.5, "density": 0.5},
        {"weight": 0.3, "density": 0.5},
    ]
    from deltaplane.yamlio import load_yaml

    data = load_yaml("d: &d {a: 1, b: 2}\nx:\n  <<: *d\n  b: 3\n")
    assert data["x"] == {"a": 1, "b": 3}
    with pytest.raises(ConfigError, match=r"key '<<' is given twice \(lines 3 and 4\)"):
        load_yaml("d: &d {a: 1}\nx:\n  <<: *d\n  <<: *d\n")
