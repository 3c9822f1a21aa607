"""SecAgg message version 5 over the service: a version-4 device's first message is refused with a 400 that says
to upgrade it (and the round goes on without it), and a version-5 device refuses a service of another version at
the invitation, before it trains or sends anything.

The version-4 advertisement is forged from the header bytes of a valid one (its body layout is version 5's).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    RingEncoding,
    SecAggError,
)
from deltaplane.delta import Delta
from deltaplane.serve import ServiceError
from deltaplane.serve.secagg_client import SecAggDevice

from .test_secagg_auth_http import _open


def test_a_version_4_advertisement_gets_400_saying_upgrade_and_the_round_goes_on(service) -> None:
    authority = EnrollmentAuthority.generate()
    names = [f"dev-{i}" for i in range(6)]
    rnd = _open(service, names, authenticated=True)
    creds = [
        DeviceCredentials(
            DeviceIdentity.enroll(authority, d, cohort="c", expires=4_000_000_000), authority.trust()
        )
        for d in names
    ]
    devices = [
        SecAggDevice(service.device(d), "cnn", rnd, credentials=c) for d, c in zip(names, creds, strict=True)
    ]
    assert devices[0].invitation["secagg_version"] == 5
    # device 0 runs deltaplane from before version 5: the same advertisement with version byte 4
    v5 = devices[0].endpoint.advertise()
    v4 = v5[:4] + bytes([4]) + v5[5:]
    with pytest.raises(ServiceError) as exc:
        devices[0].post("keys", v4)
    assert exc.value.status == 400
    assert "version 4 is not supported" in exc.value.detail
    assert "older deltaplane: upgrade it to a release that speaks version 5" in exc.value.detail
    assert service.admin.secagg_status("cnn", rnd)["stage"] == "advertise keys"
    # not stalled: the others run the round to the end, device 0 counted as gone before keys
    base = service.reg.load_state(service.reg.get("cnn", devices[0].base_version))
    g = torch.Generator().manual_seed(0)
    enc = RingEncoding(bits=16, clip_range=0.5, weight_scale=0)
    codes = []
    for i, dev in enumerate(devices[1:], start=1):
        delta = Delta({k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        codes.append(enc.encode(delta, 1, np.random.default_rng(i)))
        dev.set_update(delta, 1, np.random.default_rng(i))
    for stage in ("advertise", "share", "upload", "vouch"):
        for dev in devices[1:]:
            getattr(dev, stage)()
        service.admin.advance_secagg("cnn", rnd)
    for dev in devices[1:]:
        dev.unmask()
    closed = service.admin.close_secagg("cnn", rnd)
    total = sum(c.astype(np.uint64) for c in codes)
    assert closed["survivors"] == [1, 2, 3, 4, 5]
    assert closed["published"]["sum_sha256"] == hashlib.sha256(total.astype("<u8").tobytes()).hexdigest()


class _Service:
    """A device connection whose invitation is rewritten as another service would send it; it records every
    request, so a test can check the device sent nothing."""

    def __init__(self, client, change) -> None:
        self.client, self.change, self.calls = client, change, []

    def request(self, method: str, path: str, **kw):
        self.calls.append((method, path))
        resp = self.client.request(method, path, **kw)
        if method == "GET" and path.count("/") == 5:  # /v1/models/{m}/secagg/{n}: the invitation
            inv = resp.json()
            self.change(inv)
            resp.json = lambda: inv
        return resp


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            lambda inv: inv.pop("secagg_version"),
            "version 5 and the service states none .so it is older than 5.*upgrade the service",
        ),
        (
            lambda inv: inv.update(secagg_version=4),
            "speaks version 4, so.*upgrade the service to a release that speaks 5",
        ),
        (
            lambda inv: inv.update(secagg_version=6),
            "speaks version 6, so.*upgrade this device to a release that speaks 6",
        ),
    ],
)
def test_a_device_refuses_a_service_of_another_version_at_the_invitation(service, change, says) -> None:
    names = [f"dev-{i}" for i in range(4)]
    rnd = _open(service, names, authenticated=False)
    conn = _Service(service.device(names[0]), change)
    with pytest.raises(SecAggError, match=says):
        SecAggDevice(conn, "cnn", rnd)
    assert conn.calls == [("GET", f"/v1/models/cnn/secagg/{rnd}")]  # only the invitation: nothing sent
