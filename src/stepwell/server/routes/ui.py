"""The web UI: static files in ``stepwell/server/ui/``, served under ``/ui/``.

There is no build step: ``index.html`` loads plain ES modules that call the
JSON API (``/api/...``) with ``fetch``. The files hold no data and no secrets,
so :class:`~stepwell.server.auth.BearerAuthMiddleware` lets ``GET /`` and
``GET /ui/...`` through without a token; the page asks for the token itself
(from ``/ui/#token=...``, or a form) and sends it on every API call.

``GET /`` and ``GET /ui`` redirect to ``/ui/``. None of these routes is in the
OpenAPI document.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

#: Where the UI's files live (packaged with the wheel: non-Python files of the package).
UI_DIR = Path(__file__).resolve().parent.parent / "ui"
#: URL prefix of the UI (``/ui/`` serves ``index.html``).
UI_PATH = "/ui"

#: The page runs only its own scripts and styles and talks only to this server,
#: so a value that slipped into markup could still not run code.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

# Module scripts need a JavaScript MIME type whatever the system's mime.types says.
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")


class UiFiles(StaticFiles):
    """Static files with security headers, revalidated on every load (no stale UI
    after an upgrade)."""

    def file_response(self, *args: object, **kwargs: object) -> Response:
        response = super().file_response(*args, **kwargs)  # type: ignore[arg-type]
        response.headers["Cache-Control"] = "no-cache"
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response


def _to_ui() -> RedirectResponse:
    return RedirectResponse(f"{UI_PATH}/", status_code=307)


def install(api: FastAPI) -> None:
    """Serve the UI from ``api``: ``/`` and ``/ui`` redirect, ``/ui/`` is the page."""
    api.add_api_route("/", _to_ui, methods=["GET"], include_in_schema=False)
    api.add_api_route(UI_PATH, _to_ui, methods=["GET"], include_in_schema=False)
    api.mount(UI_PATH, UiFiles(directory=UI_DIR, html=True), name="ui")
