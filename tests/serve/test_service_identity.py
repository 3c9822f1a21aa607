"""What identity a device works out for the service it reached (:mod:`deltaplane.serve.service_identity`), in the
cases where the connection's TLS is not the service's, or the service's TLS key is not the service's alone:

* a plain-HTTP service reached through an ``https://`` forward proxy (``HTTP_PROXY=https://...``, which httpx
  reads from the environment): the TLS on the connection is the proxy's, so binding its key would give every
  plain-HTTP service behind that proxy one identity;
* an ``https://`` service whose answer carries no certificate (a transport that exposes no socket): binding the
  address instead would silently drop to the weaker plain-HTTP binding;
* two services behind one TLS key (one wildcard certificate, one terminating ingress for both, as one
  organisation whose services share an enrollment authority often runs them): the key alone gave both one
  identity, so the operator of one could replay there the other's devices' signed advertisements.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.routing import Mount

from deltaplane.aggregation.secagg import EnrollmentAuthority, SecAggAuthError
from deltaplane.serve import DeviceClient
from deltaplane.serve.secagg_client import SecAggDevice
from deltaplane.serve.server import BackgroundServer
from deltaplane.serve.service_identity import service_identity
from deltaplane.serve.tls import client_context, make_tls_bundle, server_ssl_options

from .conftest import Service
from .test_secagg_auth_http import _creds, _open

AUTHORITY = EnrollmentAuthority.generate()


def _spki_sha256(pem: bytes) -> str:
    key = x509.load_pem_x509_certificate(pem).public_key()
    return hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


class _Tls:
    """The TLS object of a connection whose peer presented ``der``."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


class _Stream:
    """A network stream whose ``ssl_object`` is a TLS connection to a peer that presented ``der``."""

    def __init__(self, der: bytes) -> None:
        self.tls = _Tls(der)

    def get_extra_info(self, info: str) -> object:
        return self.tls if info == "ssl_object" else None


def _answer(url: str, der: bytes | None) -> httpx.Response:
    extensions = {"network_stream": _Stream(der)} if der is not None else {}
    return httpx.Response(200, request=httpx.Request("GET", url), extensions=extensions)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[bytes, str]:
    """A server certificate (DER) and the SHA-256 of its key."""
    tls = make_tls_bundle(tmp_path_factory.mktemp("tls"), hosts=["a.test", "b.test"])
    pem = tls.server_cert.read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER), _spki_sha256(pem)


def test_a_plain_http_service_through_a_tls_proxy_is_bound_by_its_address_not_the_proxys_key(
    tmp_path,
) -> None:
    """A real ``https://`` forward proxy (here a TLS server that answers every request, as a proxy relays the
    upstream's answer): the device reached ``http://svc.test``, so its binding names that address."""
    tls = make_tls_bundle(tmp_path / "proxy", hosts=["127.0.0.1"])
    body = json.dumps({"ok": True}).encode()

    class Proxy:  # answers any forwarded request
        state = SimpleNamespace()

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
                return
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"json")]}
            )
            await send({"type": "http.response.body", "body": body})

    ssl = server_ssl_options(tls.server_cert, tls.server_key)
    with BackgroundServer(Proxy(), ssl_options=ssl) as srv:  # type: ignore[arg-type]
        via = httpx.Proxy(srv.url, ssl_context=client_context(tls.ca_cert))
        with httpx.Client(base_url="http://svc.test:8000", proxy=via) as http:
            device = DeviceClient("http://svc.test:8000", "t", verifier=None, client=http)  # type: ignore[arg-type]
            answer = device.request("GET", "/v1/anything")
    assert answer.json() == {"ok": True}
    assert service_identity(answer, "/v1/anything") == "origin:http://svc.test:8000"
    assert _spki_sha256(tls.server_cert.read_bytes()) not in service_identity(answer, "/v1/anything")


def test_two_plain_http_services_behind_one_tls_proxy_are_told_apart(certificate) -> None:
    der, _ = certificate
    a, b = _answer("http://a.test/x", der), _answer("http://b.test/x", der)
    assert service_identity(a, "/x") != service_identity(b, "/x")
    assert service_identity(a, "/x") == "origin:http://a.test:80"


def test_an_https_answer_without_the_services_certificate_is_refused(certificate) -> None:
    """Not bound to the address instead: that is the plain-HTTP binding, which a TLS device did not ask for."""
    with pytest.raises(SecAggAuthError, match="https://a.test:443 carries no TLS certificate"):
        service_identity(_answer("https://a.test/x", None), "/x")


def test_a_device_reaching_an_https_service_without_its_certificate_refuses_the_round(service) -> None:
    """End to end: an ``https://`` address over a transport with no socket (Starlette's test client): the device
    refuses the authenticated round before it trains, having fetched only the invitation."""
    rnd = _open(service, ["d0", "d1", "d2"])
    token = service.admin.issue_token("d0", "default")
    http = TestClient(service.app, base_url="https://testserver")
    device = DeviceClient("https://testserver", token, verifier=service.verifier, client=http)
    with pytest.raises(SecAggAuthError, match="carries no TLS certificate"):
        SecAggDevice(device, "cnn", rnd, credentials=_creds(AUTHORITY, "d0"))
    assert service.admin.secagg_status("cnn", rnd)["stage"] == "advertise keys"  # nothing was sent


def test_two_services_behind_one_tls_key_are_told_apart(certificate) -> None:
    """One wildcard certificate (or one terminating ingress) for two services: the key and the address."""
    der, spki = certificate
    a, b = (
        service_identity(_answer("https://a.test/x", der), "/x"),
        service_identity(_answer("https://b.test/x", der), "/x"),
    )
    assert a != b
    assert a == f"tls-spki-sha256:{spki}@https://a.test:443"
    assert (
        service_identity(_answer("https://a.test:443/x", der), "/x") == a
    )  # the default port is spelled out


def _mounted(service, prefix: str) -> DeviceClient:
    """A device of ``service`` reached at ``http://fl.test<prefix>``: one host routing services by path prefix
    (one ingress, one TLS key, one address per service)."""
    front = Starlette(routes=[Mount(prefix, app=service.app)])
    http = TestClient(front, base_url=f"http://fl.test{prefix}")
    token = service.admin.issue_token("d0", "default")
    return DeviceClient(f"http://fl.test{prefix}", token, verifier=service.verifier, client=http)


def test_two_services_behind_one_host_routed_by_path_are_told_apart(tmp_path) -> None:
    """The address a device was given includes its path prefix: two services at ``/a`` and ``/b`` of one host
    (and one TLS key) had one identity, the host's."""
    a, b = Service(tmp_path / "a"), Service(tmp_path / "b")
    seen = []
    for svc, prefix in ((a, "/a"), (b, "/b")):
        rnd = _open(svc, ["d0", "d1", "d2"])
        seen.append(
            SecAggDevice(_mounted(svc, prefix), "cnn", rnd, credentials=_creds(AUTHORITY, "d0")).service
        )
    assert seen == ["origin:http://fl.test:80/a", "origin:http://fl.test:80/b"]


def test_the_path_prefix_is_spelled_one_way(certificate) -> None:
    der, spki = certificate
    for base in ("https://fl.test/a", "https://fl.test/a/", "https://fl.test:443/a"):
        http = httpx.Client(base_url=base)
        answer = httpx.Response(
            200,
            request=http.build_request("GET", "/v1/models/cnn/secagg/3"),
            extensions={"network_stream": _Stream(der)},
        )
        assert (
            service_identity(answer, "/v1/models/cnn/secagg/3")
            == f"tls-spki-sha256:{spki}@https://fl.test:443/a"
        )


def test_devices_that_saw_different_identities_refuse_each_other_and_send_nothing(service) -> None:
    """What a TLS key renewed mid-round does (docs/security.md: "the round fails, nothing is revealed"), shown
    with addresses: two devices saw one identity, the third another. Each refuses the roster at ``share``, loudly
    (SecAggAuthError naming a slot) and before it sends a share."""
    names = ["d0", "d1", "d2"]
    rnd = _open(service, names)
    renewed = TestClient(service.app, base_url="http://renewed.test")
    conns = [service.device("d0"), service.device("d1")]
    conns.append(
        DeviceClient(
            "http://renewed.test",
            service.admin.issue_token("d2", "default"),
            verifier=service.verifier,
            client=renewed,
        )
    )
    devices = [
        SecAggDevice(c, "cnn", rnd, credentials=_creds(AUTHORITY, d))
        for c, d in zip(conns, names, strict=True)
    ]
    assert len({dev.service for dev in devices}) == 2
    for dev in devices:
        dev.advertise()
    service.admin.advance_secagg("cnn", rnd)
    for dev in devices:
        sent = dev.bytes_sent
        with pytest.raises(SecAggAuthError, match="roster slot"):
            dev.share()
        assert dev.bytes_sent == sent
    assert service.admin.secagg_status("cnn", rnd)["stage"] == "share keys"


def test_a_refused_advertisement_says_what_to_check_without_claiming_why(service) -> None:
    """Before, the refusal said "(substituted keys, or a replay)": a fleet whose devices were given two
    addresses of one service read an attack. Now it names the identity the refusing device signed for, says
    that every device must be given the same address, and does not pick a cause the signature cannot show."""
    from deltaplane.aggregation.secagg import AdvertisementUnbound

    rnd = _open(service, ["d0", "d1", "d2"])
    alias = TestClient(service.app, base_url="http://alias.test:8080/")
    token = service.admin.issue_token("d2", "default")
    conns = [service.device("d0"), service.device("d1")]
    conns.append(DeviceClient("http://alias.test:8080/", token, verifier=service.verifier, client=alias))
    devices = [
        SecAggDevice(c, "cnn", rnd, credentials=_creds(AUTHORITY, f"d{i}")) for i, c in enumerate(conns)
    ]
    for dev in devices:
        dev.advertise()
    service.admin.advance_secagg("cnn", rnd)
    with pytest.raises(AdvertisementUnbound) as exc:
        devices[0].share()
    said = str(exc.value)
    assert (
        exc.value.client == 2 and "roster slot 2: the key advertisement is not signed by device 'd2'" in said
    )
    assert "This device signed for the service as it reached it, origin:http://testserver:80" in said
    assert "check that every device of the round is given the same service address" in said
    assert "the signature cannot say which" in said and "substituted keys, or a replay" not in said
