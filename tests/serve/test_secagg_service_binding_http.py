"""The service binding of authenticated SecAgg rounds (:mod:`deltaplane.serve.service_identity`): what identity a
device binds over TLS (the SHA-256 of the key the service presented) and over plain HTTP (the address), and the
refusals between releases: an older device is refused an authenticated round by a newer service (409, before it
trains and at ``keys``), and a newer device refuses an older service's authenticated round before it trains.
The replay this closes is tests/serve/test_secagg_service_replay_http.py."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from deltaplane.aggregation.secagg import EnrollmentAuthority, SecAggAuthError, round_binding
from deltaplane.serve import DeviceClient, ServiceError
from deltaplane.serve.secagg_client import SecAggDevice
from deltaplane.serve.server import BackgroundServer
from deltaplane.serve.service_identity import BINDING_HEADER, service_session
from deltaplane.serve.tls import client_context, make_tls_bundle, server_ssl_options

from .test_secagg_auth_http import _creds, _open
from .test_secagg_version_http import _Service

AUTHORITY = EnrollmentAuthority.generate()


def test_over_tls_a_device_binds_the_key_the_service_presented(service, tmp_path) -> None:
    tls = make_tls_bundle(tmp_path / "tls", hosts=["127.0.0.1"])
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    key = hashlib.sha256(spki).hexdigest()
    names = ["d0", "d1", "d2"]
    rnd = _open(service, names)
    tokens = {d: service.admin.issue_token(d, "default") for d in names}
    ssl = server_ssl_options(tls.server_cert, tls.server_key)
    with BackgroundServer(service.app, ssl_options=ssl) as srv:
        expected = f"tls-spki-sha256:{key}@{srv.url}"  # the key and the address the devices were given
        ctx = client_context(tls.ca_cert)
        devices = [
            SecAggDevice(
                DeviceClient(srv.url, tokens[d], verifier=service.verifier, tls=ctx),
                "cnn",
                rnd,
                credentials=_creds(AUTHORITY, d),
            )
            for d in names
        ]
        assert {dev.service for dev in devices} == {expected}
        bound = round_binding(devices[0].config, service_session(expected, "cnn", rnd))
        assert all(dev.endpoint.client._binding == bound for dev in devices)
        for dev in devices:
            dev.advertise()
        service.admin.advance_secagg("cnn", rnd)
        for dev in devices:  # every device saw the same key: each verifies the others' advertisements
            dev.share()
    assert service.admin.secagg_status("cnn", rnd)["stage"] == "share keys"


def test_over_plain_http_a_device_binds_the_address_it_was_given(service) -> None:
    rnd = _open(service, ["d0", "d1", "d2"])
    dev = SecAggDevice(service.device("d0"), "cnn", rnd, credentials=_creds(AUTHORITY, "d0"))
    assert dev.service == "origin:http://testserver:80"


def test_a_device_that_does_not_state_the_binding_is_refused_an_authenticated_round(service) -> None:
    names = ["d0", "d1", "d2"]
    rnd = _open(service, names)
    old = service.device("d0")  # a device of a release before the binding: it sends no header
    for method, path in (("GET", ""), ("POST", "/keys")):
        with pytest.raises(ServiceError) as exc:
            old.request(
                method, f"/v1/models/cnn/secagg/{rnd}{path}", content=b"" if method == "POST" else None
            )
        assert exc.value.status == 409
        assert "binds every signature to this service's identity" in exc.value.detail
        assert (
            "does not state one (it is older: its signatures would name the model and round alone)"
            in exc.value.detail
            and "upgrade the device" in exc.value.detail
        )
    with pytest.raises(ServiceError, match="states '0'; upgrade the device"):
        old.request("GET", f"/v1/models/cnn/secagg/{rnd}", headers={BINDING_HEADER: "0"})
    with pytest.raises(
        ServiceError, match="uses service binding 2; upgrade the service to a release that uses 2"
    ):
        old.request("GET", f"/v1/models/cnn/secagg/{rnd}", headers={BINDING_HEADER: "2"})
    # an unauthenticated round signs nothing, so an older device still takes part in one
    plain = _open(service, names, authenticated=False)
    inv = old.request("GET", f"/v1/models/cnn/secagg/{plain}").json()
    assert inv["authenticated"] is False and inv["service_binding"] == 1


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda inv: inv.pop("service_binding"), "states none .it is older.*upgrade the service.*uses 1"),
        (lambda inv: inv.update(service_binding=0), "uses service binding 0; upgrade the service"),
        (lambda inv: inv.update(service_binding=True), "uses service binding True; upgrade the service"),
        (lambda inv: inv.update(service_binding=2), "uses service binding 2; upgrade this device.*uses 2"),
    ],
)
def test_a_device_refuses_an_authenticated_round_of_a_service_without_its_binding(
    service, change, says
) -> None:
    rnd = _open(service, ["d0", "d1", "d2"])
    conn = _Service(service.device("d0"), change)
    with pytest.raises(SecAggAuthError, match=says):
        SecAggDevice(conn, "cnn", rnd, credentials=_creds(AUTHORITY, "d0"))
    assert conn.calls == [("GET", f"/v1/models/cnn/secagg/{rnd}")]  # only the invitation: nothing sent
