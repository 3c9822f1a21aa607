"""The web dashboard: runs, registry and fleet, server-rendered, offline, behind the admin token.

``deltaplane serve`` mounts it at ``/ui`` with the live fleet; ``deltaplane ui --home H --runs DIR`` serves it for a
registry and run reports without a fleet. Nothing is loaded from the network: pages are plain HTML with inline
CSS and inline SVG charts (see :mod:`deltaplane.report.svg` for why they are drawn here).
"""

from __future__ import annotations

from typing import Any

from deltaplane.ui.router import (
    LoginThrottle,
    SecurityHeaders,
    create_ui_router,
    install_login_redirect,
    is_ui_path,
    validation_page,
)
from deltaplane.ui.session import SessionLimits
from deltaplane.ui.sources import FleetSource

__all__ = [
    "FleetSource",
    "LoginThrottle",
    "SessionLimits",
    "create_ui_app",
    "create_ui_router",
    "is_ui_path",
    "mount_ui",
    "validation_page",
]


def mount_ui(
    app: Any,
    *,
    admin_token: str,
    runs_dir: str | None,
    registry_home: str | None,
    fleet: FleetSource | None = None,
    session_limits: SessionLimits | None = None,
) -> None:
    """Add the ``/ui`` pages (and the sign-in redirect) to a FastAPI ``app``; ``session_limits`` how long a
    sign-in lasts idle and at most (30 min and 12 h by default)."""
    app.include_router(
        create_ui_router(
            admin_token=admin_token,
            runs_dir=runs_dir,
            registry_home=registry_home,
            fleet=fleet,
            session_limits=session_limits,
        )
    )
    install_login_redirect(app)
    app.add_middleware(SecurityHeaders)


def create_ui_app(
    *,
    admin_token: str,
    runs_dir: str | None,
    registry_home: str | None,
    session_limits: SessionLimits | None = None,
) -> Any:
    """A FastAPI app serving only the dashboard (no fleet): what ``deltaplane ui`` runs."""
    from fastapi import FastAPI, Request
    from fastapi.exception_handlers import request_validation_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import RedirectResponse

    app = FastAPI(title="deltaplane dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    mount_ui(
        app,
        admin_token=admin_token,
        runs_dir=runs_dir,
        registry_home=registry_home,
        session_limits=session_limits,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        if is_ui_path(request.url.path):  # a page: an HTML 422 saying which parameter is wrong
            return validation_page(exc)
        return await request_validation_exception_handler(request, exc)

    @app.get("/", include_in_schema=False)
    def root() -> Any:
        return RedirectResponse("/ui/", status_code=307)

    return app
