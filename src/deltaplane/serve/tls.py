"""TLS for the service: a private CA, a server certificate, device (client) certificates, and SSL contexts.

``deltaplane keys tls`` calls :func:`make_tls_bundle`: a self-contained CA (ECDSA P-256) signs a server
certificate for the given host names/addresses and, optionally, one client certificate per device for mutual
TLS. Devices trust only that CA (:func:`client_context`), so a man in the middle with any other certificate —
including one from a public CA — is refused during the handshake. Private keys are written 0600 from creation.
Uses the ``cryptography`` package (https://cryptography.io/en/latest/x509/tutorial/).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import ssl
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deltaplane.errors import ConfigError, ServiceKeyMismatch
from deltaplane.registry.signing import write_secret_file
from deltaplane.textfile import atomic_write_bytes, require_regular_file

__all__ = [
    "SPKI_PIN_PREFIX",
    "TlsBundle",
    "check_service_key",
    "client_context",
    "issue_certificate",
    "make_ca",
    "make_tls_bundle",
    "parse_spki_pin",
    "pin_service_key",
    "server_ssl_options",
    "spki_pin",
    "spki_sha256",
]


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "deltaplane CA", *, days: int = 3650) -> tuple[Any, Any]:
    """A new self-signed CA: ``(private_key, certificate)`` allowed to sign end-entity certificates only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key: Any,
    ca_cert: Any,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    client: bool = False,
    days: int = 825,
    key: Any = None,
) -> tuple[Any, Any]:
    """A certificate signed by the CA: a server one (``hosts`` become DNS/IP subject alternative names) or,
    with ``client``, a device certificate for mutual TLS; for ``key`` (a private key, kept: its pin stays), else
    for a new ECDSA P-256 key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not client and not hosts:
        raise ConfigError("a server certificate needs at least one host name or address (--host)")
    key = _key() if key is None else key
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        names: list[Any] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


#: a DNS name a certificate can name: labels of letters, digits and inner hyphens (RFC 1123), at most 63
#: characters each, optionally under one leading wildcard label ("*.example.org")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: a device name: it becomes the certificate's common name (at most 64 characters) and part of a file name
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_host(host: str) -> None:
    """Refuse a ``--host`` that is neither an IP address nor a DNS name (an empty one, a space, a label over 63
    characters): the certificate would be unusable, or the ``cryptography`` package would refuse it untyped."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.removeprefix("*.").split(".")
    if labels[-1].isdigit():  # no top-level domain is all digits (RFC 3696 §2): a mistyped IP address
        raise ConfigError(
            f"--host must be an IP address or a DNS name; {host!r} is neither (a name ending in a number is "
            "read as an IPv4 address, and this one is not valid: each of its four parts is 0 to 255)"
        )
    if not (len(host) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels)):
        raise ConfigError(
            f"--host must be an IP address or a DNS name (letters, digits and hyphens, dot-separated labels of "
            f"at most 63 characters, e.g. fleet.example.org). Found {host!r}"
        )


def _check_device(name: str) -> None:
    """Refuse a ``--device`` name that could not be a file name in the folder (``a/b``, ``../x``, empty) or a
    certificate's common name (over 64 characters)."""
    if not _DEVICE.fullmatch(name):
        raise ConfigError(
            "--device must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            f"(it names the files device-NAME.pem/.key and the certificate). Found {name!r}"
        )


@dataclass(frozen=True)
class TlsBundle:
    """Paths written by :func:`make_tls_bundle`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    devices: dict[str, tuple[Path, Path]]

    @property
    def service_spki(self) -> str:
        """The pin of the server key (:func:`spki_pin`), what ``fleet device --service-spki`` takes: a new one
        on each :func:`make_tls_bundle`, so a pinned fleet is given it again, unless it kept the key
        (``keep_key``, ``keys tls --keep-key``): then the same as before."""
        return spki_pin(self.server_cert.read_bytes())


def make_tls_bundle(
    folder: str | os.PathLike[str],
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    devices: Sequence[str] = (),
    overwrite: bool = False,
    keep_key: bool = False,
) -> TlsBundle:
    """Write ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` and ``device-<id>.pem``/``.key`` into ``folder``.

    Refuses to replace an existing CA unless ``overwrite`` (every device trusting it would have to be
    re-provisioned); with an existing CA (checked: see :func:`_existing_ca`) it keeps the CA and issues a new
    server certificate for ``hosts`` and a certificate for each of ``devices``, over any earlier ones (each
    file replaced atomically: a reader sees the old file or the new one).

    With ``keep_key`` the new server certificate is for the key already in ``server.key``, which is left as it
    is: the service's key pin (``--service-spki``) survives the renewal, so a pinned fleet needs nothing new.
    Without it the server gets a new key, and so a new pin.

    Raises:
        ConfigError: a host that is neither an IP address nor a DNS name, a device name that is not 1 to 64
            letters, digits, '.', '_' or '-' (it names files in ``folder``), or with ``keep_key`` a
            ``server.key`` that is missing or not an unencrypted PEM ECDSA P-256 private key (what this
            function writes); all checked before anything is written.
    """
    for host in hosts:  # every name before anything is written: no CA left behind by a bad --host
        _check_host(host)
    for device in devices:
        _check_device(device)
    out = Path(folder)
    kept = _kept_server_key(out / "server.key") if keep_key else None
    out.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = out / "ca.pem", out / "ca.key"
    if (ca_key_path.exists() or ca_cert_path.exists()) and not overwrite:
        ca_key, ca_cert = _existing_ca(ca_cert_path, ca_key_path)
    else:
        ca_key, ca_cert = make_ca()
        write_secret_file(ca_key_path, _pem_key(ca_key))
        atomic_write_bytes(ca_cert_path, _pem_cert(ca_cert))
    # a common name holds at most 64 characters; the subject alternative names are what TLS clients check
    name = hosts[0] if hosts and len(hosts[0]) <= 64 else "server"
    server_key, server_cert = issue_certificate(ca_key, ca_cert, name, hosts=hosts, key=kept)
    if kept is None:
        write_secret_file(out / "server.key", _pem_key(server_key))
    atomic_write_bytes(out / "server.pem", _pem_cert(server_cert))
    written: dict[str, tuple[Path, Path]] = {}
    for d in devices:
        k, c = issue_certificate(ca_key, ca_cert, d, client=True)
        cert_path, key_path = out / f"device-{d}.pem", out / f"device-{d}.key"
        write_secret_file(key_path, _pem_key(k))
        atomic_write_bytes(cert_path, _pem_cert(c))
        written[d] = (cert_path, key_path)
    return TlsBundle(ca_cert_path, ca_key_path, out / "server.pem", out / "server.key", written)


def _read_private_key(path: Path, what: str, fix: str) -> Any:
    """The unencrypted PEM private key in ``path``, read bounded (``KEY_LIMIT``: a FIFO or a huge file is
    refused, not read for ever); :class:`ConfigError` naming ``what`` and ``fix`` if it is missing or not one."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from deltaplane.textfile import KEY_LIMIT, read_bounded_bytes

    if not os.path.lexists(path):
        raise ConfigError(f"{path} does not exist: there is no {what} to read; {fix}")
    try:
        return load_pem_private_key(read_bounded_bytes(path, limit=KEY_LIMIT, what=what), password=None)
    except (ValueError, TypeError) as exc:  # not PEM, encrypted, or an unsupported key type
        raise ConfigError(f"{path} is not an unencrypted PEM private key ({exc}); {fix}") from None


def _kept_server_key(path: Path) -> Any:
    """The server key ``keys tls --keep-key`` keeps: an ECDSA P-256 private key (what ``keys tls`` writes, and
    what the service's TLS and the devices' pins are checked with), else :class:`ConfigError`."""
    from cryptography.hazmat.primitives.asymmetric import ec

    fix = "give the folder holding the service's server.key (--out), or run without --keep-key for a new key (and pin)"
    key = _read_private_key(path, "server key to keep", fix)
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)):
        found = (
            f"a {key.curve.name} key" if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        )
        raise ConfigError(
            f"{path} holds {found}, not the ECDSA P-256 private key `deltaplane keys tls` writes; {fix}"
        )
    return key


def _existing_ca(cert_path: Path, key_path: Path) -> tuple[Any, Any]:
    """The CA already in a folder: its key and certificate, read bounded (``KEY_LIMIT``: a FIFO or a huge file
    named ``ca.key`` is refused, not read for ever) and checked to belong together.

    Raises:
        ConfigError: one of the two is missing, unreadable, not PEM, or the certificate is not the key's; says
            how to fix it (restore the file, or ``--force`` for a new CA every device must then trust).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from deltaplane.textfile import KEY_LIMIT, read_bounded_bytes

    fix = "restore it, or make a new CA with --force (every device must then trust the new ca.pem)"
    for path, other in ((key_path, cert_path), (cert_path, key_path)):
        if not path.exists():
            raise ConfigError(f"{other} exists but {path} does not: the CA is incomplete; {fix}")
    key = _read_private_key(key_path, "CA key", fix)
    try:
        cert = x509.load_pem_x509_certificate(
            read_bounded_bytes(cert_path, limit=KEY_LIMIT, what="CA certificate")
        )
    except ValueError as exc:
        raise ConfigError(f"{cert_path} is not a PEM certificate ({exc}); {fix}") from None

    def spki(public: Any) -> bytes:
        return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    if spki(cert.public_key()) != spki(key.public_key()):
        raise ConfigError(
            f"{cert_path} is not the certificate of {key_path}: certificates signed with that key would not verify "
            f"against it; {fix}"
        )
    return key, cert


def server_ssl_options(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
    client_ca: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """uvicorn keyword arguments for HTTPS (and, with ``client_ca``, required client certificates).

    The files are loaded here once, so that a certificate, key or CA that OpenSSL cannot use is a
    :class:`ConfigError` naming them before the service starts, not an ``ssl.SSLError`` traceback from uvicorn.

    Raises:
        ConfigError: a file is missing, is not a regular file (a FIFO would block OpenSSL's read), or is not a
            PEM certificate / private key that match (or, for ``client_ca``, a PEM CA certificate).
    """
    for p in (certfile, keyfile, client_ca):
        if p is not None and not os.path.lexists(p):
            raise ConfigError(f"TLS file {p} does not exist; make one with `deltaplane keys tls`")
        if p is not None:
            require_regular_file(p, what="TLS file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--tls-cert {certfile} and --tls-key {keyfile} are not a PEM certificate and its private key "
            f"({exc}); give the server.pem and server.key `deltaplane keys tls` wrote"
        ) from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"--tls-client-ca {client_ca} is not a PEM CA certificate ({exc}); give the ca.pem "
                "`deltaplane keys tls` wrote"
            ) from None
    opts: dict[str, Any] = {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}
    if client_ca is not None:
        opts |= {"ssl_ca_certs": str(client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return opts


def client_context(
    ca_file: str | os.PathLike[str],
    *,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """An SSL context that trusts only ``ca_file`` (not the system store), TLS 1.2+, with an optional client
    certificate for mutual TLS."""
    if not Path(ca_file).is_file():
        raise ConfigError(f"CA file {ca_file} does not exist")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    except (ssl.SSLError, OSError) as exc:  # a key, the server's own chain file in DER, any other file
        raise ConfigError(
            f"CA file {ca_file} is not a PEM CA certificate ({exc}); give the ca.pem `deltaplane keys tls` wrote "
            "(HOME/tls/ca.pem), not a key"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"device certificate {cert} and key {key} are not a PEM certificate and its private key ({exc}); "
                "give the device's files `deltaplane keys tls --device NAME` wrote"
            ) from None
    return ctx


#: how a service key pin is spelled: ``sha256:`` then the SHA-256 of the key's DER SubjectPublicKeyInfo, in hex
SPKI_PIN_PREFIX = "sha256:"


def spki_sha256(certificate: bytes) -> str:
    """The SHA-256 (hex) of the SubjectPublicKeyInfo of ``certificate`` (DER, or PEM): the key, whatever
    certificate carries it, so a pin survives the renewal of a certificate for the same key."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    load = (
        x509.load_pem_x509_certificate
        if certificate.lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate
    )
    spki = load(certificate).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def spki_pin(certificate: bytes) -> str:
    """The pin of the key in ``certificate`` (DER or PEM), ``sha256:<hex>``: what ``deltaplane keys tls``
    prints and ``fleet device --service-spki`` takes."""
    return SPKI_PIN_PREFIX + spki_sha256(certificate)


def parse_spki_pin(pin: str) -> str:
    """The hex digest of a pin spelled ``sha256:<64 hex digits>`` (either case), else :class:`ConfigError`."""
    text = pin.strip()
    digest = text[len(SPKI_PIN_PREFIX) :].lower() if text.lower().startswith(SPKI_PIN_PREFIX) else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ConfigError(
            f"a service key pin is 'sha256:' and 64 hex digits, as `deltaplane keys tls` prints it. Found {pin!r:.100}"
        )
    return digest


def check_service_key(der: bytes | None, pinned: str, where: str, *, sent: bool = False) -> None:
    """Refuse (:class:`ServiceKeyMismatch`) a connection to ``where`` whose server presented no certificate, or
    one whose key is not ``pinned`` (the hex digest :func:`parse_spki_pin` returns). ``sent``: the check runs on
    an answer, after the request went out (a connection the pinned context did not make), so the message says
    so rather than that nothing was sent."""
    seen = spki_sha256(der) if der else None
    if seen == pinned:
        return
    what = (
        "the request, its token included, was sent before this check (a client= whose connections are not "
        "pinned: give it a context from pin_service_key); revoke that token"
        if sent
        else "nothing was sent"
    )
    raise ServiceKeyMismatch(
        f"the service at {where} presented "
        + (f"the TLS key {SPKI_PIN_PREFIX}{seen}" if seen else "no TLS certificate")
        + f", not the pinned {SPKI_PIN_PREFIX}{pinned} (--service-spki); {what}. Another server holds "
        "a certificate your CA issued for that address (a man in the middle), or the service's key was replaced "
        "(`deltaplane keys tls` issues a new one each run and prints its pin): check with the operator before "
        "pinning the new one"
    )


@dataclass(frozen=True)
class _Pin:
    """What :func:`pin_service_key` pinned a context to: the service key's SPKI digest (hex) and the service's
    URL, if given."""

    spki: str
    service: str | None


#: Each context :func:`pin_service_key` changed, with its pin: kept beside the context, since ``ssl.SSLContext``
#: declares no attribute to hold it, and weakly, so a context its caller drops takes its pin along.
_PINS: weakref.WeakKeyDictionary[ssl.SSLContext, _Pin] = weakref.WeakKeyDictionary()


def _check_pin(conn: ssl.SSLSocket | ssl.SSLObject) -> None:
    """:func:`check_service_key` on a pinned connection whose handshake just succeeded."""
    pin = _PINS[conn.context]
    check_service_key(conn.getpeercert(True), pin.spki, _pinned_where(conn, pin.service))


class _PinnedSocket(ssl.SSLSocket):
    """A client TLS socket that, once the handshake (and the CA's verification) succeeds, refuses a server
    whose key is not its context's pin, before the connection carries a byte of the request."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        try:
            _check_pin(self)
        except ServiceKeyMismatch:
            self.close()
            raise


class _PinnedObject(ssl.SSLObject):
    """:class:`_PinnedSocket` for TLS over a memory BIO (TLS through an ``https://`` proxy, asyncio)."""

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_pin(self)


def _pinned_where(conn: ssl.SSLSocket | ssl.SSLObject, service: str | None) -> str:
    """The service a pinned connection went to, as its refusal names it: the URL :func:`pin_service_key` was
    given (``https://127.0.0.1:8443``, what the operator typed and the docs quote) when the connection is to
    its host, else the host name alone (a context pinned for one URL and used for another host). The socket's
    peer cannot say it: through an ``https://`` proxy's ``CONNECT`` the peer is the proxy."""
    host = str(conn.server_hostname)
    if service and urlsplit(service).hostname == host.strip("[]").lower():
        return service
    return host


def pin_service_key(context: ssl.SSLContext, pin: str, service: str | None = None) -> ssl.SSLContext:
    """Make ``context`` (changed in place, and returned) refuse a server whose key is not ``pin``
    (``sha256:<hex>``, :func:`spki_pin`) during the handshake, after the usual certificate checks: a server
    with a valid certificate from the trusted CA for the right name, but another key, raises
    :class:`ServiceKeyMismatch` before any request is sent (a bearer token included). ``service``: the
    service's URL, which the refusal names (``the service at https://…``); without it, the host name."""
    _PINS[context] = _Pin(parse_spki_pin(pin), service.rstrip("/") if service else None)
    context.sslsocket_class = _PinnedSocket
    context.sslobject_class = _PinnedObject
    return context
