"""What every route needs: the app, its store, the scheduler, live events, settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from stepwell.engine.scheduler import DEFAULT_WORKERS, Scheduler
from stepwell.server.auth import TokenFile
from stepwell.server.ingest import Ingest
from stepwell.server.live import LiveHub
from stepwell.store.base import Store

MiB = 1024 * 1024


@dataclass
class ServerSettings:
    """Knobs of `stepwell serve` (flags, or ``STEPWELL_*`` environment variables)."""

    host: str = "127.0.0.1"
    port: int = 8765
    #: largest request body in general, for webhook posts, and for table uploads
    max_body_bytes: int = 1 * MiB
    max_webhook_bytes: int = 10 * MiB
    max_upload_bytes: int = 512 * MiB
    #: seconds running steps get to finish on SIGTERM before they are cancelled
    shutdown_timeout: float = 30.0
    workers: int = DEFAULT_WORKERS
    #: ``local`` (this machine's fork-server pool) or ``ray`` (each run a Ray task)
    executor: str = "local"
    #: the Ray cluster to join (None: ``$RAY_ADDRESS``, else start a local one)
    ray_address: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str], **overrides: Any) -> ServerSettings:
        """Settings from ``STEPWELL_MAX_BODY_BYTES`` etc., then ``overrides``."""
        settings = cls()
        for name, kind in (
            ("max_body_bytes", int),
            ("max_webhook_bytes", int),
            ("max_upload_bytes", int),
            ("shutdown_timeout", float),
            ("workers", int),
        ):
            raw = environ.get(f"STEPWELL_{name.upper()}")
            if raw:
                try:
                    setattr(settings, name, kind(raw))
                except ValueError:
                    raise ValueError(
                        f"STEPWELL_{name.upper()}={raw!r} is not a valid {kind.__name__}"
                    ) from None
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        return settings


@dataclass
class ServerContext:
    """The running server's parts, reachable from routes as ``request.app.state.ctx``."""

    app: Any  # AppSpec
    store: Store
    scheduler: Scheduler
    hub: LiveHub
    ingest: Ingest
    tokens: TokenFile
    settings: ServerSettings
    auth_required: bool
    environ: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: called once the server accepts requests (writes server.json)
    on_ready: Any = None
    #: prints a line on the server's console
    say: Any = None
    #: the eKuiper-style rule engine, when the app has plugins, streams or rules
    rules: Any = None
    #: the action executor's service, while the server runs (when the app has actions)
    actions: Any = None


async def get_ctx(request: Request) -> ServerContext:
    """FastAPI dependency: the server context. (``async`` so FastAPI resolves it on
    the event loop: a plain function would cost a hop to its thread pool and back
    on every request.)"""
    return request.app.state.ctx
