"""examples/flower-app runs SecAgg rounds, semi-honest and authenticated: the deployable App's own ServerApp and
ClientApp (imported as ``flwr run`` loads them) over the loopback Grid of ``conftest.py``, its run config from
``[tool.flwr.app.config]`` with SecAgg switched on, as ``flwr run --run-config "secagg=true"`` would."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import torch
from flwr.app import Context, RecordDict

from deltaplane.aggregation.secagg import EnrollmentAuthority, SecAggError
from deltaplane.aggregation.secagg.enrollment import (
    AUTHORITY_PUBLIC_NAME,
    NODE_CONFIG_KEYS,
    certify,
    device_id,
    write_identity,
)
from deltaplane.errors import ConfigError
from deltaplane.flower import digits_server_app
from deltaplane.flower.secagg import QUERY_TYPE, SECAGG_KEY
from deltaplane.sim import run_simulation

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
#: the App's own defaults, made small: three SuperNodes, one epoch
RUN = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"] | {
    "num-server-rounds": 2, "clients": 3, "local-epochs": 1,
}  # fmt: skip
SECAGG = RUN | {"secagg": True}


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    monkeypatch.syspath_prepend(str(APP))
    return importlib.import_module("deltaplane_app.server_app"), importlib.import_module(
        "deltaplane_app.client_app"
    )


@pytest.fixture(scope="module")
def enrollment(tmp_path_factory) -> dict[int, dict[str, str]]:
    """Partition i → the node_config naming device-i's enrollment, as ``deltaplane keys certify`` writes it."""
    out = tmp_path_factory.mktemp("nodes")
    authority = EnrollmentAuthority.generate()
    (out / AUTHORITY_PUBLIC_NAME).write_text(authority.public_text() + "\n")
    identities = certify(authority, [device_id(i) for i in range(3)], cohort="fleet", valid_days=1)
    files = [write_identity(out, ident) for ident in identities]
    return {
        i: dict(zip(NODE_CONFIG_KEYS, [str(key), str(cert), str(out / AUTHORITY_PUBLIC_NAME)], strict=True))
        for i, (key, cert) in enumerate(files)
    }


def _run(example, loopback_grid, monkeypatch, run_config: dict, enrolled: dict | None = None, grids=None):
    """One ``flwr run`` of the example: its ServerApp over a loopback Grid of its ClientApp on
    ``run_config["clients"]`` nodes (each enrolled from ``enrolled`` if given). Returns the grid and the final
    model, which the App's ServerApp only prints about: its ``digits_server_app`` gets an ``on_done`` here. The
    grid is also appended to ``grids`` (to look at after a run that raised)."""
    server_app, client_app = example
    finals: dict = {}
    real = digits_server_app  # the library's, not an earlier run's stand-in
    monkeypatch.setattr(
        server_app,
        "digits_server_app",
        lambda cfg, **kw: real(cfg, on_done=lambda s, st: finals.update(st), **kw),
    )
    grid = loopback_grid(client_app.app, run_config["clients"])
    (grids if grids is not None else []).append(grid)
    for context in grid.contexts.values():
        context.run_config.update(run_config)
        context.node_config.update((enrolled or {}).get(int(context.node_config["partition-id"]), {}))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    server_app.app(grid=grid, context=context)
    return grid, finals


def _stages(grid) -> list[str]:
    return [str(m.content[SECAGG_KEY]["stage"]) for m in grid.sent if m.metadata.message_type == QUERY_TYPE]


def _cfg(example, run_config: dict):
    return example[1].run_config(
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    )


def test_the_example_runs_secagg_rounds_with_the_in_process_models(
    example, loopback_grid, monkeypatch
) -> None:
    """``secagg=true``: the nodes answer every SecAgg stage and the rounds give the in-process engine's SecAgg
    models exactly; the sum is the plain example round's within the ring's quantization."""
    grid, final = _run(example, loopback_grid, monkeypatch, SECAGG)
    assert _stages(grid) == ["advertise"] * 3 + ["share"] * 3 + ["unmask"] * 3 + (
        ["advertise"] * 3 + ["share"] * 3 + ["unmask"] * 3
    )  # fmt: skip
    seq = run_simulation(_cfg(example, SECAGG))
    assert final.keys() == seq.final_state.keys()
    assert all(torch.equal(final[k], seq.final_state[k]) for k in final)
    # one round against the plain example's: the ring's step is 2 * secagg_range / 2**secagg_bits per coordinate
    # (with a lossless downlink: the App's 8-bit one rounds a sum one ring step apart to levels 1/255 apart)
    lossless = {"num-server-rounds": 1, "downlink-codec": "identity"}
    one, plain = SECAGG | lossless, RUN | lossless
    _, masked = _run(example, loopback_grid, monkeypatch, one)
    _, clear = _run(example, loopback_grid, monkeypatch, plain)
    cfg = _cfg(example, one)
    step = 2 * cfg.secagg_range / 2**cfg.secagg_bits
    gaps = {k: float((masked[k] - clear[k]).abs().max()) for k in clear}
    assert max(gaps.values()) <= step, gaps
    assert any(
        not torch.equal(masked[k], clear[k]) for k in clear
    )  # rounded into the ring: not the clear sum


def test_enrolled_nodes_run_the_example_s_authenticated_rounds(
    example, loopback_grid, monkeypatch, enrollment
) -> None:
    """``secagg-authenticated=true`` with SuperNodes enrolled in their node_config: signed rosters and the
    consistency stage, and the semi-honest example's models bit for bit."""
    grid, final = _run(
        example, loopback_grid, monkeypatch, SECAGG | {"secagg-authenticated": True}, enrollment
    )
    assert _stages(grid)[:12] == ["advertise"] * 3 + ["share"] * 3 + ["consistency"] * 3 + ["unmask"] * 3
    _, semi_honest = _run(example, loopback_grid, monkeypatch, SECAGG)
    assert all(torch.equal(final[k], semi_honest[k]) for k in semi_honest)


def test_an_enrolled_node_refuses_the_example_s_unauthenticated_round(
    example, loopback_grid, monkeypatch, enrollment
) -> None:
    """The opt-in is the node's: enrolled SuperNodes refuse a semi-honest round at key advertisement, before any
    trains, and nodes without an enrollment refuse an authenticated one."""
    grids: list = []
    with pytest.raises(SecAggError, match="this node authenticates its neighbours' keys") as raised:
        _run(example, loopback_grid, monkeypatch, SECAGG, enrollment, grids)
    assert "only 0 clients advertised keys" in str(raised.value)
    assert _stages(grids[0]) == ["advertise"] * 3
    assert not [m for m in grids[0].sent if m.metadata.message_type == "train"]  # nobody trained
    with pytest.raises(SecAggError, match="this node has no enrolled identity"):
        _run(example, loopback_grid, monkeypatch, SECAGG | {"secagg-authenticated": True})


def test_the_example_refuses_an_authenticated_switch_it_cannot_honour(
    example, loopback_grid, monkeypatch
) -> None:
    with pytest.raises(ConfigError, match="secagg_authenticated.*set secagg too"):
        _run(example, loopback_grid, monkeypatch, RUN | {"secagg-authenticated": True})
    with pytest.raises(ConfigError, match="secagg_authenticated"):
        _run(example, loopback_grid, monkeypatch, SECAGG | {"secagg-authenticated": [True]})
