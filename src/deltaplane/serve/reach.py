"""Why the service could not be reached, in one typed line: what every client command ends on instead of httpx's
exception (which the command line would end on with no message).

A connection can fail for a reason waiting cannot fix: the service's certificate is not the one ``--ca`` vouches
for, an ``http://`` URL names a port that speaks TLS, or the service demands a client certificate (mutual TLS)
and closes the request unanswered; those are ``final``. Torch-free, so ``fleet enroll`` and the admin commands
need not import the fleet's device and coordinator (:mod:`deltaplane.serve.fleet`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator

import httpx

from deltaplane.errors import ServiceUnreachable

__all__ = ["unreachable"]


def unreachable(exc: httpx.TransportError, url: str) -> ServiceUnreachable:
    """One line for a connection that failed: a TLS verification failure names the CA to check, and an
    ``http://`` URL whose port speaks TLS is told to use ``https://`` (both ``final``: waiting cannot help)."""
    cause = exc.__context__ or exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return ServiceUnreachable(
            f"the service at {url} did not prove its identity (TLS: {cause or exc}); nothing was sent. Pass "
            "--ca the CA that signed its certificate (`deltaplane keys tls` wrote it as HOME/tls/ca.pem) and a "
            "URL whose host the certificate names (--host of `deltaplane keys tls`)",
            final=True,
        )
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)) and _speaks_tls(url):
        https = str(httpx.URL(url).copy_with(scheme="https")).rstrip("/")
        return ServiceUnreachable(
            f"the service at {url} speaks HTTPS (its port answered a TLS handshake and closed the plain-HTTP "
            f"request unanswered); use --url {https} with --ca the CA that signed its certificate "
            "(`deltaplane keys tls` wrote it as HOME/tls/ca.pem)",
            final=True,
        )
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)) and _demands_client_certificate(url):
        return ServiceUnreachable(
            f"the service at {url} requires a client certificate (it runs with --tls-client-ca: mutual TLS) "
            "and closed the request unanswered; pass --tls-cert and --tls-key, a certificate its CA issued "
            "(`deltaplane keys tls --device NAME` writes HOME/tls/device-NAME.pem and .key), or check that "
            "the one you pass is",
            final=True,
        )
    return ServiceUnreachable(
        f"cannot reach the service at {url} ({type(exc).__name__}: {exc}); check the URL and that "
        "`deltaplane serve` is running"
    )


@contextlib.contextmanager
def _tls_probe(parsed: httpx.URL, default_port: int, timeout: float) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to ``parsed``'s host and port that checks no certificate, for the probes below: they
    send nothing but a handshake (and, for mutual TLS, a ``/healthz`` request line), so they learn the port's
    protocol, not whom to trust. Raises ``OSError`` or ``ssl.SSLError`` as the connection or handshake fails."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((parsed.host, parsed.port or default_port), timeout=timeout) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        yield tls


def _demands_client_certificate(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url`` is ``https://`` and its service closes, unanswered, a connection that presents no client
    certificate (``deltaplane serve --tls-client-ca``).

    Under TLS 1.3 the server checks the client's certificate after the handshake has completed on the client's
    side, and uvicorn then closes the connection without a word: a request without a certificate, or with one
    another CA issued, reads exactly like a service that died mid-request. The probe shakes hands and asks
    ``/healthz`` (no token, nothing secret): a service that is up answers it; one that requires a client
    certificate closes the connection with no byte."""
    parsed = httpx.URL(url)
    if parsed.scheme != "https" or not parsed.host:
        return False
    try:
        with _tls_probe(parsed, 443, timeout) as tls:
            tls.sendall(b"GET /healthz HTTP/1.0\r\nHost: " + parsed.raw_host + b"\r\n\r\n")
            return tls.recv(1) == b""
    except ssl.SSLError as exc:  # a TLS 1.3 server that does send its alert
        return "CERTIFICATE_REQUIRED" in str(exc).upper().replace(" ", "_")
    except OSError:
        return False


def _speaks_tls(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url`` is ``http://`` and its host:port completes a TLS handshake.

    A plain-HTTP request to ``deltaplane serve --tls-cert`` is closed without an answer, which reads exactly like
    a service that died mid-request, so without this a device or coordinator given ``http://`` by mistake would
    wait out ``--patience`` (5 minutes) for an outage that is not one. Only a handshake is made, with no
    certificate check since nothing is sent over it."""
    parsed = httpx.URL(url)
    if parsed.scheme != "http" or not parsed.host:
        return False
    try:
        with _tls_probe(parsed, 80, timeout):
            return True
    except (OSError, ssl.SSLError):
        return False
