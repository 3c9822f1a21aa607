"""Which service a device is talking to, as the device itself sees it: what its SecAgg signatures name.

An authenticated SecAgg round binds every signed key advertisement and consistency signature to the round's
parameters and a session name (:func:`~deltaplane.aggregation.secagg.round_binding`). On the HTTP service that
name was ``model/round`` alone, so two services trusting one enrollment authority, serving a model of the same
name and opening a round of the same number with the same parameters, gave their rounds the same binding: the
operator of one could seat there a device of the other that never joined, replaying its signed advertisement.

The session name now starts with the *service identity* each device works out from its own connection, never
from anything the service says (a malicious service must not be able to make its devices adopt another's):

* over TLS, ``tls-spki-sha256:<hex>@https://<host>:<port><prefix>``: the SHA-256 of the SubjectPublicKeyInfo of
  the certificate the service presented in the handshake (the key it proved it holds), then the address the
  device was given (the name that certificate was verified for). Another service cannot present that key for that name
  without the private key, whatever certificate authority its devices were told to trust; services that share a
  key (one wildcard certificate, one terminating ingress) are told apart by the address;
* over plain HTTP (or an in-process transport), ``origin:<scheme>://<host>:<port><prefix>``: the address the
  device was configured with (``<prefix>``: its path, if any, without a trailing slash). Nothing authenticates
  the service there, so this only separates services reached at different addresses; use TLS for the guarantee
  above.

The scheme of that address decides which: a plain-HTTP service reached through a TLS forward proxy is bound by
its address (the TLS there is the proxy's), and an ``https://`` answer without a readable certificate is refused.

The service does not verify advertisements (its devices do), so it never needs to know the identity its
devices see; it states in each invitation that it expects the binding (:data:`SERVICE_BINDING`) and refuses an
authenticated round to a device that does not say it signs with it (:data:`BINDING_HEADER`), so a device of a
release before the binding cannot run a round under the weaker one unnoticed.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import httpx

__all__ = [
    "BINDING_HEADER",
    "PEER_ADDRESS",
    "PEER_CERTIFICATE",
    "SERVICE_BINDING",
    "check_plain_http",
    "is_loopback_host",
    "peer_address",
    "peer_certificate",
    "service_identity",
    "service_session",
]

#: the version of the service binding (1: the session name starts with the device-seen service identity); the
#: service states it in each invitation (``service_binding``), a device in :data:`BINDING_HEADER`
SERVICE_BINDING = 1
#: the request header in which a device says which service binding it signs with
BINDING_HEADER = "X-Deltaplane-SecAgg-Binding"
#: the key under which :class:`~deltaplane.serve.client.DeviceClient` keeps, in each answer's ``extensions``,
#: the DER certificate the service presented on that connection (absent over plain HTTP)
PEER_CERTIFICATE = "deltaplane.peer_certificate"
#: the key under which :class:`~deltaplane.serve.client.DeviceClient` keeps, in each answer's ``extensions``, the
#: IP address its connection reached (absent over a transport with no socket: an in-process test client)
PEER_ADDRESS = "deltaplane.peer_address"

_DEFAULT_PORTS = {"http": 80, "https": 443}


def peer_certificate(resp: httpx.Response) -> bytes | None:
    """The DER certificate the server presented on the connection that carried ``resp`` (while that connection
    is open: read it before closing a streamed answer), or None over plain HTTP or a transport with no socket."""
    stream: Any = resp.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(True)  # binary form; httpcore may hand the C object, positional-only
    return bytes(der) if der else None


def peer_address(resp: httpx.Response) -> str | None:
    """The IP address the connection that carried ``resp`` reached (while it is open), or None for a transport
    with no socket. Through a proxy it is the proxy's: the first hop, which is where plain HTTP leaves the host."""
    stream: Any = resp.extensions.get("network_stream")
    addr = stream.get_extra_info("server_addr") if stream is not None else None
    return str(addr[0]) if addr else None


def check_plain_http(identity: str, answer: httpx.Response, round_id: int, *, allowed: bool) -> None:
    """Refuse (:class:`~deltaplane.aggregation.secagg.SecAggAuthError`) an authenticated round whose service
    (``identity``, :func:`service_identity`) was reached over plain HTTP through a socket, unless ``allowed`` or
    both the address the device was given and the one its connection reached are loopback. Nothing authenticates
    a plain-HTTP service: whoever answers on the path (anyone between this device and that address) runs the
    round as the service, and the binding only names the address, so an authenticated round there promises what
    it cannot hold. Loopback never leaves the host, and an in-process transport (no socket: tests) no network at
    all; ``deltaplane fleet`` commands already refuse plain HTTP off loopback before they connect (the token
    would travel in clear).

    The connection's address alone does not tell: through a forward proxy on loopback (``HTTP_PROXY``, which
    httpx reads) it is 127.0.0.1 while the proxy carries the round to the host the address names, in clear; and
    a name that resolved to loopback for this connection may resolve elsewhere for the next. So the given
    address must be a loopback IP or ``localhost`` (RFC 6761) too."""
    from deltaplane.aggregation.secagg import SecAggAuthError

    peer = answer.extensions.get(PEER_ADDRESS)
    if allowed or not identity.startswith("origin:http:") or peer is None:
        return
    host = answer.request.url.host
    where = _where(peer, host)
    if where is None:
        return
    raise SecAggAuthError(
        f"refusing authenticated SecAgg round {round_id}: the service at {identity.removeprefix('origin:')} "
        f"was reached over plain HTTP ({where}), where nothing authenticates it: whoever answers on the way can "
        "run the round as the service. Use its https:// address (and pin its key: service_spki, fleet device "
        "--service-spki), or allow_plain_http=True for a network path you trust; nothing was sent but the "
        "invitation's request"
    )


def _where(peer: str, host: str) -> str | None:
    """Why a plain-HTTP connection to ``peer`` for the address ``host`` may leave this machine (None: it cannot)."""
    ip = _ip(peer)
    if ip is None:  # a Unix socket's path: httpx uses no proxy over a transport it is given
        return None
    if not ip.is_loopback:
        return f"at {peer}, not loopback"
    if is_loopback_host(host):
        return None
    return (
        f"at {peer} for {host}, which is not a loopback address: a proxy on loopback carries it to that host, "
        "and a name may resolve elsewhere for the next connection"
    )


def is_loopback_host(host: str) -> bool:
    """Whether the address ``host`` names this machine whatever resolves it: a loopback IP (an IPv4-mapped one
    too) or ``localhost`` (RFC 6761). Another name is not, even if it resolves to loopback now: it may resolve
    elsewhere for the next connection."""
    ip = _ip(host.strip("[]"))
    return host.lower().rstrip(".") == "localhost" or (ip is not None and ip.is_loopback)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``address`` as an IP (an IPv4-mapped IPv6 one as its IPv4, a ``%zone`` dropped), None when it is none."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def service_identity(resp: httpx.Response, requested: str) -> str:
    """The identity of the service that answered ``resp``, as this device saw it (see the module docstring):
    for an ``https://`` service the SHA-256 of the key of the certificate it presented and its address, for an
    ``http://`` one its address (``origin:``).

    The scheme of the address the device was given decides, never what the connection happens to carry: a
    plain-HTTP service reached through an ``https://`` forward proxy (``HTTP_PROXY``, which httpx reads from the
    environment) answers over the *proxy's* TLS, whose key would name every service behind that proxy alike; and
    an ``https://`` answer whose certificate cannot be read (a transport with no socket) is refused
    (:class:`~deltaplane.aggregation.secagg.SecAggAuthError`) rather than bound by its address, the weaker
    plain-HTTP binding. ``requested`` is the endpoint path the device asked for: what precedes it in the
    request's path is the base address's path prefix (``https://fl.example/a``), part of the address, since one
    host may route several services by prefix behind one TLS key."""
    from deltaplane.aggregation.secagg import SecAggAuthError
    from deltaplane.serve.tls import spki_sha256

    url = resp.request.url
    if not url.path.endswith(requested):
        raise SecAggAuthError(f"the answer is for {url.path!r}, not the {requested!r} this device asked for")
    port = url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme, 0)
    # the base address the device was given, with its path: one host may route services by path prefix
    prefix = url.path[: len(url.path) - len(requested)].rstrip("/")
    origin = f"{url.scheme}://{url.host}:{port}{prefix}"
    if url.scheme != "https":
        return f"origin:{origin}"
    der = resp.extensions.get(PEER_CERTIFICATE) or peer_certificate(resp)
    if not der:
        raise SecAggAuthError(
            f"the answer from {origin} carries no TLS certificate (a transport that exposes no connection?): an "
            "authenticated round binds the key the service presented, and this device will not bind its address "
            "instead; use DeviceClient's own connection (or an httpx transport over a real socket)"
        )
    # the key *and* the address: services behind one key (a wildcard certificate, one terminating ingress) are
    # told apart by the name the device reached, which that key's certificate was verified for
    return f"tls-spki-sha256:{spki_sha256(der)}@{origin}"


def service_session(identity: str, model: str, round_id: int) -> bytes:
    """The session name a device binds its signatures in round ``round_id`` of ``model`` to: the service
    ``identity`` it saw, then ``model/round`` (unambiguous: neither an identity nor a model name holds a NUL)."""
    return b"deltaplane/service/%d\x00%s\x00%s/%d" % (
        SERVICE_BINDING,
        identity.encode(),
        model.encode(),
        round_id,
    )
