"""Webhooks: each POSTed JSON object becomes a row of the webhook's table.

A webhook with ``respond: true`` (ingest and respond) takes one object per
request, stores it with a fresh ``patterns_request_key`` and answers with what
a step passes to ``respond_to_request`` for that key (see ``server.responses``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from stepwell.server.auth import bearer, token_matches
from stepwell.server.context import ServerContext, get_ctx
from stepwell.server.errors import ApiError, not_found
from stepwell.server.ingest import IngestError
from stepwell.server.models import WebhookModel, WebhookResponse
from stepwell.server.responses import REQUEST_KEY_COLUMN, RequestFailed, ServerStopping
from stepwell.server.routes.app_info import webhook_models
from stepwell.server.routes.tables import parse_json_rows
from stepwell.store import ids

router = APIRouter(prefix="/api", tags=["webhooks"])


@router.get("/webhooks", response_model=list[WebhookModel], summary="The app's webhooks")
def list_webhooks(ctx: ServerContext = Depends(get_ctx)) -> list[WebhookModel]:
    return webhook_models(ctx.app)


@router.post(
    "/webhooks/{name}",
    response_model=WebhookResponse,
    status_code=202,
    summary="Store the JSON body (an object, or each object of an array) as rows",
    description=(
        "Every row gets a `patterns_id`. The rows are committed before the response is "
        "sent; steps triggered `upstream` by the webhook's table are queued. A webhook "
        "with its own token needs `Authorization: Bearer <webhook token>` (the server "
        "token works too). A `respond: true` webhook takes one object, stores it with a "
        "`patterns_request_key` and answers 200 with the JSON a step passes to "
        "`respond_to_request(key, payload)`, 502 when the run handling the row fails "
        "first, or 504 after its `respond_timeout`."
    ),
    responses={200: {"description": "The step's answer (respond webhooks)"},
               502: {"description": "The step failed before answering (respond webhooks)"},
               504: {"description": "No step answered in time (respond webhooks)"}},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "oneOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}}]}}}}},
)
async def post_webhook(request: Request, name: str = Path(max_length=200),
                       ctx: ServerContext = Depends(get_ctx)) -> WebhookResponse:
    hook = next((h for h in ctx.app.webhooks if h.name == name), None)
    _authorize(request, ctx, name, hook)  # before a 404 that names the app's webhooks
    if hook is None:
        known = ", ".join(h.name for h in ctx.app.webhooks) or "none"
        raise not_found(f"no webhook {name!r} (webhooks: {known})")
    rows = parse_json_rows(await request.body(), f"webhook {name!r}", allow_empty=hook.respond)
    if hook.respond:
        return await _ingest_and_respond(ctx, hook, rows)
    row_ids = await _ingest(ctx, hook, rows)
    return WebhookResponse(webhook=name, table=hook.table, rows=len(row_ids), ids=row_ids)


async def _ingest(ctx: ServerContext, hook: Any, rows: list[dict]) -> list[str]:
    """Commit ``rows`` to the webhook's table; their ``patterns_id`` values."""
    try:
        return await ctx.ingest.add(hook.table, rows)
    except IngestError as exc:
        raise exc.api_error(f"webhook {hook.name!r}: ") from None


async def _ingest_and_respond(ctx: ServerContext, hook: Any, rows: list[dict]) -> JSONResponse:
    """Store the one row with its request key, then wait for a step's answer."""
    where = f"webhook {hook.name!r}"
    if len(rows) != 1:
        raise ApiError(422, f"{where} answers each request: post one JSON object, not an "
                            f"array of {len(rows)}")  # fmt: skip
    if REQUEST_KEY_COLUMN in rows[0]:
        raise ApiError(422, f"{where}: the field {REQUEST_KEY_COLUMN!r} is set by the server")
    key = ids.new_id()
    answer = ctx.hub.responses.expect(key)  # before the row exists: no answer can be missed
    try:
        posted = dt.datetime.now(dt.UTC)
        (row_id,) = await _ingest(ctx, hook, [{**rows[0], REQUEST_KEY_COLUMN: key}])
        ctx.hub.responses.stored(key, hook.table, posted)
        try:
            payload = await asyncio.wait_for(answer, hook.respond_timeout)
        except ServerStopping:
            raise ApiError(
                503, f"{where}: the server shut down before a step answered; the request is "
                f"stored as row {row_id} with {REQUEST_KEY_COLUMN} {key} (read after the "
                f"restart, with nobody to answer): send it again later",
                code="shutting_down",
            ) from None
        except RequestFailed as exc:
            raise ApiError(
                502, f"{where}: the step handling the request failed before answering: {exc} "
                f"(the request is stored as row {row_id} with {REQUEST_KEY_COLUMN} {key})",
                code="step_failed",
            ) from None
        except TimeoutError:
            raise ApiError(
                504, f"{where}: no step answered within {hook.respond_timeout:g}s (a step "
                f"reading table {hook.table!r} calls respond_to_request(record["
                f"{REQUEST_KEY_COLUMN!r}], payload)); the request is stored as row {row_id} "
                f"with {REQUEST_KEY_COLUMN} {key}", code="no_response",
            ) from None
    finally:
        ctx.hub.responses.forget(key)
    return JSONResponse(payload)


def _authorize(request: Request, ctx: ServerContext, name: str, hook: object | None) -> None:
    own = webhook_token(ctx, hook) if hook is not None else None
    if own is None and not ctx.auth_required:
        return
    given = bearer(request.scope["headers"])
    if not token_matches(given, own, ctx.tokens.read()):
        which = "its webhook token" if own else "the server's API token"
        raise ApiError(
            401, f"webhook {name!r} needs {which}: send `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": "Bearer"},
        )


def webhook_token(ctx: ServerContext, hook: object) -> str | None:
    """The webhook's own token, with a secret reference (``${{ secrets.x }}``) resolved."""
    raw = getattr(hook, "token", None)
    if not raw:
        return None
    from stepwell.app import SecretError, resolve

    try:
        value = resolve(raw, ctx.app.root, ctx.environ or None)
    except SecretError as exc:
        raise ApiError(503, f"webhook {getattr(hook, 'name', '?')!r}: its token is not "
                            f"available: {exc}", code="misconfigured") from None
    return str(value) if value else None
