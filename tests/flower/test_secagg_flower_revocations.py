"""A Flower node's revocation list: ``node_config``'s optional ``secagg-revocations`` names the enrollment
authority's list; the node's credentials hold it, verified, only beside its enrollment."""

from __future__ import annotations

import pytest

from deltaplane.aggregation.secagg import EnrollmentAuthority, SecAggAuthError
from deltaplane.aggregation.secagg.enrollment import RunEnrollment
from deltaplane.aggregation.secagg.revocation import revoke, write_revocations
from deltaplane.errors import ConfigError
from deltaplane.flower.secagg import REVOCATIONS_NODE_CONFIG_KEY, node_credentials


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
