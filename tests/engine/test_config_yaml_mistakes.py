"""Run-config YAML mistakes a user makes are refused naming the key as they wrote it, never silently taken."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltaplane.engine import RunConfig
from deltaplane.errors import ConfigError


def _load(tmp_path: Path, text: str) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return RunConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        # the key as written in the file, not the flat field it maps to ('clients' is also a section's name)
        ("clients: {count: five}\n", r"field 'clients\.count': Input should be a valid integer"),
        ("engine:\n  seed: -1\n", r"field 'engine\.seed': Input should be greater than or equal to 0"),
        ("codec: {uplink: yes}\n", r"field 'codec\.uplink': Input should be a valid string"),
        # a key given twice: YAML keeps the last one silently
        ("rounds: 10\nclients: {count: 5}\nrounds: 2\n", r"key 'rounds' is given twice \(lines 1 and 3\)"),
        (
            "privacy:\n  clip: 1.0\n  noise: 0.5\n  clip: 2.0\n",
            r"key 'clip' is given twice \(lines 2 and 4\)",
        ),
        # a section given a value
        ("privacy: 1.0\n", r"'privacy' is a section, not a value.*valid keys of 'privacy': clip, noise"),
        # infinities: named as written; a clip given as text ('inf', as --clip inf) is refused too
        ("clients: {lr: .inf}\n", r"field 'clients\.lr': Input should be a finite number"),
        (
            "privacy: {clip: 'inf', noise: 1.0}\n",
            r"field 'privacy\.clip': clip must be a positive finite number",
        ),
    ],
)
def test_mistakes_name_the_key_as_written(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        _load(tmp_path, text)
    assert "\n" not in str(info.value) and "run.yaml" in str(info.value)


def test_an_empty_section_is_its_defaults(tmp_path: Path) -> None:
    """`privacy:` with every key commented out (YAML: null) is the defaults, not an unknown field."""
    cfg = _load(tmp_path, "privacy:\n  # noise: 1.0\nclients:\n  count: 3\nattack:\n")
    assert cfg == RunConfig(clients=3)


def test_a_numeric_clip_is_a_number_in_yaml(tmp_path: Path) -> None:
    """`clip: 1.0` is how YAML writes the clip norm; it was refused as 'Input should be a valid string'."""
    cfg = _load(tmp_path, "privacy: {clip: 1.0, noise: 0.8}\n")
    assert cfg.clip == "1.0" and cfg == RunConfig(clip="1.0", dp_noise=0.8)
    assert _load(tmp_path, "clip: 2\n").clip == "2"
    with pytest.raises(ConfigError, match="field 'clip'"):
        _load(tmp_path, "clip: true\n")


def test_a_numeric_clip_reaches_the_aggregator_and_the_devices_as_a_number(tmp_path: Path) -> None:
    """The field keeps `clip: 2.0` as text; the clipping stage of the chain (and the notice `deltaplane serve`
    prints of the devices' options) got that text: `Clip(..., clip='2.0')`, `clip='2.0'`."""
    from deltaplane.aggregation.clipping import Clip
    from deltaplane.serve.device_side import device_side_notice

    cfg = _load(tmp_path, "clip: 2.0\nclients: 3\nsecagg: {enabled: true}\n")
    assert "clip=2.0 " in device_side_notice(cfg) + " " and "'2.0'" not in device_side_notice(cfg)
    node = RunConfig(clip="2.0").build_aggregator()
    while not isinstance(node, Clip):
        node = node.inner
    assert type(node.clip) is float and node.clip == 2.0 and "clip=2.0)" in repr(node)
    assert cfg.clip_value == 2.0 and isinstance(cfg.clip_value, float)
    assert RunConfig(clip="adaptive").clip_value == "adaptive" and RunConfig().clip_value is None
