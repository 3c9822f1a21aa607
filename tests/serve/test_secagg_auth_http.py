"""Authenticated SecAgg rounds over the service: signed advertisements travel in the roster, devices refuse a
roster a man in the middle (or the server) altered, and refuse rounds that do not match their enrollment."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np
import pytest
import torch

from deltaplane.aggregation.secagg import (
    AdvertiseKeys,
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    KeyRoster,
    RingEncoding,
    SecAggAuthError,
    SecAggClient,
    SecAggConfig,
    decode_message,
)
from deltaplane.delta import Delta
from deltaplane.serve import ServiceError
from deltaplane.serve.secagg_client import SecAggDevice
from deltaplane.serve.service_identity import BINDING_HEADER

EXPIRES = 4_000_000_000


@pytest.fixture(scope="module")
def authority() -> EnrollmentAuthority:
    return EnrollmentAuthority.generate()


def _creds(authority: EnrollmentAuthority, name: str) -> DeviceCredentials:
    return DeviceCredentials(
        DeviceIdentity.enroll(authority, name, cohort="fleet", expires=EXPIRES), authority.trust()
    )


def _open(svc, names: list[str], authenticated: bool = True) -> int:
    body = {
        "devices": names,
        "bits": 16,
        "clip_range": 0.5,
        "weight_scale": 0,
        "authenticated": authenticated,
    }
    opened = svc.admin._post("/admin/models/cnn/secagg", body)
    assert opened["authenticated"] is authenticated
    return opened["round"]


def test_authenticated_round_over_http_is_exact(service, authority) -> None:
    names = [f"dev-{i}" for i in range(6)]
    rnd = _open(service, names)
    devices = [SecAggDevice(service.device(d), "cnn", rnd, credentials=_creds(authority, d)) for d in names]
    assert devices[0].invitation["authenticated"] is True
    base = service.reg.load_state(service.reg.get("cnn", devices[0].base_version))
    g = torch.Generator().manual_seed(0)
    enc = RingEncoding(bits=16, clip_range=0.5, weight_scale=0)
    codes = []
    for i, dev in enumerate(devices):
        delta = Delta({k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        codes.append(enc.encode(delta, 1, np.random.default_rng(i)))
        dev.set_update(delta, 1, np.random.default_rng(i))
    for stage in ("advertise", "share", "upload"):
        for dev in devices:
            getattr(dev, stage)()
        service.admin.advance_secagg("cnn", rnd)
    # the consistency check: the signatures are not served before it closes; device 5 vanishes during it
    with pytest.raises(ServiceError) as exc:
        devices[0].client.request("GET", f"/v1/models/cnn/secagg/{rnd}/consistency")
    assert exc.value.status == 409 and "not closed yet" in exc.value.detail
    for dev in devices[:5]:
        dev.vouch()
    status = service.admin.advance_secagg("cnn", rnd)
    assert status["stage"] == "unmasking" and status["signed"] == 5
    with pytest.raises(SecAggAuthError, match="did not sign"):  # it signed nothing: it reveals nothing
        devices[5].unmask()
    for dev in devices[:5]:
        dev.unmask()
    closed = service.admin.close_secagg("cnn", rnd)
    total = sum(c.astype(np.uint64) for c in codes)  # device 5 uploaded: it is in the sum
    assert closed["published"]["sum_sha256"] == hashlib.sha256(total.astype("<u8").tobytes()).hexdigest()
    assert closed["responded"] == 5


def test_an_unauthenticated_round_has_no_consistency_check(service) -> None:
    names = [f"dev-{i}" for i in range(6)]
    rnd = _open(service, names, authenticated=False)
    devices = [SecAggDevice(service.device(d), "cnn", rnd) for d in names]
    with pytest.raises(ServiceError) as exc:
        devices[0].client.request("GET", f"/v1/models/cnn/secagg/{rnd}/consistency")
    assert exc.value.status == 409 and "no consistency check" in exc.value.detail


def test_a_roster_altered_in_transit_is_refused_and_nothing_is_sent(service, authority) -> None:
    names = [f"dev-{i}" for i in range(6)]
    rnd = _open(service, names)
    devices = [SecAggDevice(service.device(d), "cnn", rnd, credentials=_creds(authority, d)) for d in names]
    for dev in devices:
        dev.advertise()
    service.admin.advance_secagg("cnn", rnd)
    target = devices[0]
    honest = decode_message(target.get("roster"), target.config)
    fake = SecAggClient(3, target.config).advertise_keys()  # the attacker's own keys in device 3's place
    altered = dataclasses.replace(honest, keys={**honest.keys, 3: (fake.c_public, fake.s_public)})
    target.get = lambda what: altered.to_bytes() if what == "roster" else pytest.fail(what)  # type: ignore[method-assign]
    sent = target.bytes_sent
    with pytest.raises(SecAggAuthError) as exc:
        target.share()
    assert exc.value.client == 3 and target.bytes_sent == sent
    # a stripped roster (the signatures dropped): refused too
    target.get = lambda what: KeyRoster(honest.round_id, dict(honest.keys)).to_bytes()  # type: ignore[method-assign]
    with pytest.raises(SecAggAuthError, match="unsigned roster"):
        target.share()


def test_invitations_and_advertisements_that_do_not_match_the_enrollment_are_refused(
    service, authority
) -> None:
    names = ["a", "b", "c"]
    plain = _open(service, names, authenticated=False)
    with pytest.raises(SecAggAuthError, match="not authenticated"):  # before training, nothing sent
        SecAggDevice(service.device("a"), "cnn", plain, credentials=_creds(authority, "a"))
    service.admin.abort_secagg("cnn", plain)
    rnd = _open(service, names)
    with pytest.raises(SecAggAuthError, match="no enrolled identity"):
        SecAggDevice(service.device("a"), "cnn", rnd)
    # the service takes only signed advertisements, certified for the token's device
    a = service.device("a")
    binding = {BINDING_HEADER: "1"}  # as a device of this release says (SecAggDevice sends it)
    cfg = SecAggConfig.from_dict(
        a.request("GET", f"/v1/models/cnn/secagg/{rnd}", headers=binding).json()["config"]
    )
    unsigned = AdvertiseKeys(
        rnd, 0, *(lambda m: (m.c_public, m.s_public))(SecAggClient(0, cfg).advertise_keys())
    )
    with pytest.raises(ServiceError) as err:
        a.request("POST", f"/v1/models/cnn/secagg/{rnd}/keys", content=unsigned.to_bytes(), headers=binding)
    assert err.value.status == 422 and "takes signed ones" in err.value.detail
    as_b = SecAggClient(0, cfg, credentials=_creds(authority, "b"), session=f"cnn/{rnd}".encode())
    with pytest.raises(ServiceError) as err:
        a.request(
            "POST",
            f"/v1/models/cnn/secagg/{rnd}/keys",
            content=as_b.advertise_keys().to_bytes(),
            headers=binding,
        )
    assert err.value.status == 422 and "certified for device 'b'" in err.value.detail


def test_a_federation_with_secagg_authenticated_opens_authenticated_rounds(service_factory) -> None:
    """``secagg.authenticated`` in the service's --federation YAML is the default of every open (as
    ``secagg.neighbours`` is), and ``fleet coordinate`` opens authenticated rounds under it without
    ``--authenticated``: the key is never silently ignored by the service or the coordinator."""
    from deltaplane.engine import RunConfig
    from deltaplane.serve.fleet import coordinate

    fed = RunConfig(clients=3, secagg=True, clip="1.0", secagg_bits=16, downlink_codec="identity",
                    secagg_authenticated=True)  # fmt: skip
    svc = service_factory(federation=fed)
    names = [f"dev-{i}" for i in range(3)]
    body = {"devices": names, "weight_scale": 0}
    assert svc.admin._post("/admin/models/cnn/secagg", body)["authenticated"] is True
    assert (
        svc.admin._post("/admin/models/cnn/secagg", body | {"authenticated": False})["authenticated"] is False
    )
    plain = service_factory(federation=fed.replace(secagg_authenticated=False))
    assert plain.admin._post("/admin/models/cnn/secagg", body)["authenticated"] is False

    for d in names:
        svc.device(d)
    opened: list[dict] = []
    open_secagg = svc.admin.open_secagg
    svc.admin.open_secagg = lambda model, devices, **kw: (
        opened.append(kw) or open_secagg(model, devices, **kw)
    )
    (s,) = coordinate(svc.admin, fed, model="cnn", rounds=1, deadline=0.2, devices=names, weight_scale=0.0,
                      drift=False)  # fmt: skip
    assert s.failed  # nobody advertised keys: the round is given up; it was opened authenticated
    assert [kw.get("authenticated") for kw in opened] == [True]
    # and `fleet coordinate` prints so, failed or not, with the dashboard's words
    assert s.line(1).startswith(f"round 1/1 (secagg, authenticated #{s.number}): failed: "), s.line(1)


def _run_round(service, authority, names: list[str], authenticated: bool) -> int:
    """One SecAgg round through every stage with every device present; returns its number once closed."""
    rnd = _open(service, names, authenticated)
    devices = [
        SecAggDevice(
            service.device(d), "cnn", rnd, credentials=_creds(authority, d) if authenticated else None
        )
        for d in names
    ]
    base = service.reg.load_state(service.reg.get("cnn", devices[0].base_version))
    for i, dev in enumerate(devices):
        dev.set_update(Delta({k: torch.zeros_like(v) for k, v in base.items()}), 1, np.random.default_rng(i))
    for stage in ("advertise", "share", "upload") + (("vouch",) if authenticated else ()):
        for dev in devices:
            getattr(dev, stage)()
        service.admin.advance_secagg("cnn", rnd)
    for dev in devices:
        dev.unmask()
    service.admin.close_secagg("cnn", rnd)
    return rnd


def test_the_fleet_page_says_which_secagg_rounds_were_authenticated(service, authority) -> None:
    """A newcomer who ran `fleet coordinate --authenticated` (docs/byo.md, docs/fleet.md) could not see in the
    dashboard that it took effect: the fleet page listed every SecAgg round as "secagg", authenticated or not.
    It now says "secagg, authenticated" for a round of signed key advertisements, open or closed."""
    names = [f"dev-{i}" for i in range(3)]
    plain = _run_round(service, authority, names, authenticated=False)
    signed = _run_round(service, authority, names, authenticated=True)
    opened = _open(service, names)  # left open, in its first stage
    closed = {r["round"]: r for r in service.state.fleet_snapshot()["closed_rounds"]}
    assert closed[plain]["authenticated"] is False and closed[signed]["authenticated"] is True
    page = service.http.get("/ui/fleet", headers={"Authorization": "Bearer admin-token-0123456789"}).text
    rows = {
        int(m.group(1)): m.group(2)
        for m in re.finditer(
            r'data-field="round">(\d+)</td><td>([^<]*)</td>', page.split('id="closed-rounds"')[1]
        )
    }
    assert rows == {plain: "secagg", signed: "secagg, authenticated"}, rows
    open_rows = page.split('id="open-rounds"')[1].split("</table>")[0]
    assert f'data-field="round">{opened}</td><td>secagg, authenticated (advertise keys)</td>' in open_rows, (
        open_rows
    )


def test_a_device_asking_whether_its_authenticated_round_ended_is_not_refused(service) -> None:
    """`fleet device` asks whether a round it dropped out of ended unpublished (`_round_unpublished`) by reading
    the invitation without the service binding header: an open authenticated round answered 409 (the outcome,
    "not known unpublished", was right, but the service refused and logged a request for a round that is
    fine). It states the binding now, as the round's own requests do; an aborted round still reads aborted."""
    from types import SimpleNamespace

    from deltaplane.serve.fleet import _round_unpublished

    names = ["dev-0", "dev-1", "dev-2"]
    rnd = _open(service, names)
    conn = service.device("dev-0")
    refused: list[int] = []
    ask = conn.request

    def spy(*args, **kwargs):
        try:
            return ask(*args, **kwargs)
        except ServiceError as exc:
            refused.append(exc.status)
            raise

    conn.request = spy
    dev = SimpleNamespace(conn=conn, model="cnn")
    assert _round_unpublished(dev, rnd, deadline=0.0) is None
    assert refused == []  # before: [409]
    service.admin.abort_secagg("cnn", rnd, reason="test")
    assert _round_unpublished(dev, rnd, deadline=0.0) == "aborted (it will never publish)"
