"""A revoked *key* over the service: dev-3's identity key leaked, and its holder had it certified under another
id (dev-5) before the operator revoked it. The list `deltaplane keys revoke --certificate dev-3.cert` writes
names dev-3 and its key, so the dev-5 certificate is refused as well: by the service at key advertisement (422,
KeyRevoked's words), and by every fleet device holding the list, in the roster (the round fails closed) and as its
own certificate (it sits rounds out). Under the old source the list (version 3) is not read at all."""

from __future__ import annotations

import hashlib
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tests.serve import test_secagg_auth_http
from tests.serve.test_secagg_revocation_http import _devices, _uploading_service
from typer.testing import CliRunner

from deltaplane.aggregation.secagg import DeviceCredentials, DeviceIdentity, SecAggAuthError
from deltaplane.aggregation.secagg.revocation import load_revocations
from deltaplane.cli import app
from deltaplane.serve import ServiceError
from deltaplane.serve.fleet import own_certificate_holds

NAMES = [f"dev-{i}" for i in range(6)]
LEAKED, THIEF = "dev-3", "dev-5"  # dev-3's key, certified under dev-5 too before the revocation
authority = test_secagg_auth_http.authority  # the module-scoped fixture
EXPIRES = test_secagg_auth_http.EXPIRES


@pytest.fixture(scope="module")
def leak(authority, tmp_path_factory):
    """The fleet's credentials (dev-5's certifying dev-3's key) and the list the CLI wrote revoking dev-3."""
    root = tmp_path_factory.mktemp("leak")
    keys = {d: Ed25519PrivateKey.generate() for d in NAMES}
    keys[THIEF] = keys[LEAKED]
    creds = {}
    for d, k in keys.items():
        raw = k.public_key().public_bytes_raw()
        creds[d] = DeviceCredentials(
            DeviceIdentity(k, authority.issue(d, raw, cohort="fleet", expires=EXPIRES)), authority.trust()
        )
    cert = root / "dev-3.cert"
    cert.write_bytes(creds[LEAKED].identity.certificate.to_bytes())
    pem = root / "enrollment.ed25519.pem"
    pem.write_bytes(authority.to_pem())
    out = root / "revoked.bin"
    r = CliRunner().invoke(
        app,
        ["keys", "revoke", "--authority-key", str(pem), "--certificate", str(cert), "--out", str(out)],
        terminal_width=300,
    )
    assert r.exit_code == 0, r.output
    # independent of the reader: the list carries the SHA-256 of dev-3's raw public key
    raw = keys[LEAKED].public_key().public_bytes_raw()
    assert hashlib.sha256(raw).digest() in out.read_bytes()
    return creds, out


def test_the_service_refuses_the_revoked_key_under_another_id_at_advertisement(
    service_factory, authority, leak, tmp_path
) -> None:
    creds, listed = leak
    svc, _ = _uploading_service(service_factory, authority, tmp_path)
    svc.admin.upload_revocations(listed.read_bytes())
    opened = svc.admin._post(
        "/admin/models/cnn/secagg",
        {"bits": 16, "clip_range": 0.5, "weight_scale": 0, "authenticated": True, "devices": NAMES},
    )
    assert opened["revoked"] == [LEAKED]  # the id: left out at the open, which knows ids only
    rnd = opened["round"]
    devices = _devices(svc, rnd, creds, [d for d in NAMES if d != LEAKED])
    for dev in devices[:-1]:
        dev.advertise()
    with pytest.raises(ServiceError) as err:
        devices[-1].advertise()  # dev-5: a certificate the list does not name by id, binding dev-3's key
    assert err.value.status == 422
    assert "dev-5" in err.value.detail and "revocation list number 1 revokes" in err.value.detail
    assert "new identity key" in err.value.detail
    assert svc.admin.secagg_status("cnn", rnd)["advertised"] == len(NAMES) - 2


def test_fleet_devices_holding_the_list_refuse_a_roster_seating_the_revoked_key(
    service_factory, leak
) -> None:
    creds, listed = leak
    rl = load_revocations(listed, creds[NAMES[0]].trusted)
    svc = service_factory()  # not given the list: it seats dev-5
    names = [d for d in NAMES if d != LEAKED]
    rnd = test_secagg_auth_http._open(svc, names)
    held = {d: (c if d == THIEF else c.with_revocations(rl)) for d, c in creds.items()}
    devices = _devices(svc, rnd, held, names)
    for dev in devices:
        dev.advertise()
    svc.admin.advance_secagg("cnn", rnd)
    slot = devices[-1].client_id
    for dev in devices[:-1]:
        sent = dev.bytes_sent
        with pytest.raises(SecAggAuthError, match=f"roster slot {slot}: device 'dev-5'.*revokes") as exc:
            dev.share()
        assert type(exc.value).__name__ == "KeyRevoked" and exc.value.client == slot
        assert dev.bytes_sent == sent  # nothing sent
    # and dev-5 holding the list sits rounds out itself
    dev = type("Dev", (), {"credentials": creds[THIEF].with_revocations(rl), "log": [].append})()
    assert own_certificate_holds(dev) is False


def test_a_service_holding_the_old_authoritys_list_says_how_to_change_authority(
    service_factory, authority, leak, tmp_path
) -> None:
    """Changing the enrollment authority (docs/security.md): the service's file holds the old authority's list.
    Started with the new authority's key, it refuses to start saying to move the file away and upload the new
    authority's list; with the old key still beside the new one an upload is refused saying to remove it; with
    the new key alone the upload replaces the old authority's list."""
    from deltaplane.aggregation.secagg import EnrollmentAuthority
    from deltaplane.aggregation.secagg.revocation import revoke
    from deltaplane.errors import ConfigError

    _, listed = leak
    new = EnrollmentAuthority.generate()
    pub = tmp_path / "enrollment.ed25519.pub"
    pub.write_text(new.public_text() + "\n")
    path = tmp_path / "revoked.bin"
    path.write_bytes(listed.read_bytes())
    with pytest.raises(ConfigError) as exc:
        service_factory(secagg_revocations=str(path), secagg_authority=str(pub))
    said = str(exc.value)
    assert f"move {path} away" in said and "--carry" in said and authority.id.hex() in said
    # both keys trusted: the upload of the new list is refused, saying which key to remove
    pub.write_text(authority.public_text() + "\n")
    svc = service_factory(secagg_revocations=str(path), secagg_authority=str(pub))
    fresh = revoke(new, [], issued=int(time.time()), keys=load_revocations(listed, authority.trust()).keys)
    with pytest.raises(ServiceError) as err:  # the old key alone: the refusal says to put the new one there
        svc.admin.upload_revocations(fresh.to_bytes())
    assert err.value.status == 422 and "in place of the old one" in err.value.detail
    pub.write_text(authority.public_text() + "\n" + new.public_text() + "\n")
    with pytest.raises(ServiceError) as err:
        svc.admin.upload_revocations(fresh.to_bytes())
    assert err.value.status == 422 and "leave only the new authority's key" in err.value.detail
    pub.write_text(new.public_text() + "\n")  # the new key alone (re-read at each upload)
    answer = svc.admin.upload_revocations(fresh.to_bytes())
    assert answer["replaced"] is True and (answer["revoked"], answer["revoked_keys"]) == (0, 1)
    assert path.read_bytes() == fresh.to_bytes()
