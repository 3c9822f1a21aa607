"""Two services whose devices trust one enrollment authority, serving a model of the same name and opening a
round of the same number with the same parameters: the operator of one replays there the signed key
advertisement a device of the other sent to its own service, to seat that device in a round it never joined.

Before the service binding (docs/security.md, "what a signature is bound to") both rounds had the same binding
and the honest devices took the replayed slot as certified; now each device binds the service it reached, as
it saw it (here the address: "http://a.test" and "http://b.test"), and refuses the roster, naming the slot.
Uses only what devices of both releases have, so it runs on either.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    SecAggAuthError,
)
from deltaplane.serve import AdminClient, DeviceClient
from deltaplane.serve.secagg_client import SecAggDevice

from .conftest import ADMIN, Service

EXPIRES = 4_000_000_000


class _At(Service):
    """A service reached at ``url`` (its devices and its admin use that address)."""

    def __init__(self, home, url: str) -> None:
        super().__init__(home)
        self.url = url
        self.http = TestClient(self.app, base_url=url, raise_server_exceptions=True)
        self.admin = AdminClient(url, ADMIN, client=self.http)

    def token(self, device_id: str) -> str:
        return self.admin.issue_token(device_id, "default")

    def device(self, device_id: str, cohort: str = "default") -> DeviceClient:
        return DeviceClient(self.url, self.token(device_id), verifier=self.verifier, client=self.http)

    def open(self, names: list[str]) -> int:
        body = {"devices": names, "bits": 16, "clip_range": 0.5, "weight_scale": 0, "authenticated": True}
        return self.admin._post("/admin/models/cnn/secagg", body)["round"]


def test_a_signed_advertisement_replayed_into_another_services_round_is_refused(tmp_path) -> None:
    authority = EnrollmentAuthority.generate()  # one authority enrolls the devices of both services

    def creds(name: str) -> DeviceCredentials:
        return DeviceCredentials(
            DeviceIdentity.enroll(authority, name, cohort="fleet", expires=EXPIRES), authority.trust()
        )

    a, b = _At(tmp_path / "a", "http://a.test"), _At(tmp_path / "b", "http://b.test")
    names_a = ["x", "a1", "a2", "a3"]
    names_b = ["x", "b1", "b2", "b3"]  # "x" is invited by B's operator; the real x never talks to B
    rnd = a.open(names_a)
    assert b.open(names_b) == rnd  # the same round number, model and parameters
    on_a = [SecAggDevice(a.device(d), "cnn", rnd, credentials=creds(d)) for d in names_a]
    on_b = [SecAggDevice(b.device(d), "cnn", rnd, credentials=creds(d)) for d in names_b[1:]]
    assert on_a[0].config == on_b[0].config and on_a[0].client_id == 0
    # x takes part in A's round: its signed advertisement is what B's operator captures (from A's roster or
    # any of A's devices)
    captured = on_a[0].endpoint.advertise()
    on_a[0].post("keys", captured)
    for dev in on_a[1:]:
        dev.advertise()
    a.admin.advance_secagg("cnn", rnd)
    # B's operator posts it as x's, with a token it issued for x itself (the service checks only the name)
    a_new_device = {"X-Deltaplane-SecAgg-Binding": "1"}  # forged like the rest: the service is the attacker
    b.http.post(
        f"/v1/models/cnn/secagg/{rnd}/keys",
        content=captured,
        headers={"Authorization": f"Bearer {b.token('x')}", **a_new_device},
    ).raise_for_status()
    for dev in on_b:
        dev.advertise()
    b.admin.advance_secagg("cnn", rnd)
    # A's round goes on: its devices all bound the service they reached, a.test
    for dev in on_a[1:]:
        dev.share()
    # B's honest devices refuse the roster seating x, and send nothing
    for dev in on_b:
        sent = dev.bytes_sent
        with pytest.raises(SecAggAuthError) as exc:
            dev.share()
        assert exc.value.client == 0 and dev.bytes_sent == sent
        assert "not signed by device 'x''s certified identity key" in str(exc.value)
