"""``/docs`` that works offline: Swagger UI from the ``swagger-ui-bundle`` package, served by the service itself.

FastAPI's default ``/docs`` page loads Swagger UI's JavaScript and CSS from a CDN, so it is blank on an
air-gapped operator network. The ``swagger-ui-bundle`` package ships those assets; they are mounted at
``/docs/assets``. Without the package, ``/docs`` is a plain page linking the OpenAPI document and listing the
operations (never a page that silently needs the internet).
"""

from __future__ import annotations

import html

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

__all__ = ["mount_offline_docs"]

ASSETS = "/docs/assets"


def mount_offline_docs(app: FastAPI) -> str:
    """Serve ``/docs`` from local assets; returns ``"swagger-ui"`` or ``"plain"`` (which page was mounted)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None

    if swagger_ui_path is not None:
        from starlette.staticfiles import StaticFiles

        app.mount(ASSETS, StaticFiles(directory=swagger_ui_path), name="swagger-ui-assets")

        @app.get("/docs", include_in_schema=False)
        def swagger() -> HTMLResponse:
            return get_swagger_ui_html(
                openapi_url=app.openapi_url or "/openapi.json",
                title=f"{app.title} - API docs",
                swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                swagger_css_url=f"{ASSETS}/swagger-ui.css",
                swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
            )

        return "swagger-ui"

    @app.get("/docs", include_in_schema=False)
    def plain() -> HTMLResponse:
        rows = "".join(
            f"<li><code>{html.escape(m.upper())} {html.escape(p)}</code> {html.escape(op.get('summary', ''))}</li>"
            for p, ops in app.openapi()["paths"].items()
            for m, op in ops.items()
        )
        return HTMLResponse(
            f"<!doctype html><title>{html.escape(app.title)} API</title><h1>{html.escape(app.title)} API</h1>"
            f'<p>OpenAPI document: <a href="{app.openapi_url}">{app.openapi_url}</a> '
            "(install <code>swagger-ui-bundle</code> for the interactive page)</p><ul>" + rows + "</ul>"
        )

    return "plain"
