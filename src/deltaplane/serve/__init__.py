"""The device-facing HTTP service (FastAPI + uvicorn) and its httpx clients. Needs the ``serve`` extra."""

from deltaplane.serve.app import ServiceConfig, ServiceState, create_app
from deltaplane.serve.auth import RateLimiter, TokenAuthority
from deltaplane.serve.client import AdminClient, DeviceClient, ServiceError
from deltaplane.serve.server import BackgroundServer, serve

__all__ = [
    "AdminClient",
    "BackgroundServer",
    "DeviceClient",
    "RateLimiter",
    "ServiceConfig",
    "ServiceError",
    "ServiceState",
    "TokenAuthority",
    "create_app",
    "serve",
]
