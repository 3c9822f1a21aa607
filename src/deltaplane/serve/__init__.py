"""The device-facing HTTP service (FastAPI + uvicorn) and its httpx clients. Needs the ``serve`` extra."""

from deltaplane.serve.app import ServiceConfig, ServiceState, create_app
from deltaplane.serve.auth import RateLimiter, TokenAuthority
from deltaplane.serve.client import AdminClient, DeviceClient, ServiceError
from deltaplane.serve.server import BackgroundServer, serve
from deltaplane.serve.tls import client_context, make_tls_bundle, server_ssl_options

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
