"""deltaplane.engine.buildable: its tables equal the registered constructors, and its "builds" is never wrong.

The tables decide only in a process without torch; here (torch loaded) ``_here`` is patched to let them decide,
and every "builds" is checked against building, over generated specs and settings, valid and not.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaplane.aggregation.factory import SERVER_OPTIMIZERS
from deltaplane.choices import AGGREGATORS
from deltaplane.codecs import available_codecs, get_codec
from deltaplane.codecs.base import _hyperparameters
from deltaplane.engine import RunConfig, buildable
from deltaplane.engine.buildable import (
    BUILT_ONLY,
    CODEC_FORMS,
    OPTIMIZER_TARGETS,
    aggregation_builds,
    codec_builds,
    dgc_builds,
)
from deltaplane.errors import DeltaplaneError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def decide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the tables decide although this process has loaded torch."""
    monkeypatch.setattr(buildable, "_here", lambda: True)


# -- the tables are the constructors' -----------------------------------------------------------------------
def test_every_registered_codec_is_in_the_table_or_left_to_its_builder() -> None:
    registered = set(available_codecs())
    assert set(CODEC_FORMS) | BUILT_ONLY == registered
    assert not set(CODEC_FORMS) & BUILT_ONLY


@pytest.mark.parametrize("name", sorted(CODEC_FORMS))
def test_a_codec_form_is_its_class(name: str) -> None:
    cls, form = available_codecs()[name], CODEC_FORMS[name]
    assert form.positional == cls.positional
    assert set(form.params) == set(_hyperparameters(cls))
    assert form.lossless == cls.lossless
    assert form.leaves_floats == bool(cls.tensor_fields)
    assert not cls.selects_by_name  # a per-tensor choice is left to the builder (BUILT_ONLY)
    # each parameter's default is a value the table accepts (the class's own signature)
    for key, param in _hyperparameters(cls).items():
        assert form.params[key](param.default), (name, key, param.default)


def test_the_server_optimizers_are_the_registered_ones() -> None:
    assert {name: AGGREGATORS[name].target for name in AGGREGATORS} == OPTIMIZER_TARGETS
    assert set(OPTIMIZER_TARGETS) == set(SERVER_OPTIMIZERS)


def test_nothing_is_decided_once_torch_is_loaded() -> None:
    assert "torch" in sys.modules  # this test process
    assert not codec_builds("identity")
    assert not aggregation_builds(RunConfig())
    assert not dgc_builds(RunConfig())


# -- "builds" is never wrong: codecs --------------------------------------------------------------------------
#: each parameter's edges, and values of the wrong kind
_EDGES: list[Any] = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    9,
    21,
    22,
    23,
    512,
    -1,
    2**63 - 1,
    2**63,
    0.0,
    0.01,
    0.5,
    1.0,
    1.0000001,
]
_EDGES += [1.5, 1e-3, 5e-324, 1e308, -0.01, True, False, "max", "norm", "min", "fp16", "x", "*: identity"]
_VALUES = st.one_of(
    st.sampled_from(_EDGES),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(-(2**64), 2**64),
)
_NAMES = st.sampled_from([*sorted(CODEC_FORMS), "nope"])
_KEYS = st.sampled_from(sorted({k for f in CODEC_FORMS.values() for k in f.params} | {"ratio", "zzz"}))


def _literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


@st.composite
def _stage(draw: st.DrawFn) -> str:
    name = draw(_NAMES)
    args = draw(st.lists(_VALUES, max_size=2))
    kwargs = draw(st.dictionaries(_KEYS, _VALUES, max_size=3))
    inside = [_literal(v) for v in args] + [f"{k}={_literal(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(inside)})" if inside or draw(st.booleans()) else name


@pytest.mark.usefixtures("decide")
@settings(max_examples=600, deadline=None)
@given(st.lists(_stage(), min_size=1, max_size=3))
def test_a_codec_spec_said_to_build_builds(stages: list[str]) -> None:
    spec = " | ".join(stages)
    if codec_builds(spec):
        get_codec(spec)  # raises if the table was wrong


@pytest.mark.usefixtures("decide")
@pytest.mark.parametrize("name", sorted(CODEC_FORMS))
def test_every_parameter_edge_said_to_build_builds(name: str) -> None:
    decided = 0
    for key, value in itertools.product(CODEC_FORMS[name].params, _EDGES):
        spec = f"{name}({key}={_literal(value)})"
        if codec_builds(spec):
            decided += 1
            get_codec(spec)  # raises if the table was wrong
    assert decided or not CODEC_FORMS[name].params


@pytest.mark.usefixtures("decide")
@pytest.mark.parametrize(
    "spec",
    [
        "identity",
        "fp16",
        "stc(0.006)",
        "topk(0.01) | quant(bits=4)",
        "topk(ratio=0.01, approx=true) | quant(4, stochastic=true, chunk=64, scale=norm) | zstd(level=9)",
        "randk(0.1, unbiased=true) | fp16",
        "threshold(tau=0.001) | bf16",
        "ternary(chunk=256)",
        "quant(8) | zstd",
        "sign",
    ],
)
def test_the_usual_codec_specs_are_decided_without_building(spec: str) -> None:
    assert codec_builds(spec)
    get_codec(spec)


@pytest.mark.usefixtures("decide")
@pytest.mark.parametrize(
    "spec",
    ["quant(bits=4) | topk(0.01)", "zstd | quant", "topk(0.01, 0.5)", "topk(ratio=0.01, ratio=0.02)",
     "quant(bits=9)", "threshold(1)", "powersgd(4)", "policy", "nope", "topk(", ""],
)  # fmt: skip
def test_what_the_table_does_not_decide_is_built(spec: str) -> None:
    assert not codec_builds(spec)


# -- "builds" is never wrong: the aggregator chain and the DGC options -----------------------------------------
_SETTINGS: dict[str, list[Any]] = {
    "clients": [1, 2, 3, 20],
    "sample_fraction": [1.0, 0.5, 0.01],
    "aggregator": sorted(AGGREGATORS),
    "server_lr": [1.0, 0.5],
    "server_opt_lr": [None, 0.1],
    "clip": [None, "1.0", "adaptive", "1e-300"],
    "dp_noise": [0.0, 1e-9, 1.1],
    "dp_delta": [1e-5, 0.5, 0.999],
    "epsilon_budget": [None, 1.0],
    "secagg": [False, True],
    "secagg_min_contributors": [None, 1, 2, 50],
    "defense": [None, "none", "", "median", "norm_bound(2.0)", "trimmed_mean(0.1)"],
    "max_update_norm": [None, 3.0],
    "codec": ["identity", "topk(0.01)", "stc(0.01) | zstd"],
}
_DGC: dict[str, list[Any]] = {
    "momentum_correction": [0.0, 0.5, 0.99],
    "local_clip": [None, 1.0],
    "local_clip_relative": [None, 1.5],
    "momentum_masking": [False, True],
    "sparsity_warmup": [0, 2],
    "codec": ["identity", "topk(0.01)", "stc(0.1) | zstd"],
}


def _draws(table: dict[str, list[Any]], n: int, seed: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    return [{k: rnd.choice(v) for k, v in table.items()} for _ in range(n)]


def _builds(check: Any) -> bool:
    try:
        check()
    except ValueError:  # what the validators raise for pydantic
        return False
    return True


@pytest.mark.usefixtures("decide")
def test_an_aggregator_chain_said_to_build_builds() -> None:
    decided = built = 0
    for fields in _draws(_SETTINGS, 3000, seed=41):
        config = RunConfig.model_construct(**fields)  # the fields as validated; the chain not yet built
        ok = _builds(config._check_aggregation_by_building)
        built += ok
        if aggregation_builds(config):
            decided += 1
            assert ok, fields
    assert decided > 200 and built > decided  # the table decides many, and leaves some that build to building


@pytest.mark.usefixtures("decide")
def test_dgc_options_said_to_build_build() -> None:
    grid = [dict(zip(_DGC, values, strict=True)) for values in itertools.product(*_DGC.values())]
    decided = 0
    for fields in grid:
        config = RunConfig.model_construct(**fields)
        if dgc_builds(config):
            decided += 1
            assert _builds(config._check_dgc_by_building), fields
    assert decided > len(grid) // 10


# -- reading a federation needs no torch ------------------------------------------------------------------
_FLEET_GUIDE = textwrap.dedent(
    """\
    task: {path: "mytask:make_task"}
    clients: {count: 3, rounds: 2}
    secagg: {enabled: true}
    clip: 2.0
    dp_noise: 0.8
    dp_delta: 0.001
    downlink_codec: identity
    """
)
_PLAIN = "task: {path: 'mytask:make_task'}\nclients: {count: 3}\nseed: 3\ncodec: topk(0.01) | quant(bits=8)\n"
_REFUSED = "task: {path: 'mytask:make_task'}\nclients: {count: 3}\ncodec: quant(bits=9)\n"


def _check_in_fresh_process(tmp_path: Path, yaml: str, *, neighbours: int | None = None) -> dict[str, Any]:
    (tmp_path / "fleet.yaml").write_text(yaml)
    code = textwrap.dedent(
        f"""\
        import json, sys
        from pathlib import Path
        from deltaplane.commands.fleet import _federation, _with_degree
        from deltaplane.errors import ConfigError
        try:
            run = _federation(Path("fleet.yaml"))
            if {neighbours!r} is not None:
                run = _with_degree(run, Path("fleet.yaml"), {neighbours!r})
            verdict = "ok"
        except ConfigError as exc:
            verdict = str(exc)
        print(json.dumps({{"verdict": verdict, "torch": "torch" in sys.modules}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("yaml", [_FLEET_GUIDE, _PLAIN], ids=["fleet-guide", "plain-topk-quant"])
def test_fleet_coordinate_reads_its_federation_without_torch(tmp_path: Path, yaml: str) -> None:
    """`fleet coordinate`'s (and `fleet enroll`'s) check of --federation loads no torch."""
    assert _check_in_fresh_process(tmp_path, yaml) == {"verdict": "ok", "torch": False}


def test_a_refused_federation_is_refused_by_the_builder_with_its_message(tmp_path: Path) -> None:
    got = _check_in_fresh_process(tmp_path, _REFUSED)
    assert got["torch"]  # the table does not refuse: the builder does, and says why
    with pytest.raises(DeltaplaneError) as exc:
        get_codec("quant(bits=9)")
    assert str(exc.value) in got["verdict"]
