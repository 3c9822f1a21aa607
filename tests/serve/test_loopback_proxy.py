"""Plain HTTP to a loopback service never goes through a proxy from the environment.

The ``fleet`` commands accept a plain ``http://`` service address only on loopback, and an authenticated SecAgg
round takes plain HTTP without ``allow_plain_http`` only there, because loopback never leaves the host. But httpx
reads ``HTTP_PROXY``/``ALL_PROXY`` from the environment by default: with ``HTTP_PROXY=http://proxy.example:3128``
set, a request to ``http://127.0.0.1:8000`` went to that proxy, bearer token included, in clear, while the
command believed it talked to this machine. Now every client deltaplane builds for a plain-HTTP loopback
address ignores the environment's proxies (:func:`deltaplane.serve.client.direct_if_loopback`); ``https://``
services and plain-HTTP services on other hosts keep them, as before.
"""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from deltaplane.cli import app as cli
from deltaplane.serve import AdminClient, DeviceClient
from deltaplane.serve.client import _http_client
from deltaplane.serve.server import BackgroundServer

from .conftest import ADMIN, Service
from .test_service_key_pin import _LoopbackForwardProxy

_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def _proxy_env(monkeypatch, proxy: str) -> None:
    """``proxy`` as every proxy variable httpx reads (both spellings), and no NO_PROXY exemption."""
    for name in _PROXY_VARIABLES:
        for spelling in (name, name.lower()):
            monkeypatch.delenv(spelling, raising=False)
    for name in _PROXY_VARIABLES[:3]:
        monkeypatch.setenv(name, proxy)


def _proxied(client: httpx.Client, url: str) -> bool:
    """Whether ``client`` sends a request for ``url`` through a proxy: httpx's own choice of transport (a
    proxy mount from the environment, or the client's direct transport)."""
    return client._transport_for_url(httpx.URL(url)) is not client._transport


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://127.0.0.2:8000", "http://localhost:8000", "http://[::1]:8000"],
)
def test_a_plain_http_loopback_service_is_reached_directly_whatever_the_environment_proxies(
    monkeypatch, url
) -> None:
    _proxy_env(monkeypatch, "http://proxy.example:3128")
    with httpx.Client() as stock:
        assert _proxied(stock, url)  # what httpx does for any client that trusts the environment
    with _http_client(url, 5, None) as http:
        assert not _proxied(http, url + "/v1/models/cnn")


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:8443",  # TLS end to end through the proxy (CONNECT): the CA and the key pin hold
        "https://fl.example",
        "http://fl.example:8080",  # off the host anyway: fleet commands refuse it, an https:// proxy may guard it
        "http://localhost.example:8000",  # a name that is not localhost, whatever it resolves to
    ],
)
def test_other_services_keep_the_environments_proxy(monkeypatch, url) -> None:
    _proxy_env(monkeypatch, "http://proxy.example:3128")
    with _http_client(url, 5, None) as http:
        assert _proxied(http, url)


def test_device_and_admin_tokens_for_a_loopback_service_do_not_reach_a_proxy(tmp_path, monkeypatch) -> None:
    """A real forward proxy from the environment: before, it read both tokens (and answered for the service)."""
    service = Service(tmp_path / "home")
    with BackgroundServer(service.app) as server, _LoopbackForwardProxy(server.url) as proxy:
        _proxy_env(monkeypatch, proxy.url)
        admin = AdminClient(server.url, ADMIN)
        token = admin.issue_token("d0")
        device = DeviceClient(server.url, token, verifier=service.verifier)
        assert device.fetch("cnn")[0] == 1
        device.close()
        admin.close()
    assert proxy.authorizations == [], proxy.authorizations


def test_fleet_enroll_to_a_loopback_service_gives_no_proxy_the_admin_token(tmp_path) -> None:
    service = Service(tmp_path / "home")
    out = tmp_path / "tokens"
    with BackgroundServer(service.app) as server, _LoopbackForwardProxy(server.url) as proxy:
        env = {
            "DELTAPLANE_ADMIN_TOKEN": ADMIN,
            "HTTP_PROXY": proxy.url,
            "ALL_PROXY": proxy.url,
            "NO_PROXY": "",
        }
        env |= {"http_proxy": None, "all_proxy": None, "no_proxy": None}
        args = ["fleet", "enroll", "--url", server.url, "--out", str(out), "--devices", "1"]
        r = CliRunner().invoke(cli, args, terminal_width=300, env=env)
    assert r.exit_code == 0, r.output
    assert [p.name for p in out.glob("*.token")] == ["device-0.token"]
    assert proxy.authorizations == [], proxy.authorizations


@pytest.mark.parametrize("host", ["fl.example", "localhost.example", "10.0.0.8", "[fe80::1]"])
def test_fleet_commands_still_refuse_plain_http_off_loopback_before_any_work(tmp_path, host) -> None:
    out = tmp_path / "tokens"
    args = ["fleet", "enroll", "--url", f"http://{host}:8000", "--out", str(out), "--devices", "1"]
    r = CliRunner().invoke(cli, args, terminal_width=300, env={"DELTAPLANE_ADMIN_TOKEN": ADMIN})
    assert r.exit_code == 2 and "refusing plain HTTP to" in r.output and not out.exists(), r.output
