"""TLS (server, CA-pinned client, mutual TLS), token expiry and revocation, tokens surviving a restart."""

import base64
import hashlib
import hmac
import json
import os
import stat
import time

import httpx
import pytest

from deltaplane.registry import init_keys
from deltaplane.serve import BackgroundServer, DeviceClient, TokenAuthority, create_app
from deltaplane.serve import auth as auth_module
from deltaplane.serve.tls import client_context, make_tls_bundle, server_ssl_options

from .conftest import ADMIN, Service


def test_expired_token_is_refused(monkeypatch):
    authority = TokenAuthority(b"k" * 32, audience="svc-test", ttl_s=60)
    token = authority.issue("d1", "eu")
    assert authority.check(token).device_id == "d1"
    now = auth_module.time.time()
    monkeypatch.setattr(auth_module.time, "time", lambda: now + 61)
    assert authority.check(token) is None
    # the expiry is under the MAC: editing it breaks the token
    body, mac = token.split(".")
    doc = auth_module.json.loads(auth_module._unb64(body))
    doc["e"] += 10**6
    forged = auth_module._b64(auth_module.json.dumps(doc, separators=(",", ":")).encode()) + "." + mac
    assert authority.check(forged) is None


def test_a_device_revocation_covers_a_token_issued_a_fraction_of_a_millisecond_before(monkeypatch):
    """revoke_device refuses every token issued up to the revocation time; the issue time used to be rounded
    to the millisecond, so a token issued at x.0006 s carried x.001 and escaped a revocation at x.0008 s."""
    authority = TokenAuthority(b"k" * 32, audience="svc-test", ttl_s=3600)
    issued = float(int(auth_module.time.time())) + 0.0006
    monkeypatch.setattr(auth_module.time, "time", lambda: issued)
    token = authority.issue("d1", "eu")
    monkeypatch.setattr(auth_module.time, "time", lambda: issued + 0.0002)
    authority.revoke_device("d1")
    assert authority.check(token) is None
    monkeypatch.setattr(auth_module.time, "time", lambda: issued + 0.0004)
    assert authority.check(authority.issue("d1", "eu")).device_id == "d1"  # a later token works


def test_revocation_is_enforced_and_survives_a_restart(tmp_path):
    svc = Service(tmp_path / "h")
    info = svc.admin.issue_token_info("d1", "eu")
    other = svc.admin.issue_token("d2", "eu")
    headers = {"Authorization": f"Bearer {info['token']}"}
    assert svc.http.get("/v1/models/cnn/download", headers=headers).status_code == 200
    svc.admin.revoke_token(info["token_id"])
    assert svc.http.get("/v1/models/cnn/download", headers=headers).status_code == 401
    d2 = {"Authorization": f"Bearer {other}"}
    svc.admin.revoke_device("d2")
    assert svc.http.get("/v1/models/cnn/download", headers=d2).status_code == 401
    fresh = svc.admin.issue_token("d2", "eu")  # a token issued after the device revocation works
    # restart: a new app over the same home keeps the revocations (and the device secret)
    from fastapi.testclient import TestClient

    again = TestClient(create_app(svc.config))
    assert again.get("/v1/models/cnn/download", headers=headers).status_code == 401
    assert again.get("/v1/models/cnn/download", headers=d2).status_code == 401
    assert (
        again.get("/v1/models/cnn/download", headers={"Authorization": f"Bearer {fresh}"}).status_code == 200
    )


def test_a_revocation_outlives_a_lowered_max_token_ttl(tmp_path, monkeypatch):
    """A revoked token stays refused after restarts for as long as the token itself is valid, even when the
    service that revoked it capped token lifetimes below that token's (the operator lowered
    --max-token-ttl after issuing it): the revocation list used to drop the id after max_token_ttl_s."""
    from fastapi.testclient import TestClient

    svc = Service(tmp_path / "h")  # issues 30-day tokens
    info = svc.admin.issue_token_info("d1", "eu")
    headers = {"Authorization": f"Bearer {info['token']}"}
    lowered = svc.config.__class__(
        home=svc.config.home, admin_token=ADMIN, device_secret="s" * 32, max_token_ttl_s=86400
    )
    first = TestClient(create_app(lowered))
    revoked = first.post(
        "/admin/tokens/revoke",
        json={"token_id": info["token_id"]},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert revoked.status_code == 200
    assert first.get("/v1/models/cnn/round", headers=headers).status_code == 401
    now = auth_module.time.time()
    monkeypatch.setattr(auth_module.time, "time", lambda: now + 2 * 86400)  # the token has 28 days left
    restarted = TestClient(create_app(lowered))
    assert restarted.get("/v1/models/cnn/round", headers=headers).status_code == 401


def test_tokens_survive_a_restart_without_a_configured_secret(tmp_path):
    from fastapi.testclient import TestClient

    svc = Service(tmp_path / "h")
    config = svc.config.__class__(home=svc.config.home, admin_token=ADMIN)  # no device_secret
    first = TestClient(create_app(config))
    token = first.post(
        "/admin/devices", json={"device_id": "d1"}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    token = token.json()["token"]
    secret = tmp_path / "h" / "keys" / "device-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    second = TestClient(create_app(config))
    assert second.get("/v1/models/cnn/round", headers={"Authorization": f"Bearer {token}"}).status_code == 404


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_token_works_only_at_the_service_that_issued_it(tmp_path):
    """Two services given the same device secret (two federations, one $DELTAPLANE_DEVICE_SECRET) used to
    accept each other's tokens, even one revoked at its issuer (revocations are kept per registry): a token
    now names its service, and another service refuses it with 401 saying what to do. The issuer keeps
    accepting it across a restart (the audience is stable)."""
    from fastapi.testclient import TestClient

    a, b = Service(tmp_path / "a"), Service(tmp_path / "b")  # both device_secret="s" * 32
    info = a.admin.issue_token_info("dev1")
    assert a.http.get("/v1/models/cnn/download", headers=_bearer(info["token"])).status_code == 200
    restarted = TestClient(create_app(a.config))
    assert restarted.get("/v1/models/cnn/download", headers=_bearer(info["token"])).status_code == 200
    at_b = b.http.get("/v1/models/cnn/download", headers=_bearer(info["token"]))
    assert at_b.status_code == 401
    assert "another deltaplane service" in at_b.json()["detail"]
    assert "POST /admin/devices" in at_b.json()["detail"]
    a.admin.revoke_token(info["token_id"])
    assert a.http.get("/v1/models/cnn/download", headers=_bearer(info["token"])).status_code == 401
    assert b.http.get("/v1/models/cnn/download", headers=_bearer(info["token"])).status_code == 401
    # and B's own tokens still work at B, not at A
    own = b.admin.issue_token("dev1")
    assert b.http.get("/v1/models/cnn/download", headers=_bearer(own)).status_code == 200
    assert a.http.get("/v1/models/cnn/download", headers=_bearer(own)).status_code == 401


def test_a_token_issued_before_audiences_is_refused_with_a_re_enroll_message(tmp_path):
    """A token of the first format (no audience, no version), MAC'd with the service's own secret as the
    service used to issue them, gets a 401 asking to re-enroll, not a 500 and not a pass."""
    svc = Service(tmp_path / "h")
    now = time.time()
    doc = {"d": "dev1", "c": "default", "j": "old-token-id", "i": now, "e": now + 3600}
    body = base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).rstrip(b"=").decode()
    mac = hmac.new(b"s" * 32, body.encode(), hashlib.sha256).digest()
    token = body + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    for method, path in (("GET", "/v1/models/cnn/download"), ("POST", "/v1/models/cnn/report")):
        reply = svc.http.request(method, path, headers=_bearer(token), json={})
        assert reply.status_code == 401, (path, reply.text)
        assert "re-enroll" in reply.json()["detail"]


def test_private_keys_are_never_world_readable(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((str(dst), stat.S_IMODE(os.stat(src).st_mode)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    init_keys(tmp_path)
    make_tls_bundle(tmp_path / "tls", hosts=["127.0.0.1"], devices=["d1"])
    private = [
        (p, m) for p, m in seen if (p.endswith((".pem", ".key")) and "ed25519.pem" in p) or p.endswith(".key")
    ]
    assert private and all(m == 0o600 for _, m in private), private


@pytest.fixture
def tls(tmp_path):
    return make_tls_bundle(tmp_path / "tls", hosts=["127.0.0.1"], devices=["d1"])


def test_tls_service_with_a_pinned_ca(tmp_path, tls):
    svc = Service(tmp_path / "h")
    with BackgroundServer(
        create_app(svc.config), ssl_options=server_ssl_options(tls.server_cert, tls.server_key)
    ) as s:
        assert s.url.startswith("https://")
        token = svc.admin.issue_token("d1")
        dev = DeviceClient(s.url, token, verifier=svc.verifier, tls=client_context(tls.ca_cert))
        assert dev.fetch("cnn")[0] == 1
        # a device that trusts another CA (a man in the middle's certificate) refuses the handshake
        other = make_tls_bundle(tmp_path / "other", hosts=["127.0.0.1"])
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            DeviceClient(s.url, token, verifier=svc.verifier, tls=client_context(other.ca_cert)).fetch("cnn")
        with pytest.raises(httpx.TransportError):  # plain HTTP clients get no answer from the TLS port
            httpx.get(s.url.replace("https", "http") + "/healthz", timeout=5).raise_for_status()


def test_mutual_tls_requires_a_device_certificate(tmp_path, tls):
    svc = Service(tmp_path / "h")
    opts = server_ssl_options(tls.server_cert, tls.server_key, tls.ca_cert)
    with BackgroundServer(create_app(svc.config), ssl_options=opts) as s:
        token = svc.admin.issue_token("d1")
        cert, key = tls.devices["d1"]
        dev = DeviceClient(
            s.url, token, verifier=svc.verifier, tls=client_context(tls.ca_cert, cert=cert, key=key)
        )
        assert dev.fetch("cnn")[0] == 1
        anonymous = DeviceClient(s.url, token, verifier=svc.verifier, tls=client_context(tls.ca_cert))
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            anonymous.fetch("cnn")


def test_slow_request_headers_are_cut_off(tmp_path):
    import socket
    import time

    svc = Service(tmp_path / "h")
    with BackgroundServer(create_app(svc.config), header_timeout=1.0) as s:
        host, port = s.url.split("//")[1].split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0, closed = time.monotonic(), False
        while time.monotonic() - t0 < 6:
            try:
                sock.sendall(b"X")  # one header byte at a time: resets uvicorn's idle timer, not ours
                time.sleep(0.2)
            except OSError:
                closed = True
                break
            sock.settimeout(0.01)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            sock.settimeout(10)
        assert closed and time.monotonic() - t0 < 3
        # a normal client is unaffected
        assert httpx.get(s.url + "/healthz").status_code == 200


def test_serve_refuses_plain_http_off_loopback(tmp_path):
    from typer.testing import CliRunner

    from deltaplane.cli import app

    r = CliRunner().invoke(
        app, ["serve", "--home", str(tmp_path), "--host", "0.0.0.0", "--admin-token", ADMIN]
    )
    assert r.exit_code == 2 and "--tls-cert" in r.output
    r = CliRunner().invoke(
        app, ["serve", "--home", str(tmp_path), "--tls-cert", "x.pem", "--admin-token", ADMIN]
    )
    assert r.exit_code == 2 and "go together" in r.output


def test_an_http_url_to_the_tls_service_is_told_to_use_https_at_once(tmp_path, tls):
    # the obvious slip of fleet.md's `--url http://127.0.0.1:8443`: the TLS port closes the plain request
    # unanswered (RemoteProtocolError), which read as an outage: the device waited out --patience (300 s) in
    # silence and the coordinator said "the service is not answering" for as long
    from deltaplane.engine import RunConfig
    from deltaplane.errors import ServiceUnreachable
    from deltaplane.serve import AdminClient
    from deltaplane.serve.fleet import Device, Patient, run_device

    svc = Service(tmp_path / "h")
    with BackgroundServer(
        create_app(svc.config), ssl_options=server_ssl_options(tls.server_cert, tls.server_key)
    ) as s:
        plain = s.url.replace("https://", "http://")
        said: list[str] = []
        patient = Patient(AdminClient(plain, ADMIN), patience=300, say=said.append)
        started = time.monotonic()
        with pytest.raises(ServiceUnreachable, match="speaks HTTPS") as info:
            patient.call(patient.admin.stats, "read the stats")
        assert f"use --url {s.url} with --ca" in str(info.value) and info.value.final
        assert said == [] and time.monotonic() - started < 30
        conn = DeviceClient(plain, svc.admin.issue_token("d1"), verifier=svc.verifier)
        dev = Device(conn, "cnn", RunConfig(), None, None, None, None)
        started = time.monotonic()
        with pytest.raises(ServiceUnreachable, match="speaks HTTPS"):
            run_device(dev, rounds=1, patience=300)
        assert time.monotonic() - started < 30


def test_a_plain_service_that_drops_a_request_or_is_down_is_still_an_outage_to_wait_for(tmp_path):
    # the TLS probe must not make a final error of a plain-HTTP service that restarts (it dropped the request:
    # RemoteProtocolError) or is down (its port refuses the probe)
    import socket

    from deltaplane.serve.fleet import unreachable

    dropped = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    with BackgroundServer(create_app(Service(tmp_path / "h").config)) as s:
        assert s.url.startswith("http://")
        err = unreachable(dropped, s.url)
        assert not err.final and "cannot reach the service" in str(err)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = unreachable(dropped, f"http://127.0.0.1:{port}")
    assert not err.final and "cannot reach the service" in str(err)


def test_a_ca_file_that_is_not_a_certificate_is_a_config_error_naming_it(tls):
    # was ssl.SSLError "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found", naming no file
    from deltaplane.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"CA file {tls.server_key} is not a PEM CA certificate.*ca\.pem"):
        client_context(tls.server_key)
    cert, _ = tls.devices["d1"]
    with pytest.raises(ConfigError, match=rf"device certificate {cert} and key {tls.ca_cert} are not"):
        client_context(tls.ca_cert, cert=cert, key=tls.ca_cert)


def test_the_fleet_commands_speak_mutual_tls_and_say_when_a_certificate_is_missing(
    tmp_path, tls, monkeypatch
):
    # security.md's `serve --tls-client-ca`: `deltaplane fleet` had no way to present a client certificate, and
    # the service's silent close read as an outage: the coordinator waited out --patience (300 s)
    from typer.testing import CliRunner

    from deltaplane.cli import app
    from deltaplane.errors import ServiceUnreachable
    from deltaplane.serve import AdminClient
    from deltaplane.serve.fleet import Patient

    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    svc = Service(tmp_path / "h")
    cert, key = tls.devices["d1"]
    opts = server_ssl_options(tls.server_cert, tls.server_key, tls.ca_cert)
    with BackgroundServer(create_app(svc.config), ssl_options=opts) as s:
        patient = Patient(AdminClient(s.url, ADMIN, tls=client_context(tls.ca_cert)), patience=300, say=print)
        started = time.monotonic()
        with pytest.raises(
            ServiceUnreachable, match="requires a client certificate.*--tls-cert and --tls-key"
        ):
            patient.call(patient.admin.stats, "read the stats")
        assert time.monotonic() - started < 30
        enroll = ["fleet", "enroll", "--url", s.url, "--ca", str(tls.ca_cert), "--devices", "1"]
        done = CliRunner().invoke(app, [*enroll, "--out", str(tmp_path / "t1")])
        assert done.exit_code == 1 and "requires a client certificate" in done.output
        done = CliRunner().invoke(app, [*enroll, "--out", str(tmp_path / "t2"), "--tls-cert", str(cert)])
        assert done.exit_code == 2 and "--tls-cert and --tls-key go together" in done.output
        mutual = ["--tls-cert", str(cert), "--tls-key", str(key)]
        done = CliRunner().invoke(app, [*enroll, "--out", str(tmp_path / "t3"), *mutual])
        assert done.exit_code == 0, done.output
        assert (tmp_path / "t3" / "device-0.token").read_text().strip()
    # a plain service that is up answers the probe: its dropped request stays an outage to wait for
    from deltaplane.serve.fleet import unreachable

    with BackgroundServer(
        create_app(svc.config), ssl_options=server_ssl_options(tls.server_cert, tls.server_key)
    ) as s:
        err = unreachable(httpx.RemoteProtocolError("Server disconnected without sending a response."), s.url)
        assert not err.final and "cannot reach the service" in str(err)
