"""The device-facing HTTP service (FastAPI + uvicorn) and its httpx clients. Needs the ``serve`` extra.

The public names load on first use (:mod:`deltaplane.lazy`): ``fleet device`` and ``fleet coordinate`` import
``deltaplane.serve.fleet`` and the clients, and must not wait for FastAPI and uvicorn, which only the service
itself runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaplane.lazy import lazy_attributes

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily (below)
    from deltaplane.serve.app import ServiceConfig, ServiceState, create_app
    from deltaplane.serve.auth import RateLimiter, TokenAuthority
    from deltaplane.serve.client import AdminClient, DeviceClient, ServiceError
    from deltaplane.serve.server import BackgroundServer, serve
    from deltaplane.serve.tls import client_context, make_tls_bundle, server_ssl_options

_LAZY = {
    "AdminClient": "deltaplane.serve.client",
    "BackgroundServer": "deltaplane.serve.server",
    "DeviceClient": "deltaplane.serve.client",
    "RateLimiter": "deltaplane.serve.auth",
    "ServiceConfig": "deltaplane.serve.app",
    "ServiceError": "deltaplane.serve.client",
    "ServiceState": "deltaplane.serve.app",
    "TokenAuthority": "deltaplane.serve.auth",
    "client_context": "deltaplane.serve.tls",
    "create_app": "deltaplane.serve.app",
    "make_tls_bundle": "deltaplane.serve.tls",
    "serve": "deltaplane.serve.server",
    "server_ssl_options": "deltaplane.serve.tls",
}

__all__ = [
    "AdminClient",
    "BackgroundServer",
    "DeviceClient",
    "RateLimiter",
    "ServiceConfig",
    "ServiceError",
    "ServiceState",
    "TokenAuthority",
    "client_context",
    "create_app",
    "make_tls_bundle",
    "serve",
    "server_ssl_options",
]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
