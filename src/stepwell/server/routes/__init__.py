"""API routes, one router per resource. ``ROUTERS`` is what ``create_app`` mounts;
a new resource (actions, plugins, ...) adds its module here."""

from __future__ import annotations

from fastapi import APIRouter

from stepwell.server.models import ErrorResponse
from stepwell.server.routes import actions, app_info, health, plugins, runs, tables, webhooks

#: Error responses every route may give, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict] = {
    401: {"model": ErrorResponse, "description": "API token missing or wrong"},
    404: {"model": ErrorResponse, "description": "No such step, run, table or webhook"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ErrorResponse, "description": "Invalid request"},
}

ROUTERS: list[APIRouter] = [
    health.router,
    app_info.router,
    runs.router,
    tables.router,
    webhooks.router,
    actions.router,
    plugins.router,
]
