"""Revoked devices over the service: given the enrollment authority's revocation list, the service refuses a
revoked device's key advertisement (422) and the round goes on, exact, without it; a service not given it (or
colluding with whoever holds the revoked device's leaked key) seats the device, and every honest device holding
the list refuses the roster, naming the slot, before it sends anything (the round fails closed)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from tests.serve import test_secagg_auth_http
from tests.serve.test_secagg_auth_http import _creds, _open

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    RingEncoding,
    SecAggAuthError,
)
from deltaplane.aggregation.secagg.revocation import revoke, write_revocations
from deltaplane.delta import Delta
from deltaplane.serve import ServiceError
from deltaplane.serve.secagg_client import SecAggDevice

NAMES = [f"dev-{i}" for i in range(6)]
REVOKED = 4
authority = test_secagg_auth_http.authority  # the module-scoped fixture


@pytest.fixture(scope="module")
def fleet(authority) -> dict[str, DeviceCredentials]:
    """Each device's enrollment, before any revocation (what the leaked key's holder has for dev-4)."""
    return {d: _creds(authority, d) for d in NAMES}


@pytest.fixture
def crl_file(authority, tmp_path):
    crl = revoke(authority, [(NAMES[REVOKED], "fleet")], issued=1_800_000_000)
    write_revocations(tmp_path / "revoked.bin", crl)
    return tmp_path / "revoked.bin", crl


def _devices(svc, rnd, creds) -> list[SecAggDevice]:
    devices = [SecAggDevice(svc.device(d), "cnn", rnd, credentials=creds[d]) for d in NAMES]
    base = svc.reg.load_state(svc.reg.get("cnn", devices[0].base_version))
    g, enc = torch.Generator().manual_seed(0), RingEncoding(bits=16, clip_range=0.5, weight_scale=0)
    for i, dev in enumerate(devices):
        delta = Delta({k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        dev.codes = enc.encode(delta, 1, np.random.default_rng(i))
        dev.set_update(delta, 1, np.random.default_rng(i))
    return devices


def test_a_service_given_the_list_refuses_the_revoked_device_and_the_round_is_exact_without_it(
    service_factory, fleet, crl_file
) -> None:
    path, crl = crl_file
    svc = service_factory(secagg_revocations=str(path))
    rnd = _open(svc, NAMES)
    held = {d: c.with_revocations(crl) for d, c in fleet.items()}
    devices = _devices(svc, rnd, held)
    with pytest.raises(ServiceError) as exc:
        devices[REVOKED].advertise()
    assert exc.value.status == 422 and "'dev-4'" in exc.value.detail and "revoked" in exc.value.detail
    rest = [dev for i, dev in enumerate(devices) if i != REVOKED]
    for stage in ("advertise", "share", "upload", "vouch"):
        for dev in rest:
            getattr(dev, stage)()
        svc.admin.advance_secagg("cnn", rnd)
    for dev in rest:
        dev.unmask()
    closed = svc.admin.close_secagg("cnn", rnd)
    total = sum(dev.codes.astype(np.uint64) for dev in rest)  # every unrevoked device, exactly
    assert closed["published"]["sum_sha256"] == hashlib.sha256(total.astype("<u8").tobytes()).hexdigest()
    assert closed["responded"] == 5


def test_devices_holding_the_list_refuse_a_roster_seating_the_revoked_device(
    service_factory, fleet, crl_file
) -> None:
    _, crl = crl_file
    svc = service_factory()  # not given the list: it seats whoever signs with dev-4's certified key
    rnd = _open(svc, NAMES)
    held = {d: (c if d == NAMES[REVOKED] else c.with_revocations(crl)) for d, c in fleet.items()}
    devices = _devices(svc, rnd, held)  # dev-4's slot: the leaked key's holder (it holds no list)
    for dev in devices:
        dev.advertise()
    svc.admin.advance_secagg("cnn", rnd)
    slot = devices[REVOKED].client_id
    for i, dev in enumerate(devices):
        if i == REVOKED:
            continue
        sent = dev.bytes_sent
        with pytest.raises(SecAggAuthError, match=f"roster slot {slot}: device 'dev-4'.*revoked") as exc:
            dev.share()
        assert exc.value.client == slot and dev.bytes_sent == sent
    devices[REVOKED].share()
    with pytest.raises(ServiceError) as err:  # one device shared: the round cannot go on, fails closed
        svc.admin.advance_secagg("cnn", rnd)
    assert "only 1 clients shared keys" in err.value.detail


def test_the_service_refuses_a_malformed_list_at_round_open(service_factory, crl_file) -> None:
    path, _ = crl_file
    path.write_bytes(path.read_bytes()[:-1])
    svc = service_factory(secagg_revocations=str(path))
    with pytest.raises(ServiceError) as err:
        _open(svc, NAMES)
    assert err.value.status == 422 and "revocation list" in err.value.detail
    assert _open(svc, NAMES, authenticated=False)  # an unauthenticated round checks no certificate at all
