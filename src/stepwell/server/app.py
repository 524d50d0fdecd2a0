"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from stepwell.server import errors
from stepwell.server.auth import WEBHOOK_PREFIX, BearerAuthMiddleware, LoopbackGuardMiddleware
from stepwell.server.content import JsonByDefaultMiddleware
from stepwell.server.context import ServerContext
from stepwell.server.limits import BodyLimitMiddleware
from stepwell.server.responses import ServerStopping
from stepwell.server.routes import ERROR_RESPONSES, ROUTERS, docs, ui

log = logging.getLogger("stepwell.server")

DESCRIPTION = """
The HTTP API of a running `stepwell serve`: the app and its graph, steps and
their state, runs (with live logs as server-sent events), tables, and webhooks.

Errors always have the body `{"error": {"code", "message", "details"}}`. When
the server listens beyond loopback every request needs
`Authorization: Bearer <token>` (the token is in `APP/.stepwell/token`).
The web UI is at `/ui/`.
"""


def _start_rules(ctx: ServerContext) -> None:
    """Start the app's stream rules (eKuiper style), if it has any, and wake them
    on every commit to a table they stream."""
    try:
        from stepwell.streams.rules import start_rules

        ctx.rules = start_rules(ctx.app, ctx.store, ctx.say)
    except Exception as exc:  # the API and the steps still serve
        log.exception("rules could not start")
        if ctx.say is not None:
            ctx.say(f"warning: the app's rules could not start: {exc}")
        return
    if ctx.rules is not None:
        rules = ctx.rules
        ctx.scheduler.add_commit_observer(lambda tables: [rules.notify(t) for t in tables])


def drain(ctx: ServerContext) -> None:
    """The first part of a graceful shutdown, run while HTTP still answers (reads and
    cancels work; triggers and webhook rows get 503): refuse new triggers, end live
    event streams, commit the webhook rows already queued, let running steps end
    within ``shutdown_timeout``, then cancel the rest. A second call does nothing new."""
    ctx.scheduler.stop_accepting()
    cancelled: list[str] = []
    drainer = None
    if ctx.actions is not None:  # action calls in progress drain alongside the steps
        executor = ctx.actions.executor
        drainer = threading.Thread(
            target=lambda: cancelled.extend(executor.drain(ctx.settings.shutdown_timeout)),
            name="stepwell-drain-actions", daemon=True,
        )
        drainer.start()
    ctx.hub.close()
    ctx.ingest.close()
    cancelled += ctx.scheduler.shutdown(ctx.settings.shutdown_timeout)
    if drainer is not None:
        drainer.join()
    if cancelled:
        log.warning("cancelled %d run(s) still running at shutdown: %s",
                    len(cancelled), ", ".join(cancelled))
    # requests still waiting for a step's answer get one before HTTP stops
    ctx.hub.responses.fail_all(ServerStopping("the server is shutting down"))


def create_app(ctx: ServerContext) -> FastAPI:
    """The API over ``ctx``. Its lifespan starts the scheduler (and calls
    ``ctx.on_ready``) and, on shutdown, lets running steps finish or cancels them."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        ctx.hub.bind(asyncio.get_running_loop())
        await asyncio.to_thread(ctx.scheduler.start)
        await asyncio.to_thread(_start_rules, ctx)
        if ctx.on_ready is not None:
            ctx.on_ready()
        try:
            yield
        finally:
            await asyncio.to_thread(drain, ctx)  # (done already when a signal began the shutdown)
            if ctx.rules is not None:
                await asyncio.to_thread(ctx.rules.stop_all)

    from stepwell import __version__

    api = FastAPI(
        title=f"stepwell: {ctx.app.title or ctx.app.root.name}",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        docs_url=None,  # served from local files (docs.install): FastAPI's uses a CDN
        redoc_url=None,
    )
    api.state.ctx = ctx
    errors.install(api)
    for router in ROUTERS:
        api.include_router(router)
    ui.install(api)  # the web UI at /ui/ (static files, not in the OpenAPI spec)
    docs.install(api)

    settings = ctx.settings

    def limit_for(path: str) -> int:
        if path.startswith(WEBHOOK_PREFIX):
            return settings.max_webhook_bytes
        if path.startswith("/api/tables/") and path.endswith("/rows"):
            return settings.max_upload_bytes
        return settings.max_body_bytes

    # the last added runs first: auth before anything reads the body
    api.add_middleware(JsonByDefaultMiddleware)
    api.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    api.add_middleware(BearerAuthMiddleware, tokens=ctx.tokens, required=ctx.auth_required)
    if not ctx.auth_required:
        api.add_middleware(LoopbackGuardMiddleware)
    return api
