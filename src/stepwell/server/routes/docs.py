"""The interactive API docs at ``/docs``, served from this server.

FastAPI's default page loads Swagger UI from a CDN, so it stays blank on a
machine without internet; the same page here loads the copy packaged in
``swagger-ui-bundle-v2`` from ``/docs/assets/``.
"""

from __future__ import annotations

import html

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"


def install(api: FastAPI) -> None:
    """Serve ``/docs`` (and its assets) from ``api``; not in the OpenAPI document."""
    from swagger_ui_bundle import swagger_ui_path

    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=api.openapi_url or "/openapi.json",
            title=html.escape(f"{api.title} - API docs"),  # (pasted into the page's markup)
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        )

    api.add_api_route(DOCS_PATH, docs, methods=["GET"], include_in_schema=False)
    api.mount(ASSETS_PATH, StaticFiles(directory=swagger_ui_path), name="docs-assets")
