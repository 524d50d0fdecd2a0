"""GET /api/health: is the server up, and how busy."""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Depends

from stepwell.server.context import ServerContext, get_ctx
from stepwell.server.models import Health

router = APIRouter(prefix="/api", tags=["health"])


@router.get("/health", response_model=Health, summary="Server health")
def health(ctx: ServerContext = Depends(get_ctx)) -> Health:
    from stepwell import __version__

    running, queued = ctx.scheduler.counts()
    return Health(
        status="ok" if ctx.scheduler.accepting else "stopping",
        app=ctx.app.title,
        version=__version__,
        store=ctx.store.dialect.name.lower(),
        pid=os.getpid(),
        uptime_seconds=round(time.time() - ctx.started, 3),
        running=running,
        queued=queued,
    )
