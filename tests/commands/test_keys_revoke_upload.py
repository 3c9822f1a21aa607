"""``deltaplane keys revoke --upload URL``: the list is written, then uploaded to a running service over TLS
(``POST /admin/secagg/revocations``), which answers whether it replaced its list; refusals and an unreachable
service are one-line errors with their own exit codes, and the written list stays."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from deltaplane.aggregation.secagg import EnrollmentAuthority
from deltaplane.aggregation.secagg.revocation import load_revocations
from deltaplane.registry import Registry
from deltaplane.serve import ServiceConfig, create_app
from deltaplane.serve.server import BackgroundServer
from deltaplane.serve.tls import make_tls_bundle, server_ssl_options

ADMIN = "admin-token-0123456789"


@pytest.fixture
def service(authority, tmp_path, monkeypatch):
    """A TLS service on loopback keeping its list in ``held.bin``, verified under the authority's key."""
    auth, _ = authority
    pub = tmp_path / "enrollment.ed25519.pub"
    pub.write_text(auth.public_text() + "\n")
    Registry.create(tmp_path / "home")
    tls = make_tls_bundle(tmp_path / "tls", hosts=["127.0.0.1"])
    config = ServiceConfig(
        home=str(tmp_path / "home"), admin_token=ADMIN, device_secret="s" * 32,
        secagg_revocations=str(tmp_path / "held.bin"), secagg_authority=str(pub),
    )  # fmt: skip
    server = BackgroundServer(
        create_app(config), ssl_options=server_ssl_options(tls.server_cert, tls.server_key)
    )
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    with server:
        yield server.url, tls.ca_cert, tmp_path / "held.bin"


NO_SERVICE = (
    "http://127.0.0.1:9"  # nothing listens there (the tests using it stop before a request, or fake it)
)


def _flat(output: str) -> str:
    return " ".join(output.split())


def test_revoke_uploads_the_list_it_wrote_and_prints_the_answer(cli, authority, service, tmp_path) -> None:
    url, ca, held = service
    _, key = authority
    out = tmp_path / "revoked.bin"
    r = cli(
        "keys", "revoke", "--authority-key", key, "--out", out, "--device", 3, "--upload", url, "--ca", ca
    )
    assert r.exit_code == 0, r.output
    assert f"uploaded to {url}: the service now holds list number 1 (1 device revoked, 0 keys)" in _flat(
        r.output
    )
    assert held.read_bytes() == out.read_bytes()  # the very file written
    r = cli(
        "keys", "revoke", "--authority-key", key, "--out", out, "--device", 5, "--upload", url, "--ca", ca
    )
    assert r.exit_code == 0 and "now holds list number 2 (2 devices revoked, 0 keys)" in _flat(r.output), (
        r.output
    )
    assert load_revocations(held, authority[0].trust()).sequence == 2


def test_a_refused_upload_exits_3_and_keeps_the_written_list(cli, authority, service, tmp_path) -> None:
    url, ca, held = service
    auth, key = authority
    newer, older = tmp_path / "newer.bin", tmp_path / "older.bin"
    for path, runs in ((newer, 2), (older, 1)):
        for _ in range(runs):
            assert cli("keys", "revoke", "--authority-key", key, "--out", path, "--device", 1).exit_code == 0
    r = cli("keys", "revoke", "--authority-key", key, "--out", newer, "--upload", url, "--ca", ca)
    assert r.exit_code == 0, r.output  # number 3 held
    # an older list (another OUT, number 2): 409, the service keeps its own
    r = cli("keys", "revoke", "--authority-key", key, "--out", older, "--upload", url, "--ca", ca)
    flat = _flat(r.output)
    assert r.exit_code == 3 and "HTTP 409" in flat and f"{older} is written and kept" in flat, r.output
    assert load_revocations(older, auth.trust()).sequence == 2
    assert load_revocations(held, auth.trust()).sequence == 3
    # another authority's list: 422
    other = tmp_path / "other.pem"
    other.write_bytes(EnrollmentAuthority.generate().to_pem())
    r = cli(
        "keys", "revoke", "--authority-key", other, "--out", tmp_path / "o.bin", "--upload", url, "--ca", ca
    )
    flat = _flat(r.output)
    assert r.exit_code == 3 and "HTTP 422" in flat and "o.bin is written and kept" in flat, r.output
    assert (tmp_path / "o.bin").exists() and load_revocations(held, auth.trust()).sequence == 3


def test_a_wrong_admin_token_or_no_service_is_a_clear_error_after_the_write(
    cli, authority, service, tmp_path, monkeypatch
) -> None:
    url, ca, _ = service
    _, key = authority
    out = tmp_path / "revoked.bin"
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "not-the-admin-token-at-all")
    r = cli(
        "keys", "revoke", "--authority-key", key, "--out", out, "--device", 1, "--upload", url, "--ca", ca
    )
    flat = _flat(r.output)
    assert r.exit_code == 2 and "refused the admin token (HTTP 401)" in flat and "written and kept" in flat, (
        flat
    )
    assert out.exists()
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = cli("keys", "revoke", "--authority-key", key, "--out", out, "--upload", closed)
    flat = _flat(r.output)
    assert r.exit_code == 1 and f"{out} is written and kept" in flat, flat
    assert load_revocations(out, authority[0].trust()).sequence == 2  # written before the upload failed


def test_upload_usage_errors_change_nothing(cli, authority, tmp_path, monkeypatch) -> None:
    _, key = authority
    out = tmp_path / "revoked.bin"
    monkeypatch.delenv("DELTAPLANE_ADMIN_TOKEN", raising=False)
    r = cli("keys", "revoke", "--authority-key", key, "--out", out, "--device", 1, "--upload", NO_SERVICE)
    assert r.exit_code == 2 and "DELTAPLANE_ADMIN_TOKEN" in r.output, r.output
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    r = cli("keys", "revoke", "--authority-key", key, "--out", out, "--upload", "https://127.0.0.1:9")
    assert r.exit_code == 2 and "pass --ca" in _flat(r.output), r.output
    r = cli("keys", "revoke", "--authority-key", key, "--out", out, "--ca", Path(tmp_path / "ca.pem"))
    assert r.exit_code == 2 and "for --upload URL" in _flat(r.output), r.output
    assert not out.exists()


def test_fleet_enroll_add_and_coordinate_enrolled_usage_errors(byo_task, tmp_path, monkeypatch) -> None:
    """`fleet enroll --add` grows an enrolled folder only, alone; `coordinate --enrolled` needs its tokens:
    usage errors before any request (the URL answers nothing)."""
    from typer.testing import CliRunner

    from deltaplane.cli import app

    def cli(*args: object):
        return CliRunner().invoke(app, [str(a) for a in args], terminal_width=300)

    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    (tmp_path / "empty").mkdir()
    r = cli("fleet", "enroll", "--url", "http://127.0.0.1:9", "--out", tmp_path / "empty", "--add", 1)
    assert r.exit_code == 2 and "holds no device-I.token" in " ".join(r.output.split()), r.output
    r = cli("fleet", "enroll", "--url", "http://127.0.0.1:9", "--out", tmp_path, "--add", 1, "--devices", 2)
    assert r.exit_code == 2 and "without --devices" in r.output, r.output
    (tmp_path / "fleet.yaml").write_text(f"task: {{path: '{byo_task}'}}\nclients: {{count: 3}}\nseed: 3\n")
    r = cli("fleet", "coordinate", "--url", "http://127.0.0.1:9", "--federation", tmp_path / "fleet.yaml",
            "--model", "m", "--rounds", 1, "--deadline", 1, "--enrolled", tmp_path / "empty")  # fmt: skip
    assert r.exit_code == 2 and "holds no device-I.token" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize(
    "token", ["admin-token-0123456789\r", "admin-token-0123456789\n", "admin-tökén-012345"]
)
def test_an_admin_token_no_header_can_carry_is_a_usage_error_that_never_echoes_it(
    cli, authority, tmp_path, monkeypatch, token
) -> None:
    """A token read from a file keeps its line ending (``\\r`` from a CRLF file survives ``$(cat …)``), or holds
    a non-ASCII character: it was sent anyway, and the HTTP library's refusal of the header, which quotes it
    (``Illegal header value b'Bearer admin-token…\\r'``), was printed as "cannot reach the service" (exit 1), or a
    traceback, after the list was written. It is a usage error now (exit 2), before any write, naming the
    character's position and never the token."""
    _, key = authority
    out = tmp_path / "revoked.bin"
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", token)
    with socket.socket() as s:  # a loopback port that accepts connections (and never answers)
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        r = cli("keys", "revoke", "--authority-key", key, "--out", out, "--device", 1, "--upload", url)
    flat = _flat(r.output)
    assert r.exit_code == 2 and "$DELTAPLANE_ADMIN_TOKEN" in flat and "cannot carry" in flat, flat
    assert "0123456789" not in r.output and "012345" not in r.output
    assert not out.exists()  # refused before the list was written


def test_any_other_service_error_says_the_list_stays_written(cli, authority, tmp_path, monkeypatch) -> None:
    """An answer other than 401/403/409/422 (a 500, a 404 from a service without the endpoint, a 413) was
    re-raised bare ("HTTP 500: …", exit 1) without the "is written and kept" every other failure says."""
    from deltaplane.serve.client import AdminClient, ServiceError

    def fails(self, data):
        raise ServiceError(500, "internal error")

    monkeypatch.setattr(AdminClient, "upload_revocations", fails)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    _, key = authority
    out = tmp_path / "revoked.bin"
    r = cli("keys", "revoke", "--authority-key", key, "--out", out, "--device", 1, "--upload", NO_SERVICE)
    flat = _flat(r.output)
    assert r.exit_code == 1 and "HTTP 500: internal error" in flat and f"{out} is written and kept" in flat, (
        flat
    )
    assert out.exists()


def test_the_printed_answer_counts_the_revoked_keys(cli, authority, service, tmp_path, monkeypatch) -> None:
    """The service's answer counted revoked devices only, so `--upload` could not say the list it now holds
    revokes device-0's key too: the answer has `revoked_keys` beside `revoked` (the older fields unchanged), and
    the printed line counts both. An answer without it (a service before key revocation) prints devices only."""
    url, ca, _ = service
    _, key = authority
    nodes, out = tmp_path / "nodes", tmp_path / "revoked.bin"
    assert cli("keys", "certify", "--authority-key", key, "--out", nodes, "--devices", 1).exit_code == 0
    r = cli("keys", "revoke", "--authority-key", key, "--out", out, "--device", 0, "--enrolled", nodes,
            "--device", 4, "--upload", url, "--ca", ca)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "the service now holds list number 1 (2 devices revoked, 1 key)" in _flat(r.output), r.output
    from deltaplane.serve.client import AdminClient

    older = {"sequence": 2, "issued": 0, "next_update": 0, "revoked": 2, "replaced": True}
    monkeypatch.setattr(AdminClient, "upload_revocations", lambda self, data: older)
    r = cli("keys", "revoke", "--authority-key", key, "--out", out, "--upload", NO_SERVICE)
    assert r.exit_code == 0 and "now holds list number 2 (2 devices revoked)" in _flat(r.output), r.output


def _answers(url: str, ca: Path, token: str) -> int:
    """The status of a device request (the held revocation list) made with ``token``: 401 once it is revoked."""
    import httpx

    from deltaplane.serve.tls import client_context

    with httpx.Client(base_url=url, verify=client_context(ca)) as http:
        return http.get("/v1/secagg/revocations", headers={"Authorization": f"Bearer {token}"}).status_code


def test_the_upload_revokes_the_revoked_devices_service_tokens(cli, authority, service, tmp_path) -> None:
    """A revoked SecAgg identity kept its service token: device-3 could still fetch models and upload to plain
    rounds until the operator also posted /admin/devices/device-3/revoke by hand. `--upload` revokes the tokens of
    the ids it revokes (--device, --certificate), says so, and leaves every other device's token valid."""
    from deltaplane.serve.client import AdminClient
    from deltaplane.serve.tls import client_context

    url, ca, _ = service
    _, key = authority
    admin = AdminClient(url, ADMIN, tls=client_context(ca))
    three, five = admin.issue_token("device-3", "fleet"), admin.issue_token("device-5", "fleet")
    assert _answers(url, ca, three) != 401 and _answers(url, ca, five) != 401
    r = cli("keys", "revoke", "--authority-key", key, "--out", tmp_path / "revoked.bin", "--device", 3,
            "--upload", url, "--ca", ca)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert _answers(url, ca, three) == 401  # refused: the revoked device can no longer take part at all
    assert f"service tokens of device-3 revoked on {url}" in _flat(r.output), r.output
    assert _answers(url, ca, five) != 401
    assert _answers(url, ca, admin.issue_token("device-9", "fleet")) != 401


def test_a_failed_token_revocation_exits_1_and_says_the_list_is_uploaded(
    cli, authority, service, tmp_path, monkeypatch
) -> None:
    """The list upload counts as done; the tokens not revoked are named, with what to do (exit 1)."""
    from deltaplane.serve.client import AdminClient, ServiceError

    url, ca, held = service
    _, key = authority
    real = AdminClient.revoke_device

    def fails_on_device_5(self, device_id):
        if device_id == "device-5":
            raise ServiceError(500, "internal error")
        return real(self, device_id)

    monkeypatch.setattr(AdminClient, "revoke_device", fails_on_device_5)
    out = tmp_path / "revoked.bin"
    r = cli("keys", "revoke", "--authority-key", key, "--out", out, "--device", 3, "--device", 5,
            "--device", 7, "--upload", url, "--ca", ca)  # fmt: skip
    flat = _flat(r.output)
    assert r.exit_code == 1, flat
    assert "the service now holds list number 1 (3 devices revoked" in flat
    assert "the list is uploaded, but the service tokens of device-5, device-7 are NOT revoked" in flat
    assert "(those of device-3 are)" in flat and "HTTP 500: internal error" in flat
    assert held.read_bytes() == out.read_bytes()
