"""A revoked *key* on Flower: node 2's identity key is also certified under another id (device-7, the leaked
key's holder having had it certified there before the revocation), and the list ``keys revoke --certificate
device-7.cert`` writes revokes device-7 and that key. Node 2's own certificate (device-2) names no revoked id,
yet nodes holding the list refuse a roster seating it (KeyRevoked, naming the slot), and a strategy holding it
refuses node 2's advertisement so the round goes on without it."""

from __future__ import annotations

import re

import pytest
from tests.flower.test_secagg_flower_authenticated import CFG, _Recording, _run, _stage
from typer.testing import CliRunner

from deltaplane.aggregation.secagg import SecAggError
from deltaplane.aggregation.secagg.enrollment import RunEnrollment
from deltaplane.cli import app
from deltaplane.flower import digits_client_app
from deltaplane.flower.secagg import REVOCATIONS_NODE_CONFIG_KEY, SECAGG_KEY

LEAKED = 2  # node 2's key, certified as device-7 too


@pytest.fixture
def keyed(tmp_path):
    """The run's enrollment and the list the CLI wrote from the device-7 certificate of node 2's key."""
    run = RunEnrollment(cohort="fleet")
    cert = run.credentials(f"device-{LEAKED}").identity.certificate
    other = run.authority.issue("device-7", cert.identity_public, cohort="fleet", expires=cert.expires)
    (tmp_path / "device-7.cert").write_bytes(other.to_bytes())
    (tmp_path / "enrollment.ed25519.pem").write_bytes(run.authority.to_pem())
    args = ["keys", "revoke", "--authority-key", str(tmp_path / "enrollment.ed25519.pem")]
    args += ["--certificate", str(tmp_path / "device-7.cert"), "--out", str(tmp_path / "revoked.bin")]
    r = CliRunner().invoke(app, args, terminal_width=300)
    assert r.exit_code == 0, r.output
    return run, tmp_path / "revoked.bin"


def _grid(loopback_grid, cfg, run, tmp_path, listed: str | None):
    class Grid(_Recording, loopback_grid):
        def rewrite(self, messages):  # node 2 is the leaked key's holder: it never takes the strategy's list
            for m in messages:
                if _stage(m) == "advertise" and m.metadata.dst_node_id == 100 + LEAKED:
                    m.content[SECAGG_KEY].pop("revocations", None)
            return messages

    grid = Grid(digits_client_app(cfg), cfg.clients)
    for context in grid.contexts.values():
        i = int(context.node_config["partition-id"])
        context.node_config.update(run.write_node_config(tmp_path / "nodes", f"device-{i}"))
        if listed and i != LEAKED:
            context.node_config[REVOCATIONS_NODE_CONFIG_KEY] = listed
    return grid


def test_nodes_holding_the_list_refuse_a_roster_seating_the_revoked_key(
    loopback_grid, keyed, tmp_path
) -> None:
    run, listed = keyed
    cfg = CFG.replace(rounds=1)
    grid = _grid(loopback_grid, cfg, run, tmp_path, str(listed))
    with pytest.raises(SecAggError) as exc:
        _run(grid, cfg, authenticated=True)  # the ServerApp holds no list: it seats node 2
    slot = next(
        int(m.content[SECAGG_KEY]["client-id"])
        for m in grid.sent
        if _stage(m) == "advertise" and m.metadata.dst_node_id == 100 + LEAKED
    )
    refusal = f"roster slot {slot}: device 'device-{LEAKED}' of cohort 'fleet' holds identity key SHA256:"
    assert re.search(rf"KeyRevoked.*{re.escape(refusal)}", str(exc.value)), str(exc.value)
    assert not any(m.metadata.message_type == "train" for m in grid.sent)


def test_a_strategy_holding_the_list_leaves_the_revoked_key_out(loopback_grid, keyed, tmp_path) -> None:
    run, listed = keyed
    cfg = CFG.replace(rounds=1)
    grid = _grid(loopback_grid, cfg, run, tmp_path, str(listed))
    rounds, _ = _run(grid, cfg, authenticated=True, revocations=str(listed))
    assert len(rounds) == 1
    for stage in ("share", "consistency", "unmask"):
        assert {r.metadata.src_node_id for r in grid.replies_to(stage)} == {
            100 + i for i in range(cfg.clients) if i != LEAKED
        }, stage
