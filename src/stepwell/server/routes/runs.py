"""Runs: list, detail, logs, live events (SSE), trigger, cancel."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse

from stepwell.engine.scheduler import FINISHED
from stepwell.server.context import ServerContext, get_ctx
from stepwell.server.errors import ApiError, not_found
from stepwell.server.live import RunEvent, log_event, run_event
from stepwell.server.models import (
    CancelResponse,
    LogLineModel,
    LogList,
    RunDetail,
    RunList,
    RunSummary,
    TriggerRequest,
    TriggerResponse,
)
from stepwell.store.base import RUN_STATUSES, LogLine, RunRecord

router = APIRouter(prefix="/api", tags=["runs"])

RunId = Path(description="Run id (lowercase ULID)", max_length=64)
#: Seconds between keep-alive comments on an idle event stream.
KEEPALIVE_SECONDS = 15.0
#: Stored log lines sent in one write of an event stream (a write per line made a
#: 100,000-line log take ~10 s to reach a browser).
STORED_LINES_PER_WRITE = 500
#: A run id as the store orders them (``before=`` pages by it): a lowercase ULID.
RUN_ID_FORM = re.compile(r"[0-9a-hjkmnp-tv-z]{26}")


def _run(ctx: ServerContext, run_id: str) -> RunRecord:
    run = ctx.store.get_run(run_id)
    if run is None:
        raise not_found(f"no run {run_id!r} (list runs with GET /api/runs)")
    return run


@router.get("/runs", response_model=RunList, summary="Runs, newest first")
def list_runs(
    step: str | None = Query(None, description="Only this step's runs", max_length=200),
    status: str | None = Query(None, description="Only runs with this status", max_length=40),
    trigger: str | None = Query(None, description="Only runs started by this trigger", max_length=40),
    before: str | None = Query(None, description="Only runs older than this run id (the next "
                               "page: the last id of this one)", max_length=64),
    limit: int = Query(50, ge=1, le=1000),
    ctx: ServerContext = Depends(get_ctx),
) -> RunList:
    if status is not None and status not in RUN_STATUSES:
        raise ApiError(422, f"no run status {status!r}; statuses: {', '.join(RUN_STATUSES)}")
    if before is not None and not RUN_ID_FORM.fullmatch(before):  # (else compared as text)
        raise ApiError(422, f"before={before!r} is not a run id (26 characters, digits and "
                            "lowercase letters): pass the id of the last run of the page before")
    records = ctx.store.list_runs(
        step=step, limit=limit, statuses=None if status is None else [status], trigger=trigger,
        before=before,
    )
    return RunList(runs=[RunSummary.of(r) for r in records])


@router.post("/runs", response_model=TriggerResponse, status_code=202,
             summary="Trigger a run of a step (queued triggers coalesce)")
def trigger_run(body: TriggerRequest, ctx: ServerContext = Depends(get_ctx)) -> TriggerResponse:
    ticket = ctx.scheduler.trigger(body.step, "manual")
    return TriggerResponse(run_id=ticket.run_id, step=ticket.step, coalesced=ticket.coalesced)


@router.get("/runs/{run_id}", response_model=RunDetail, summary="One run")
def get_run(run_id: str = RunId, ctx: ServerContext = Depends(get_ctx)) -> RunDetail:
    return RunDetail.of(_run(ctx, run_id))


@router.get("/runs/{run_id}/logs", response_model=LogList, summary="A run's stored log lines")
def get_logs(
    run_id: str = RunId,
    after: int = Query(-1, ge=-1, description="Only lines with seq greater than this"),
    tail: int | None = Query(None, ge=1, description="Only the last this many of those lines"),
    ctx: ServerContext = Depends(get_ctx),
) -> LogList:
    _run(ctx, run_id)
    lines = _merged(ctx.store.get_logs(run_id), ctx.hub.recent(run_id))
    lines = [line for line in lines if line.seq > after]
    return LogList(run_id=run_id, lines=[LogLineModel.of(line) for line in lines[-tail if tail else 0:]])


def _merged(stored: list[LogLine], recent: list[LogLine]) -> list[LogLine]:
    """Stored lines plus the in-memory ones of a run in progress, by seq, once each."""
    by_seq = {line.seq: line for line in stored}
    for line in recent:
        by_seq.setdefault(line.seq, line)
    return [by_seq[seq] for seq in sorted(by_seq)]


@router.post("/runs/{run_id}/cancel", response_model=CancelResponse, status_code=202,
             summary="Cancel a queued or running run",
             responses={409: {"description": "The run has ended or is not run by this server"}})
def cancel_run(run_id: str = RunId, ctx: ServerContext = Depends(get_ctx)) -> CancelResponse:
    run = _run(ctx, run_id)
    if run.status in FINISHED:
        raise ApiError(409, f"run {run_id} has already ended ({run.status})")
    outcome = ctx.scheduler.cancel(run_id)
    actions = ctx.actions
    if outcome is None and actions is not None and actions.executor.cancel(run_id):
        outcome = "cancelling"  # an action call: its caller gets the cancelled result
    if outcome is None:
        run = _run(ctx, run_id)  # it may have ended meanwhile
        if run.status in FINISHED:
            raise ApiError(409, f"run {run_id} has already ended ({run.status})")
        raise ApiError(409, f"run {run_id} ({run.status}) is not run by this server")
    return CancelResponse(run_id=run_id, status=outcome)  # type: ignore[arg-type]


@router.get(
    "/runs/{run_id}/events",
    summary="Live events of a run (server-sent events)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": (
        "An event stream: `status` (the run record), `log` (one log line, id = seq), "
        "`progress` (rows in/out), then `end` (the final run record). Stored lines "
        "come first, then live ones; with `tail`, only the last stored lines, after an "
        "`earlier` event counting the others.")}},
)
async def run_events(request: Request, run_id: str = RunId,
                     tail: int | None = Query(None, ge=1, description="Only the last this many "
                                              "stored lines (then every live one)"),
                     ctx: ServerContext = Depends(get_ctx)) -> StreamingResponse:
    queue, recent = ctx.hub.subscribe(run_id)
    try:
        run = await asyncio.to_thread(_run, ctx, run_id)
    except BaseException:
        ctx.hub.unsubscribe(run_id, queue)
        raise
    return StreamingResponse(
        _events(request, ctx, run, queue, recent, tail),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(request: Request, ctx: ServerContext, run: RunRecord, queue: asyncio.Queue[RunEvent],
                  recent: list[LogLine], tail: int | None = None) -> AsyncIterator[bytes]:
    try:
        yield run_event("status", run).encode()
        last_seq = -1
        stored = _merged(await asyncio.to_thread(ctx.store.get_logs, run.id), recent)
        if tail and len(stored) > tail:
            yield RunEvent("earlier", {"lines": len(stored) - tail}).encode()
            stored = stored[-tail:]
        for start in range(0, len(stored), STORED_LINES_PER_WRITE):
            batch = stored[start:start + STORED_LINES_PER_WRITE]
            yield b"".join(log_event(line).encode() for line in batch)
            last_seq = batch[-1].seq
        if run.status in FINISHED:
            yield run_event("end", run).encode()
            return
        while not ctx.hub.closed:
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                # a run that ended unseen (another process closed it) still ends the stream
                current = await asyncio.to_thread(ctx.store.get_run, run.id)
                if current is not None and current.status in FINISHED:
                    yield run_event("end", current).encode()
                    return
                continue
            if event.kind == "log":
                if event.seq is not None and event.seq <= last_seq:
                    continue
                last_seq = event.seq if event.seq is not None else last_seq
            yield event.encode()
            if event.kind in ("end", "closing"):
                return
        yield RunEvent("closing", {"reason": "the server is shutting down"}).encode()
    finally:
        ctx.hub.unsubscribe(run.id, queue)
