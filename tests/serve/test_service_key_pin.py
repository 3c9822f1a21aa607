"""Pinning the service's TLS key (``fleet device --service-spki``, ``DeviceClient(service_spki=)``,
``run_secagg_fleet(service_spki=)``), against real TLS services.

Before, a device bound whatever key it saw through the CA it trusts: a man in the middle holding a valid
certificate of that CA for the service's address (another server key, issued by the same CA) was taken as the
service, and the device's token went to it. With a pin, the device refuses any other key during the handshake
(:class:`~deltaplane.errors.ServiceKeyMismatch`), before a byte of the request is sent.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from deltaplane.aggregation.secagg import SecAggAuthError
from deltaplane.cli import app as cli
from deltaplane.delta import Delta
from deltaplane.errors import ConfigError, ServiceKeyMismatch
from deltaplane.serve import DeviceClient
from deltaplane.serve.secagg_client import SecAggDevice
from deltaplane.serve.secagg_fleet import run_secagg_fleet
from deltaplane.serve.server import BackgroundServer
from deltaplane.serve.tls import client_context, make_tls_bundle, server_ssl_options, spki_pin

from .conftest import ADMIN, Service, cnn_state
from .test_secagg_auth_http import _creds, _open
from .test_service_identity import AUTHORITY


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """One CA; the service's key (``real``) and another it issued for the same address (``mitm``): both
    certificates are valid for 127.0.0.1 under that CA."""
    folder = tmp_path_factory.mktemp("tls")
    first = make_tls_bundle(folder, hosts=["127.0.0.1"])
    real = SimpleNamespace(
        cert=shutil.copy(first.server_cert, folder / "real.pem"),
        key=shutil.copy(first.server_key, folder / "real.key"),
        pin=first.service_spki,
    )
    second = make_tls_bundle(folder, hosts=["127.0.0.1"])  # the same CA: a new server key
    mitm = SimpleNamespace(cert=second.server_cert, key=second.server_key, pin=second.service_spki)
    assert real.pin != mitm.pin and real.pin == spki_pin(real.cert.read_bytes())
    return SimpleNamespace(ca=first.ca_cert, real=real, mitm=mitm)


def _served(tmp_path, who):
    """A real service over TLS with ``who``'s certificate, the requests it receives recorded (path, method)."""
    service = Service(tmp_path / "home")
    seen: list[tuple[str, str]] = []
    inner = service.app

    async def recorder(scope, receive, send):
        if scope["type"] == "http":
            seen.append((scope["method"], scope["path"]))
        return await inner(scope, receive, send)

    recorder.state = inner.state  # type: ignore[attr-defined]
    server = BackgroundServer(recorder, ssl_options=server_ssl_options(who.cert, who.key))  # type: ignore[arg-type]
    return service, server, seen


def test_a_pinned_device_refuses_a_service_with_another_key_of_the_same_ca_and_sends_nothing(
    tmp_path, keys
) -> None:
    service, server, seen = _served(tmp_path, keys.mitm)
    token = service.admin.issue_token("d0", "default")
    with server:
        # the CA vouches for the man in the middle: an unpinned device takes it as the service
        plain = DeviceClient(server.url, token, verifier=service.verifier, tls=client_context(keys.ca))
        assert plain.open_rounds("cnn") == []
        plain.close()
        assert seen == [("GET", "/v1/models/cnn/rounds/open")]
        seen.clear()
        pinned = DeviceClient(
            server.url,
            token,
            verifier=service.verifier,
            tls=client_context(keys.ca),
            service_spki=keys.real.pin,
        )
        with pytest.raises(ServiceKeyMismatch) as exc:
            pinned.open_rounds("cnn")
        pinned.close()
    assert seen == []  # refused at the handshake: not even the request line (and its token) was sent
    assert f"presented the TLS key {keys.mitm.pin}, not the pinned {keys.real.pin}" in str(exc.value)
    assert "nothing was sent" in str(exc.value)
    # it names the URL the device was given, as fleet.md and security.md quote it (it used to name the bare
    # host, "the service at 127.0.0.1", which says neither the port nor the scheme)
    assert str(exc.value).startswith(f"the service at {server.url} presented the TLS key "), str(exc.value)


def test_a_pinned_device_takes_part_in_an_authenticated_round_of_the_service_with_its_key(
    tmp_path, keys
) -> None:
    service, server, _ = _served(tmp_path, keys.real)
    rnd = _open(service, ["d0", "d1", "d2"])
    token = service.admin.issue_token("d0", "default")
    with server:
        conn = DeviceClient(
            server.url,
            token,
            verifier=service.verifier,
            tls=client_context(keys.ca),
            service_spki=keys.real.pin.upper().replace("SHA256", "sha256"),  # hex in either case
        )
        dev = SecAggDevice(conn, "cnn", rnd, credentials=_creds(AUTHORITY, "d0"))
        conn.close()
    # the identity its signatures name carries the pinned key
    assert dev.service == f"tls-spki-sha256:{keys.real.pin.removeprefix('sha256:')}@{server.url}"


def test_a_pin_is_checked_on_every_answer_of_a_connection_the_client_did_not_make(service) -> None:
    """With ``client=`` (connections DeviceClient does not make) the key of each answer is checked instead:
    Starlette's test client presents none, so even the first answer is refused."""
    from fastapi.testclient import TestClient

    http = TestClient(service.app, base_url="https://testserver")
    token = service.admin.issue_token("d0", "default")
    conn = DeviceClient("https://testserver", token, verifier=service.verifier, client=http, service_spki=PIN)
    with pytest.raises(ServiceKeyMismatch, match="presented no TLS certificate"):
        conn.open_rounds("cnn")


def test_a_pin_checked_after_the_request_does_not_claim_nothing_was_sent(tmp_path, keys) -> None:
    """Before, a pinned DeviceClient over an unpinned ``client=`` refused the man in the middle's answer saying
    "nothing was sent", after the request and its token went to it. Now it says the token went out."""
    import httpx

    service, server, seen = _served(tmp_path, keys.mitm)
    token = service.admin.issue_token("d0", "default")
    with server, httpx.Client(base_url=server.url, verify=client_context(keys.ca)) as http:
        conn = DeviceClient(
            server.url, token, verifier=service.verifier, client=http, service_spki=keys.real.pin
        )
        with pytest.raises(ServiceKeyMismatch) as exc:
            conn.open_rounds("cnn")
    assert seen == [("GET", "/v1/models/cnn/rounds/open")]  # the request reached the other server
    assert "nothing was sent" not in str(exc.value)
    assert "its token included, was sent" in str(exc.value)


PIN = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("url", "pin", "message"),
    [
        ("http://127.0.0.1:9", PIN, "plain HTTP presents no key to pin"),
        ("https://127.0.0.1:9", "ab" * 32, "'sha256:' and 64 hex digits"),
        ("https://127.0.0.1:9", "sha256:" + "ab" * 31, "'sha256:' and 64 hex digits"),
        ("https://127.0.0.1:9", "sha1:" + "ab" * 32, "'sha256:' and 64 hex digits"),
    ],
)
def test_a_pin_that_cannot_hold_is_refused_before_any_connection(url, pin, message) -> None:
    with pytest.raises(ConfigError, match=message):
        DeviceClient(url, "t", verifier=None, service_spki=pin)  # type: ignore[arg-type]


def test_run_secagg_fleet_refuses_a_service_with_another_key_before_anything_is_sent(tmp_path, keys) -> None:
    service, server, seen = _served(tmp_path, keys.mitm)
    zero = Delta({k: torch.zeros_like(v) for k, v in cnn_state().items()})
    with server, pytest.raises(ServiceKeyMismatch):
        run_secagg_fleet(
            server.url, ADMIN, "cnn", [zero] * 3, [1] * 3, verifier=service.verifier,
            tls=client_context(keys.ca), service_spki=keys.real.pin, authenticated=True,
        )  # fmt: skip
    assert seen == []


def test_fleet_device_service_spki_refuses_another_key_and_keys_tls_prints_the_pin(
    tmp_path, keys, monkeypatch
) -> None:
    """The option reaches the device's connection: its first request (here load_device's) is refused."""
    from deltaplane.registry import signing
    from deltaplane.serve import fleet as fleet_module

    out = CliRunner().invoke(cli, ["keys", "tls", "--out", str(tmp_path / "tls"), "--host", "127.0.0.1"])
    assert out.exit_code == 0, out.output
    pin = spki_pin((tmp_path / "tls" / "server.pem").read_bytes())
    assert f"server key pin {pin} (fleet device --service-spki)" in out.output
    service, server, seen = _served(tmp_path, keys.mitm)
    monkeypatch.setattr(signing, "load_trusted_keys", lambda path: service.verifier)
    trained: list[int] = []
    monkeypatch.setattr(
        fleet_module, "load_device", lambda conn, run, device, *, model: conn.open_rounds(model) or trained
    )
    monkeypatch.setattr(fleet_module, "run_device", lambda dev, **kw: trained.append(1) or [])
    fed, token = tmp_path / "fed.yaml", tmp_path / "device-0.token"
    fed.write_text("clients: 3\nrounds: 1\n")
    token.write_text(service.admin.issue_token("d0", "default"))
    with server:
        args = [
            "fleet",
            "device",
            "--url",
            server.url,
            "--ca",
            keys.ca,
            "--token-file",
            token,
            "--trusted",
            token,
        ]
        args += ["--federation", fed, "--model", "cnn", "--device", 0, "--service-spki", keys.real.pin]
        r = CliRunner().invoke(cli, [str(a) for a in args], terminal_width=300)
    assert r.exit_code == 1 and "not the pinned" in r.output and keys.mitm.pin in r.output, (
        r.output,
        r.exception,
    )
    assert seen == [] and trained == []


def _outward_address() -> str | None:
    """An address of this machine that is not loopback (None: it has none; the test then cannot run)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outward interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_an_authenticated_round_over_plain_http_off_loopback_is_refused_unless_allowed(tmp_path) -> None:
    """Before, a device took an authenticated round from http://<any address>, where nothing authenticates the
    service (the binding names only the address). Now it refuses before training, naming why and the way out;
    ``allow_plain_http`` takes it (the binding is the address), and loopback (covered by the suite) is taken."""
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no address other than loopback")
    service = Service(tmp_path / "home")
    rnd = _open(service, ["d0", "d1", "d2"])
    with BackgroundServer(service.app, host="0.0.0.0") as server:
        url = server.url.replace("0.0.0.0", address)
        conn = DeviceClient(url, service.admin.issue_token("d0", "default"), verifier=service.verifier)
        with pytest.raises(
            SecAggAuthError, match=f"reached over plain HTTP \\(at {address}, not loopback\\)"
        ):
            SecAggDevice(conn, "cnn", rnd, credentials=_creds(AUTHORITY, "d0"))
        taken = SecAggDevice(conn, "cnn", rnd, credentials=_creds(AUTHORITY, "d0"), allow_plain_http=True)
        conn.close()
    assert taken.service == f"origin:{url}"
    assert service.admin.secagg_status("cnn", rnd)["stage"] == "advertise keys"  # nothing was sent


def _handshake(client_ctx, server_ctx) -> None:
    """A TLS handshake over memory BIOs (as TLS through an ``https://`` proxy, or asyncio, runs it)."""
    import ssl

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, (end, out, peer_in) in enumerate(((client, c_out, s_in), (server, s_out, c_in))):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            return
    raise AssertionError("the handshake did not complete")


def test_the_pin_holds_for_tls_over_memory_bios_too(keys) -> None:
    import ssl

    from deltaplane.serve.tls import pin_service_key

    for who, refused in ((keys.mitm, True), (keys.real, False)):
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(who.cert, who.key)
        client_ctx = pin_service_key(client_context(keys.ca), keys.real.pin)
        if refused:
            with pytest.raises(ServiceKeyMismatch, match="not the pinned"):
                _handshake(client_ctx, server_ctx)
        else:
            _handshake(client_ctx, server_ctx)


class _LoopbackForwardProxy:
    """A plain-HTTP forward proxy on loopback (what ``HTTP_PROXY=http://127.0.0.1:3128`` names: cntlm, a corporate
    agent): it takes absolute-form requests (``GET http://fl.example/...``) and sends them on. Here every request
    goes to ``upstream`` (the test's service), standing in for the host the URL names, off this machine."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        self.forwarded: list[str] = []
        self.authorizations: list[
            str | None
        ] = []  # each request's Authorization header, as the proxy read it
        forwarded, authorizations = self.forwarded, self.authorizations

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                forwarded.append(self.path)
                authorizations.append(self.headers.get("Authorization"))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                up = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                url = urlsplit(self.path)
                up.request(
                    self.command, url.path + (f"?{url.query}" if url.query else ""), body, dict(self.headers)
                )
                resp = up.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                up.close()

            do_GET = do_POST = _forward

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> _LoopbackForwardProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_plain_http_round_through_a_loopback_proxy_to_another_host_is_refused(
    tmp_path, monkeypatch
) -> None:
    """Before, the refusal looked only at the address the connection reached: through a forward proxy on
    loopback (``HTTP_PROXY``, which httpx reads) that is 127.0.0.1, so an authenticated round from
    http://fl.example was taken, although the proxy carries it off this machine in clear. Now the address the
    device was given must be loopback too; refused before training (the round is still waiting for keys)."""
    service = Service(tmp_path / "home")
    rnd = _open(service, ["d0", "d1", "d2"])
    with BackgroundServer(service.app) as server, _LoopbackForwardProxy(server.url) as proxy:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        conn = DeviceClient(
            "http://fl.example:8080", service.admin.issue_token("d0", "default"), verifier=service.verifier
        )
        with pytest.raises(SecAggAuthError, match="reached over plain HTTP"):
            SecAggDevice(conn, "cnn", rnd, credentials=_creds(AUTHORITY, "d0"))
        assert proxy.forwarded, "the request did not go through the proxy"
        taken = SecAggDevice(conn, "cnn", rnd, credentials=_creds(AUTHORITY, "d0"), allow_plain_http=True)
        conn.close()
    assert taken.service == "origin:http://fl.example:8080"
    assert service.admin.secagg_status("cnn", rnd)["stage"] == "advertise keys"
