"""``RunConfig.secagg_authenticated``: authenticated SecAgg rounds in a run, with one meaning on every driver.

Each driver enrolls the run's devices with an enrollment authority of its own run (``RunEnrollment``), every
device signs its key advertisement and checks its neighbours', and the consistency check runs before the
unmasking; the sums, and so the models, are the unauthenticated SecAgg run's exactly. Each run is watched at
its SecAgg servers (the ``secagg_servers`` fixture): only they show that the rounds really were authenticated.
Flower's driver: tests/flower/test_secagg_flower_authenticated.py.
"""

from __future__ import annotations

import pytest
import torch

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    SecAggAuthError,
)
from deltaplane.aggregation.secagg.enrollment import RunEnrollment
from deltaplane.engine import RunConfig
from deltaplane.engine.secure import deliver
from deltaplane.errors import ConfigError
from deltaplane.serve.federation import run_http_simulation
from deltaplane.sim import run_simulation

CFG = RunConfig(clients=4, rounds=2, local_epochs=1, lr=0.1, secagg=True, clip="2.0")


def _authenticated(servers, clients: int) -> None:
    """Every round's server was authenticated: signed advertisements from every device, every survivor's
    signature of the unmasking request (the consistency check)."""
    assert servers and all(s.authenticated for s in servers)
    for s in servers:
        assert len(s.attestations) == clients
        assert sorted(s.signatures) == list(s.survivors) and len(s.survivors) == clients


@pytest.mark.parametrize("engine", ["sequential", "batched", "population", "http"])
def test_an_authenticated_run_gives_the_unauthenticated_secagg_runs_model(secagg_servers, engine) -> None:
    cfg = CFG if engine == "http" else CFG.replace(engine=engine)
    run = run_http_simulation if engine == "http" else run_simulation
    plain = run(cfg)
    assert not any(s.authenticated for s in secagg_servers)
    secagg_servers.clear()
    auth = run(cfg.replace(secagg_authenticated=True))
    _authenticated(secagg_servers, cfg.clients)
    assert [r.driver_invariants() for r in auth.rounds] == [r.driver_invariants() for r in plain.rounds]
    for k, v in plain.final_state.items():
        torch.testing.assert_close(auth.final_state[k], v, rtol=0, atol=0)
    # the signed advertisements and the signatures are bytes the devices send on top
    assert all(a.uplink_bytes > p.uplink_bytes for a, p in zip(auth.rounds, plain.rounds, strict=True))


def test_the_drivers_send_the_same_authenticated_bytes(secagg_servers) -> None:
    """In process and over HTTP the same messages: the uplink of an authenticated round is the same."""
    cfg = CFG.replace(secagg_authenticated=True, rounds=1)
    assert [r.uplink_bytes for r in run_http_simulation(cfg).rounds] == [
        r.uplink_bytes for r in run_simulation(cfg).rounds
    ]


def test_a_device_of_another_authority_fails_the_authenticated_round(monkeypatch) -> None:
    """The devices do verify: one device enrolled by a foreign authority is refused by its neighbours
    (SecAggAuthError naming its roster slot), and the run stops; it is no semi-honest round in disguise."""
    foreign = EnrollmentAuthority.generate()
    credentials = RunEnrollment.credentials

    def mixed(self, device: str) -> DeviceCredentials:
        if device != "device-2":
            return credentials(self, device)
        ident = DeviceIdentity.enroll(foreign, device, cohort=self.cohort, expires=self.expires)
        return DeviceCredentials(ident, foreign.trust())

    monkeypatch.setattr(RunEnrollment, "credentials", mixed)
    with pytest.raises(SecAggAuthError, match="roster slot 2"):
        run_simulation(CFG.replace(secagg_authenticated=True, rounds=1))


def test_secagg_authenticated_needs_secagg() -> None:
    with pytest.raises(
        ConfigError, match="secagg_authenticated authenticates secure aggregation rounds.*set secagg"
    ):
        RunConfig(secagg_authenticated=True)
    with pytest.raises(ConfigError, match="set secagg too"):
        CFG.replace(secagg=False, secagg_authenticated=True)
    assert RunConfig.from_mapping(
        {"secagg": {"enabled": True, "authenticated": True}, "privacy": {"clip": 2.0}}
    ).secagg_authenticated
    assert "authenticated SecAgg" in CFG.replace(secagg_authenticated=True).describe_aggregation()


def test_a_driver_that_forgets_the_runs_enrollment_is_refused() -> None:
    """An in-process round of an authenticated run delivered without the run's enrollment is a ConfigError, never
    a silently unauthenticated round (what a new driver that does not pass it would get)."""
    from deltaplane.delta import Delta
    from deltaplane.engine.client import Upload

    cfg = CFG.replace(secagg_authenticated=True)
    update = Delta({"w": torch.zeros(4)})
    uploads = [Upload(cid=i, num_samples=10, secure=update) for i in range(3)]

    class Server:
        def receive_payloads(self, run) -> None:
            pass

    with pytest.raises(ConfigError, match="without the run's enrollment"):
        deliver(cfg, Server(), uploads, 1)  # type: ignore[arg-type]
