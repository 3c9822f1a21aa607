"""Revoked devices over the service: given the enrollment authority's revocation list, the service refuses a
revoked device's key advertisement (422) and the round goes on, exact, without it; a service not given it (or
colluding with whoever holds the revoked device's leaked key) seats the device, and every honest device holding
the list refuses the roster, naming the slot, before it sends anything (the round fails closed)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.serve import test_secagg_auth_http
from tests.serve.test_rounds import restart
from tests.serve.test_secagg_auth_http import _creds, _open

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    EnrollmentAuthority,
    RevocationList,
    RingEncoding,
    SecAggAuthError,
)
from deltaplane.aggregation.secagg.errors import RevocationsStale
from deltaplane.aggregation.secagg.revocation import load_revocations, revoke, write_revocations
from deltaplane.delta import Delta
from deltaplane.errors import ConfigError
from deltaplane.serve import ServiceError
from deltaplane.serve.fleet import own_certificate_holds, refresh_revocations
from deltaplane.serve.secagg_client import SecAggDevice

NAMES = [f"dev-{i}" for i in range(6)]
REVOKED = 4
_BODY = {"bits": 16, "clip_range": 0.5, "weight_scale": 0, "authenticated": True}  # as _open opens
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


def _devices(svc, rnd, creds, names: list[str] = NAMES) -> list[SecAggDevice]:
    devices = [SecAggDevice(svc.device(d), "cnn", rnd, credentials=creds[d]) for d in names]
    base = svc.reg.load_state(svc.reg.get("cnn", devices[0].base_version))
    g, enc = torch.Generator().manual_seed(0), RingEncoding(bits=16, clip_range=0.5, weight_scale=0)
    for i, dev in enumerate(devices):
        delta = Delta({k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        dev.codes = enc.encode(delta, 1, np.random.default_rng(i))
        dev.set_update(delta, 1, np.random.default_rng(i))
    return devices


def _round_without_the_revoked_device(svc, held: dict[str, DeviceCredentials]) -> None:
    """An authenticated round opened for every device, each holding ``held``'s credentials: the service leaves
    the revoked dev-4 out of the invitation (it says so), refuses it the round (403), and every stage closes on
    the five others alone: the round publishes their exact sum."""
    opened = svc.admin._post("/admin/models/cnn/secagg", {**_BODY, "devices": NAMES})
    assert opened["revoked"] == [NAMES[REVOKED]] and opened["invited"] == len(NAMES) - 1
    assert opened["config"]["num_clients"] == len(NAMES) - 1
    rnd = opened["round"]
    with pytest.raises(ServiceError) as exc:
        SecAggDevice(svc.device(NAMES[REVOKED]), "cnn", rnd, credentials=held[NAMES[REVOKED]])
    assert exc.value.status == 403 and "not invited" in exc.value.detail
    rest = _devices(svc, rnd, held, [d for d in NAMES if d != NAMES[REVOKED]])
    for stage, counted in (("advertise", "advertised"), ("share", "shared"), ("upload", "uploaded")):
        for dev in rest:
            getattr(dev, stage)()
        # every invited device posted: the stage is complete, nobody left to wait for (no deadline)
        assert svc.admin.secagg_status("cnn", rnd)[counted] == svc.admin.secagg_status("cnn", rnd)["invited"]
        svc.admin.advance_secagg("cnn", rnd)
    for dev in rest:
        dev.vouch()
    svc.admin.advance_secagg("cnn", rnd)
    for dev in rest:
        dev.unmask()
    closed = svc.admin.close_secagg("cnn", rnd)
    total = sum(dev.codes.astype(np.uint64) for dev in rest)  # every unrevoked device, exactly
    assert closed["published"]["sum_sha256"] == hashlib.sha256(total.astype("<u8").tobytes()).hexdigest()
    assert closed["responded"] == 5 and closed["dropped"] == []


def test_a_service_given_the_list_refuses_the_revoked_device_and_the_round_is_exact_without_it(
    service_factory, fleet, crl_file
) -> None:
    path, crl = crl_file
    svc = service_factory(secagg_revocations=str(path))
    _round_without_the_revoked_device(svc, {d: c.with_revocations(crl) for d, c in fleet.items()})
    # the Fleet page's summary names the device left out, and a restarted service still does
    restart(svc)
    (closed,) = svc.admin.closed_rounds()
    assert closed["revoked"] == [NAMES[REVOKED]] and closed["authenticated"] and closed["contributors"] == 5


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


def test_a_service_given_a_list_file_not_written_yet_says_how_to_issue_and_upload_the_first(
    service_factory, authority, tmp_path
) -> None:
    # docs/fleet.md starts the service with --secagg-revocations state/revoked.bin before any list exists
    svc, path = _uploading_service(service_factory, authority, tmp_path)
    assert not path.exists()
    with pytest.raises(ServiceError) as err:
        _open(svc, NAMES)
    assert err.value.status == 422
    assert "no revocation list yet" in err.value.detail
    assert "keys revoke" in err.value.detail and "POST /admin/secagg/revocations" in err.value.detail
    svc.admin.upload_revocations(revoke(authority, [], issued=int(time.time())).to_bytes())
    assert _open(svc, NAMES)  # the upload is all it took: no restart


# -- a new list without a restart: uploaded by the operator, fetched by devices ------------------------------


def _uploading_service(service_factory, authority, tmp_path, held=None):
    """A service keeping its list in ``revoked.bin`` (``held`` there first, if given), verifying it under the
    authority's public key."""
    pub = tmp_path / "enrollment.ed25519.pub"
    pub.write_text(authority.public_text() + "\n")
    path = tmp_path / "revoked.bin"
    if held is not None:
        write_revocations(path, held)
    svc = service_factory(secagg_revocations=str(path), secagg_authority=str(pub))
    return svc, path


def _fleet_device(svc, name, creds, keep):
    """What refresh_revocations reads of a fleet device: its connection, credentials, kept file and log."""
    return SimpleNamespace(conn=svc.device(name), credentials=creds, revocations_file=keep, log=[].append)


def test_a_list_uploaded_without_restart_refuses_the_revoked_device_end_to_end(
    service_factory, authority, fleet, tmp_path
) -> None:
    now = int(time.time())
    empty = revoke(authority, [], issued=now)
    svc, path = _uploading_service(service_factory, authority, tmp_path, held=empty)
    # the leaked key of dev-4 is reported: the operator revokes it and uploads the list; no restart
    crl = revoke(authority, [(NAMES[REVOKED], "fleet")], issued=now, previous=empty)
    answer = svc.admin.upload_revocations(crl.to_bytes())
    assert answer == {
        "sequence": 2,
        "issued": now,
        "next_update": now + 7 * 86_400,
        "revoked": 1,
        "revoked_keys": 0,  # added (deliberately) beside "revoked": the keys a version-3 list revokes
        "replaced": True,
    }
    assert path.read_bytes() == crl.to_bytes()
    # each honest device takes it from the service before the round, and keeps it
    held = {}
    for i, d in enumerate(NAMES):
        dev = _fleet_device(svc, d, fleet[d], tmp_path / f"{d}.revocations")
        if i != REVOKED:
            assert refresh_revocations(dev) is True
            assert (tmp_path / f"{d}.revocations").read_bytes() == crl.to_bytes()
        held[d] = dev.credentials
    _round_without_the_revoked_device(svc, held)


def test_uploads_that_are_forged_stale_rolled_back_or_oversized_are_refused(
    service_factory, authority, tmp_path
) -> None:
    now = int(time.time())
    first = revoke(authority, [(NAMES[1], "fleet")], issued=now)
    second = revoke(authority, [(NAMES[2], "fleet")], issued=now, previous=first)
    svc, path = _uploading_service(service_factory, authority, tmp_path, held=second)

    def refused(data: bytes) -> ServiceError:
        with pytest.raises(ServiceError) as exc:
            svc.admin.upload_revocations(data)
        return exc.value

    assert refused(first.to_bytes()).status == 409  # a rollback
    assert "never goes back" in refused(first.to_bytes()).detail
    rogue = EnrollmentAuthority.generate()
    forged = RevocationList(
        authority.id, 9, now, now + 3600, frozenset(), revoke(rogue, [], issued=now).signature
    )
    err = refused(forged.to_bytes())
    assert err.status == 422 and "forged or altered" in err.detail
    assert refused(revoke(rogue, [], issued=now).to_bytes()).status == 422  # an untrusted authority
    stale = revoke(authority, [], issued=now - 2 * 86_400, valid_s=86_400, previous=second)
    err = refused(stale.to_bytes())
    assert err.status == 422 and "next update" in err.detail
    assert refused(second.to_bytes()[:-1]).status == 400
    assert refused(bytes(2 << 20)).status == 413
    assert refused(b"").status == 400
    assert path.read_bytes() == second.to_bytes()  # nothing replaced it
    assert svc.admin.upload_revocations(second.to_bytes())["replaced"] is False
    # the admin token is required; a device token does not upload
    resp = svc.http.post("/admin/secagg/revocations", content=second.to_bytes())
    assert resp.status_code == 401
    dev = svc.device("dev-0")
    with pytest.raises(ServiceError) as exc:
        dev.request("POST", "/admin/secagg/revocations", content=second.to_bytes())
    assert exc.value.status == 401
    # the device endpoint needs a device token, and answers the list as held
    assert svc.http.get("/v1/secagg/revocations").status_code == 401
    assert dev.request("GET", "/v1/secagg/revocations").content == second.to_bytes()


def test_uploads_need_a_kept_file_and_the_authority_key(service_factory, authority, tmp_path) -> None:
    data = revoke(authority, [], issued=int(time.time())).to_bytes()
    for config, why in (
        ({}, "--secagg-revocations FILE"),
        ({"secagg_revocations": str(tmp_path / "r")}, "--secagg-enrollment-authority"),
    ):
        svc = service_factory(**config)
        with pytest.raises(ServiceError) as exc:
            svc.admin.upload_revocations(data)
        assert exc.value.status == 409 and why in exc.value.detail
    assert not (tmp_path / "r").exists()


def test_another_authoritys_list_is_refused_at_start_and_at_upload(
    service_factory, authority, tmp_path
) -> None:
    """A service trusting one enrollment authority (--secagg-enrollment-authority) refuses a list signed by
    another, naming the option and both authorities: held in its file at start, and uploaded."""
    rogue = EnrollmentAuthority.generate()
    foreign = revoke(rogue, [], issued=int(time.time()))
    with pytest.raises(ConfigError) as exc:
        _uploading_service(service_factory, authority, tmp_path, held=foreign)
    said = str(exc.value)
    assert "revoked.bin" in said and "--secagg-enrollment-authority" in said
    assert rogue.id.hex() in said and authority.id.hex() in said
    (tmp_path / "own").mkdir()
    svc, path = _uploading_service(service_factory, authority, tmp_path / "own")
    with pytest.raises(ServiceError) as err:
        svc.admin.upload_revocations(foreign.to_bytes())
    assert err.value.status == 422 and "--secagg-enrollment-authority" in err.value.detail
    assert rogue.id.hex() in err.value.detail and not path.exists()


def test_serve_warns_once_that_a_list_without_the_authority_key_is_unchecked(tmp_path, monkeypatch) -> None:
    """`serve --secagg-revocations` without --secagg-enrollment-authority uses the list unverified: it says so
    once at start, naming the option; with the key it does not."""
    from typer.testing import CliRunner

    import deltaplane.serve as serve_pkg
    from deltaplane.cli import app

    monkeypatch.setattr(serve_pkg, "create_app", lambda config, **kw: object())
    monkeypatch.setattr(serve_pkg, "serve", lambda app_, **kw: None)
    pub = tmp_path / "enrollment.ed25519.pub"
    pub.write_text(EnrollmentAuthority.generate().public_text() + "\n")
    said = {}
    for name, extra in (("unchecked", []), ("checked", ["--secagg-enrollment-authority", str(pub)])):
        r = CliRunner().invoke(
            app,
            ["serve", "--home", str(tmp_path / "h"), "--secagg-revocations", str(tmp_path / "r.bin"), *extra],
            terminal_width=300,
        )
        assert r.exit_code == 0, r.output
        said[name] = " ".join(r.output.split())
    assert said["unchecked"].count("warning: --secagg-revocations") == 1
    assert "used unchecked: without --secagg-enrollment-authority" in said["unchecked"]
    assert "warning" not in said["checked"]


def test_a_stale_list_refuses_the_round_open_until_a_current_one_is_uploaded(
    service_factory, authority, fleet, tmp_path
) -> None:
    now = int(time.time())
    stale = revoke(authority, [], issued=now - 2 * 86_400, valid_s=86_400)
    svc, _ = _uploading_service(service_factory, authority, tmp_path, held=stale)
    with pytest.raises(ServiceError) as err:
        _open(svc, NAMES)
    assert (
        err.value.status == 422
        and "next update" in err.value.detail
        and "POST /admin/secagg/revocations" in err.value.detail
    )
    # a device holding the stale list refuses the invitation itself (typed, before it trains)
    svc.admin.upload_revocations(revoke(authority, [], issued=now, previous=stale).to_bytes())
    rnd = _open(svc, NAMES)
    with pytest.raises(RevocationsStale, match="fleet device fetches the service's"):
        SecAggDevice(svc.device(NAMES[0]), "cnn", rnd, credentials=fleet[NAMES[0]].with_revocations(stale))


def test_a_man_in_the_middle_serving_an_old_list_is_refused_and_the_kept_list_stays(
    authority, fleet, tmp_path
) -> None:
    now = int(time.time())
    old = revoke(authority, [], issued=now)
    new = revoke(authority, [(NAMES[REVOKED], "fleet")], issued=now, previous=old)
    keep = tmp_path / "dev-0.revocations"
    write_revocations(keep, new)

    class Replaying:  # answers the list it recorded earlier, instead of the service's
        def request(self, method, path, **_):
            assert (method, path) == ("GET", "/v1/secagg/revocations")
            return SimpleNamespace(content=old.to_bytes())

    creds = fleet[NAMES[0]].with_revocations(load_revocations(keep, authority.trust()))  # a restarted device
    lines: list[str] = []
    dev = SimpleNamespace(conn=Replaying(), credentials=creds, revocations_file=keep, log=lines.append)
    assert refresh_revocations(dev) is False
    assert dev.credentials.revocations == new and keep.read_bytes() == new.to_bytes()
    assert "refused the service's revocation list" in lines[0] and "never goes back" in lines[0]


def test_a_device_that_takes_a_list_revoking_itself_or_outlives_its_certificate_sits_out(
    service_factory, authority, fleet, tmp_path
) -> None:
    """The device checks its own certificate after each refresh, as every neighbour will: one revoked by the list
    it just took, or expired while it ran, sits the round out (logged, with what to do) instead of advertising
    and having every neighbour refuse the roster seating it."""
    now = int(time.time())
    empty = revoke(authority, [], issued=now)
    svc, _ = _uploading_service(service_factory, authority, tmp_path, held=empty)
    lines: list[str] = []
    dev = SimpleNamespace(
        conn=svc.device(NAMES[REVOKED]),
        credentials=fleet[NAMES[REVOKED]],
        revocations_file=tmp_path / "dev-4.revocations",
        log=lines.append,
    )
    assert refresh_revocations(dev) is True and own_certificate_holds(dev) is True and len(lines) == 1
    svc.admin.upload_revocations(
        revoke(authority, [(NAMES[REVOKED], "fleet")], issued=now, previous=empty).to_bytes()
    )
    assert refresh_revocations(dev) is True
    assert own_certificate_holds(dev) is False
    assert "sits this round out" in lines[-1] and "'dev-4'" in lines[-1] and "new device id" in lines[-1]
    # an unrevoked device whose certificate expired while it ran (its clock moved past the expiry)
    expired = dataclasses.replace(fleet[NAMES[0]], clock=lambda: 2.0**40)
    dev = SimpleNamespace(credentials=expired, log=lines.append)
    assert own_certificate_holds(dev) is False and "expired" in lines[-1]


def test_an_open_left_with_too_few_devices_once_the_revoked_are_out_is_refused_naming_them(
    service_factory, crl_file
) -> None:
    path, crl = crl_file
    svc = service_factory(secagg_revocations=str(path))
    names = [NAMES[0], NAMES[1], NAMES[REVOKED]]  # threshold 3 of 3: two unrevoked devices cannot carry it
    with pytest.raises(ServiceError) as err:
        svc.admin._post("/admin/models/cnn/secagg", {**_BODY, "devices": names, "threshold": 3})
    assert err.value.status == 422
    assert (
        "left out: dev-4" in err.value.detail and f"revocation list number {crl.sequence}" in err.value.detail
    )
    assert "new device ids" in err.value.detail
    # the same devices in an unauthenticated round: no certificate is checked, nobody left out
    opened = svc.admin._post("/admin/models/cnn/secagg", {**_BODY, "devices": names, "authenticated": False})
    assert opened["revoked"] == [] and opened["invited"] == 3


def test_under_distributed_dp_m_min_counts_only_the_devices_left_once_the_revoked_are_out(
    service_factory, crl_file
) -> None:
    """Distributed DP calibrated to m_min 3: three devices inviting the revoked dev-4 leave two, too few for the
    noise: refused (422) naming dev-4; four leave three, enough: opened with three invited."""
    from deltaplane.engine import RunConfig

    path, _ = crl_file
    run = RunConfig(clients=4, secagg=True, clip="1.0", dp_noise=2.0, dp_delta=1e-3, secagg_min_contributors=3,
                    downlink_codec="identity", secagg_authenticated=True)  # fmt: skip
    svc = service_factory(federation=run, secagg_revocations=str(path))
    with pytest.raises(ServiceError) as err:
        svc.admin.open_secagg("cnn", [NAMES[0], NAMES[1], NAMES[REVOKED]], weight_scale=0)
    assert (
        err.value.status == 422
        and "a round of 2" in err.value.detail
        and "invite at least 3" in err.value.detail
    )
    assert "left out: dev-4" in err.value.detail
    opened = svc.admin.open_secagg("cnn", [NAMES[0], NAMES[1], NAMES[2], NAMES[REVOKED]], weight_scale=0)
    assert (
        opened["revoked"] == [NAMES[REVOKED]] and opened["invited"] == 3 and opened["authenticated"] is True
    )
