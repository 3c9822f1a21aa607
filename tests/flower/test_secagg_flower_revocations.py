"""A Flower node's revocation list: ``node_config``'s optional ``secagg-revocations`` names the enrollment
authority's list; the node's credentials hold it, verified, only beside its enrollment, and the node refuses
whole rounds seating a device it revokes."""

from __future__ import annotations

import re

import pytest
from tests.flower.test_secagg_flower_authenticated import CFG, _Recording, _run, _stage

from deltaplane.aggregation.secagg import EnrollmentAuthority, SecAggAuthError, SecAggError
from deltaplane.aggregation.secagg.enrollment import RunEnrollment
from deltaplane.aggregation.secagg.revocation import revoke, write_revocations
from deltaplane.errors import ConfigError
from deltaplane.flower import digits_client_app
from deltaplane.flower.secagg import REVOCATIONS_NODE_CONFIG_KEY, SECAGG_KEY, node_credentials


def test_node_config_names_the_revocation_list(tmp_path) -> None:
    run = RunEnrollment(cohort="fleet")
    node = run.write_node_config(tmp_path, "device-0")
    crl = revoke(run.authority, [("device-3", "fleet")], issued=1)
    write_revocations(tmp_path / "revoked.bin", crl)
    creds = node_credentials({**node, REVOCATIONS_NODE_CONFIG_KEY: str(tmp_path / "revoked.bin")})
    assert creds is not None and creds.revocations == crl
    assert creds.revocations.names(run.credentials("device-3").identity.certificate)
    assert node_credentials(node).revocations is None
    with pytest.raises(ConfigError, match="no enrollment"):
        node_credentials({REVOCATIONS_NODE_CONFIG_KEY: str(tmp_path / "revoked.bin")})
    with pytest.raises(ConfigError, match="is a file path"):
        node_credentials({**node, REVOCATIONS_NODE_CONFIG_KEY: 3})
    # a list signed by another authority than the node's: refused when the node reads its config
    write_revocations(tmp_path / "foreign.bin", revoke(EnrollmentAuthority.generate(), [], issued=1))
    with pytest.raises(SecAggAuthError, match="foreign.bin.*does not trust"):
        node_credentials({**node, REVOCATIONS_NODE_CONFIG_KEY: str(tmp_path / "foreign.bin")})


REVOKED = 2  # device-2's identity key leaked: the authority revokes it, the server still seats it


@pytest.mark.parametrize("listed", [True, False], ids=["nodes-hold-the-list", "no-list"])
def test_enrolled_nodes_holding_the_list_refuse_a_round_seating_the_revoked_node(
    loopback_grid, tmp_path, listed
) -> None:
    """A whole authenticated Flower round (loopback Grid, enrolled nodes) in which node 2's certificate is revoked.
    The ServerApp has no list and seats node 2 (which holds none: the leaked key's holder); every other node holds
    it in its node_config (``secagg-revocations``) and refuses the signed roster naming slot 2 before it sends a
    share (SecAggAuthError in its error reply): nothing trains or unmasks, and the ServerApp's SecAggError names
    the nodes' refusals. Without the list on the nodes the very same round runs (what the list changes)."""
    cfg = CFG.replace(rounds=1)
    run = RunEnrollment(cohort="fleet")
    crl = revoke(run.authority, [(f"device-{REVOKED}", "fleet")], issued=1_800_000_000)
    write_revocations(tmp_path / "revoked.bin", crl)

    class Grid(_Recording, loopback_grid):
        pass

    grid = Grid(digits_client_app(cfg), cfg.clients)
    for context in grid.contexts.values():
        i = int(context.node_config["partition-id"])
        context.node_config.update(run.write_node_config(tmp_path, f"device-{i}"))
        if listed and i != REVOKED:
            context.node_config[REVOCATIONS_NODE_CONFIG_KEY] = str(tmp_path / "revoked.bin")
    revoked_node = 100 + REVOKED
    if not listed:
        rounds, _ = _run(grid, cfg, authenticated=True)
        assert len(rounds) == 1 and rounds[0].clients == cfg.clients
        assert not any(r.has_error() for _, r in grid.replies)
        assert len(grid.replies_to("unmask")) == cfg.clients
        return
    with pytest.raises(SecAggError) as exc:
        _run(grid, cfg, authenticated=True)
    slot = next(
        int(m.content[SECAGG_KEY]["client-id"])
        for m in grid.sent
        if _stage(m) == "advertise" and m.metadata.dst_node_id == revoked_node
    )
    refusal = f"roster slot {slot}: device 'device-{REVOKED}' of cohort 'fleet' is revoked"
    assert re.search(rf"only 1 clients shared keys.*SecAggAuthError.*{re.escape(refusal)}", str(exc.value))
    adverts = grid.replies_to("advertise")
    assert len(adverts) == cfg.clients and not any(r.has_error() for r in adverts)  # the server seated node 2
    shares = {r.metadata.src_node_id: r for r in grid.replies_to("share")}
    assert len(shares) == cfg.clients and not shares[revoked_node].has_error()
    for node, r in shares.items():
        if node != revoked_node:
            assert r.has_error() and not r.has_content()
            assert "SecAggAuthError" in r.error.reason and refusal in r.error.reason
    assert not any(_stage(m) in {"consistency", "unmask"} for m in grid.sent)
    assert not any(m.metadata.message_type == "train" for m in grid.sent)
