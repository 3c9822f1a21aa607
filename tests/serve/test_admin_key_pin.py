"""The operator's side of the service key pin: ``AdminClient(service_spki=)`` and ``--service-spki`` on every
command that sends the admin token (``fleet enroll``, ``fleet coordinate``, ``keys revoke --upload``), and
``keys tls --keep-key``, which renews the server certificate for the same key so the pin survives renewal.

Before, only devices could pin: the admin token went to any server holding a certificate the operator's CA
issued for the service's address (a man in the middle), and each ``keys tls`` run (a certificate renewal) gave
the service a new key, so a pinned fleet had to be given a new pin. Tests against real TLS services on loopback.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from deltaplane.aggregation.secagg import EnrollmentAuthority
from deltaplane.cli import app as cli
from deltaplane.errors import ConfigError, ServiceKeyMismatch
from deltaplane.serve import AdminClient
from deltaplane.serve.server import BackgroundServer
from deltaplane.serve.tls import client_context, make_tls_bundle, server_ssl_options, spki_pin

from .conftest import ADMIN, Service
from .test_service_key_pin import PIN, _served, keys  # noqa: F401  (keys: the module's fixture)


def _run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], terminal_width=300, env=env)


def test_a_pinned_admin_client_refuses_another_key_of_the_same_ca_before_the_token_is_sent(
    tmp_path,
    keys,  # noqa: F811
) -> None:
    _, server, seen = _served(tmp_path, keys.mitm)
    with server:
        # the CA vouches for the man in the middle: an unpinned admin client gives it the admin token
        plain = AdminClient(server.url, ADMIN, tls=client_context(keys.ca))
        assert plain.issue_token("d0")
        plain.close()
        assert seen == [("POST", "/admin/devices")]
        seen.clear()
        pinned = AdminClient(server.url, ADMIN, tls=client_context(keys.ca), service_spki=keys.real.pin)
        with pytest.raises(
            ServiceKeyMismatch, match=f"presented the TLS key {keys.mitm.pin}, not the pinned"
        ):
            pinned.issue_token("d1")
        pinned.close()
    assert seen == []  # refused at the handshake: not even the request line (and the token) was sent


def test_a_pinned_admin_client_works_with_the_service_of_its_key(tmp_path, keys) -> None:  # noqa: F811
    _, server, seen = _served(tmp_path, keys.real)
    with server:
        admin = AdminClient(server.url, ADMIN, tls=client_context(keys.ca), service_spki=keys.real.pin)
        assert admin.issue_token("d0")
        admin.close()
    assert seen == [("POST", "/admin/devices")]


@pytest.mark.parametrize(
    ("url", "pin", "message"),
    [
        ("http://127.0.0.1:9", PIN, "plain HTTP presents no key to pin"),
        ("https://127.0.0.1:9", "ab" * 32, "'sha256:' and 64 hex digits"),
    ],
)
def test_an_admin_pin_that_cannot_hold_is_refused_before_any_connection(url, pin, message) -> None:
    with pytest.raises(ConfigError, match=message):
        AdminClient(url, ADMIN, service_spki=pin)


def test_an_admin_pin_with_a_client_it_does_not_make_is_refused() -> None:
    import httpx

    with pytest.raises(ConfigError, match="pin_service_key"):
        AdminClient("https://testserver", ADMIN, client=httpx.Client(), service_spki=PIN)


def test_fleet_enroll_with_a_pin_refuses_another_key_sends_nothing_and_writes_nothing(
    tmp_path,
    keys,  # noqa: F811
) -> None:
    _, server, seen = _served(tmp_path, keys.mitm)
    out = tmp_path / "tokens"
    with server:
        r = _run("fleet", "enroll", "--url", server.url, "--ca", keys.ca, "--out", out, "--devices", 2,
                 "--service-spki", keys.real.pin, env={"DELTAPLANE_ADMIN_TOKEN": ADMIN})  # fmt: skip
    assert r.exit_code == 1 and "not the pinned" in r.output and keys.mitm.pin in r.output, r.output
    assert seen == [] and not out.exists()


def test_fleet_enroll_with_the_services_pin_enrols(tmp_path, keys) -> None:  # noqa: F811
    _, server, seen = _served(tmp_path, keys.real)
    out = tmp_path / "tokens"
    with server:
        r = _run("fleet", "enroll", "--url", server.url, "--ca", keys.ca, "--out", out, "--devices", 2,
                 "--service-spki", keys.real.pin, env={"DELTAPLANE_ADMIN_TOKEN": ADMIN})  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("*.token")) == ["device-0.token", "device-1.token"]
    assert seen == [("POST", "/admin/devices")] * 2


def test_fleet_coordinate_with_a_pin_refuses_another_key_and_sends_nothing(tmp_path, keys) -> None:  # noqa: F811
    _, server, seen = _served(tmp_path, keys.mitm)
    fed = tmp_path / "fed.yaml"
    fed.write_text("clients: 3\nrounds: 1\n")
    with server:
        r = _run("fleet", "coordinate", "--url", server.url, "--ca", keys.ca, "--federation", fed, "--model",
                 "cnn", "--deadline", 5, "--patience", 1, "--service-spki", keys.real.pin,
                 env={"DELTAPLANE_ADMIN_TOKEN": ADMIN})  # fmt: skip
    assert r.exit_code == 1 and "not the pinned" in r.output and keys.mitm.pin in r.output, r.output
    assert f"the service at {server.url} presented" in r.output, r.output  # the URL given, not the bare host
    assert seen == []


def test_keys_revoke_upload_with_a_pin_refuses_another_key_and_keeps_the_list(tmp_path, keys) -> None:  # noqa: F811
    _, server, seen = _served(tmp_path, keys.mitm)
    key, out = tmp_path / "enrollment.ed25519.pem", tmp_path / "revoked.bin"
    key.write_bytes(EnrollmentAuthority.generate().to_pem())
    with server:
        r = _run("keys", "revoke", "--authority-key", key, "--out", out, "--device", 3, "--upload", server.url,
                 "--ca", keys.ca, "--service-spki", keys.real.pin, env={"DELTAPLANE_ADMIN_TOKEN": ADMIN})  # fmt: skip
    assert r.exit_code == 1 and "not the pinned" in r.output, r.output
    assert seen == [] and out.exists()  # the list is written first, as for any failed upload
    # and it says no token was revoked, and how to: fleet.md's old remedy (re-issue the kept list without
    # --device) uploaded the list but revoked no token, and a walked device-2 kept polling on its valid token
    assert "the service tokens of device-3 are NOT revoked" in r.output, r.output
    # a service that does not answer at all (nothing listens on port 9): the same advice
    r = _run("keys", "revoke", "--authority-key", key, "--out", out, "--device", 3, "--upload",
             "https://127.0.0.1:9", "--ca", keys.ca, env={"DELTAPLANE_ADMIN_TOKEN": ADMIN})  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "device-3 are NOT revoked" in r.output and "its --device included" in r.output, r.output


@pytest.mark.parametrize("pin", ["ab" * 32, PIN])
def test_a_bad_or_plain_http_pin_is_a_usage_error_before_any_work(tmp_path, pin) -> None:
    """A malformed pin, or one for a plain-HTTP service (nothing to pin), exits 2 with nothing written."""
    key, out = tmp_path / "enrollment.ed25519.pem", tmp_path / "revoked.bin"
    key.write_bytes(EnrollmentAuthority.generate().to_pem())
    env = {"DELTAPLANE_ADMIN_TOKEN": ADMIN}
    url = "http://127.0.0.1:9" if pin == PIN else "https://127.0.0.1:9"
    tls = [] if pin == PIN else ["--ca", make_tls_bundle(tmp_path / "tls").ca_cert]
    r = _run("keys", "revoke", "--authority-key", key, "--out", out, "--device", 3, "--upload", url, *tls,
             "--service-spki", pin, env=env)  # fmt: skip
    assert r.exit_code == 2 and not out.exists(), r.output
    r = _run("fleet", "enroll", "--url", url, *tls, "--out", tmp_path / "t", "--devices", 1, "--service-spki",
             pin, env=env)  # fmt: skip
    assert r.exit_code == 2 and not (tmp_path / "t").exists(), r.output
    r = _run("keys", "revoke", "--authority-key", key, "--out", out, "--device", 3, "--service-spki", pin)
    assert r.exit_code == 2 and "are for --upload URL" in r.output and not out.exists(), r.output


def test_keys_tls_keep_key_renews_the_certificate_and_the_pin_holds(tmp_path) -> None:
    """A fleet pinned before the renewal takes the renewed service; without --keep-key the pin changes."""
    folder = tmp_path / "tls"
    assert _run("keys", "tls", "--out", folder, "--host", "127.0.0.1").exit_code == 0
    pin = spki_pin((folder / "server.pem").read_bytes())
    key, cert = (folder / "server.key").read_bytes(), (folder / "server.pem").read_bytes()
    r = _run(
        "keys", "tls", "--out", folder, "--host", "127.0.0.1", "--host", "fleet.example.org", "--keep-key"
    )
    assert r.exit_code == 0, r.output
    assert f"server key pin {pin} (fleet device --service-spki, unchanged: the key was kept)" in r.output
    renewed = (folder / "server.pem").read_bytes()
    assert renewed != cert and spki_pin(renewed) == pin and (folder / "server.key").read_bytes() == key
    assert (folder / "server.key").stat().st_mode & 0o777 == 0o600
    server = BackgroundServer(
        Service(tmp_path / "home").app,
        ssl_options=server_ssl_options(folder / "server.pem", folder / "server.key"),
    )
    with server:  # the renewed certificate and the kept key serve TLS; the old pin takes it
        admin = AdminClient(server.url, ADMIN, tls=client_context(folder / "ca.pem"), service_spki=pin)
        assert admin.issue_token("d0")
        admin.close()
    assert _run("keys", "tls", "--out", folder, "--host", "127.0.0.1").exit_code == 0
    assert spki_pin((folder / "server.pem").read_bytes()) != pin


def _rsa_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _p384_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist: there is no server key to keep"),
        (b"not a key\n", "is not an unencrypted PEM private key"),
        ("certificate", "is not an unencrypted PEM private key"),
        ("ed25519", "holds Ed25519PrivateKey, not the ECDSA P-256 private key"),
        ("rsa", "holds RSAPrivateKey, not the ECDSA P-256 private key"),
        ("p384", "holds a secp384r1 key, not the ECDSA P-256 private key"),
    ],
)
def test_keys_tls_keep_key_refuses_a_key_file_of_another_kind_and_writes_nothing(
    tmp_path, content, message
) -> None:
    folder = tmp_path / "tls"
    bundle = make_tls_bundle(folder, hosts=["127.0.0.1"])
    if content is None:
        bundle.server_key.unlink()
    elif content == "certificate":
        bundle.server_key.write_bytes(bundle.server_cert.read_bytes())
    elif content == "ed25519":
        bundle.server_key.write_bytes(EnrollmentAuthority.generate().to_pem())
    elif content == "rsa":
        bundle.server_key.write_bytes(_rsa_pem())
    elif content == "p384":
        bundle.server_key.write_bytes(_p384_pem())
    else:
        bundle.server_key.write_bytes(content)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    r = _run("keys", "tls", "--out", folder, "--host", "127.0.0.1", "--keep-key")
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert "--keep-key" in r.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written, nothing replaced


def test_keep_key_with_force_keeps_the_pin_under_a_new_ca(tmp_path) -> None:
    """A new CA (--force) with the same server key: the pin still holds (what the pin is for)."""
    folder = tmp_path / "tls"
    first = make_tls_bundle(folder, hosts=["127.0.0.1"])
    ca = first.ca_cert.read_bytes()
    second = make_tls_bundle(folder, hosts=["127.0.0.1"], overwrite=True, keep_key=True)
    assert second.ca_cert.read_bytes() != ca and second.service_spki == first.service_spki
