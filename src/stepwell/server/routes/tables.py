"""Tables: list, schema, paged rows, versions, reset, truncate, and appending rows."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from fastapi import APIRouter, Depends, Path, Query, Request

from stepwell.server.context import ServerContext, get_ctx
from stepwell.server.errors import ApiError, not_found
from stepwell.server.ingest import IngestError
from stepwell.server.models import (
    LoadResponse,
    RowsPage,
    TableChanged,
    TableList,
    TableSummary,
    TableVersionList,
    TableVersionModel,
    jsonable,
)
from stepwell.store.base import ID_COLUMN, TableInfo, missing_table_message
from stepwell.store.schema import MAX_NESTING, nested_too_deep, to_pylist

router = APIRouter(prefix="/api", tags=["tables"])

TableName = Path(description="Table name", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=200)
#: Content type of an Arrow IPC stream (what `stepwell load` sends).
ARROW_STREAM = "application/vnd.apache.arrow.stream"


def table_or_404(ctx: ServerContext, name: str) -> TableInfo:
    info = ctx.store.table_info(name)
    if info is None:
        if name in ctx.app.table_names():
            raise not_found(f"table {name!r} has no rows yet: the app names it, and it is "
                            "made by the first commit of a step or webhook writing it")  # fmt: skip
        known = [t.name for t in ctx.store.list_tables()]
        raise not_found(missing_table_message(name, known))
    return info


@router.get("/tables", response_model=TableList, summary="Tables with row counts and schemas")
def list_tables(ctx: ServerContext = Depends(get_ctx)) -> TableList:
    return TableList(tables=[TableSummary.of(t) for t in ctx.store.list_tables()])


@router.get("/tables/{name}", response_model=TableSummary, summary="A table's schema and size")
def get_table(name: str = TableName, ctx: ServerContext = Depends(get_ctx)) -> TableSummary:
    return TableSummary.of(table_or_404(ctx, name))


@router.get("/tables/{name}/rows", response_model=RowsPage,
            summary="A page of rows (in patterns_id order when the table has it)")
def get_rows(
    name: str = TableName,
    limit: int = Query(100, ge=0, le=10_000),
    offset: int = Query(0, ge=0, le=2**40),
    ctx: ServerContext = Depends(get_ctx),
) -> RowsPage:
    info = table_or_404(ctx, name)
    order = [ID_COLUMN] if any(c.name == ID_COLUMN for c in info.columns) else None
    rows: list[dict] = []
    skip = offset
    if limit and offset < info.row_count:
        for batch in ctx.store.scan(name, order_by=order, batch_rows=max(1, min(limit + skip, 50_000))):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch = batch.slice(skip)
            skip = 0
            rows.extend(to_pylist(batch.slice(0, limit - len(rows))))  # JSON columns as values
            if len(rows) >= limit:
                break
    return RowsPage(table=name, offset=offset, limit=limit, total=info.row_count, rows=jsonable(rows))


@router.get("/tables/{name}/versions", response_model=TableVersionList,
            summary="A table's versions (a reset starts a new one; old ones are kept)")
def get_versions(name: str = TableName, ctx: ServerContext = Depends(get_ctx)) -> TableVersionList:
    table_or_404(ctx, name)
    versions = [TableVersionModel.of(v) for v in ctx.store.table_versions(name)]
    return TableVersionList(table=name, versions=versions)


def _writers_idle(ctx: ServerContext, name: str) -> None:
    busy = [w for w in ctx.app.writers().get(name, []) if not w.startswith("webhook:")
            and ctx.scheduler.is_running(w)]
    if busy:
        raise ApiError(409, f"table {name!r} is being written by running step(s) {', '.join(busy)}; "
                            f"try again when they have ended")


@router.post("/tables/{name}/reset", response_model=TableChanged,
             summary="Start a new empty version of a table (the old rows are kept)")
def reset_table(name: str = TableName, ctx: ServerContext = Depends(get_ctx)) -> TableChanged:
    table_or_404(ctx, name)
    _writers_idle(ctx, name)
    with ctx.store.transaction() as tx:
        version = tx.reset(name)
        tx.commit()
    return TableChanged(table=name, version=version)


@router.post("/tables/{name}/truncate", response_model=TableChanged,
             summary="Delete all rows of a table (same version and schema)")
def truncate_table(name: str = TableName, ctx: ServerContext = Depends(get_ctx)) -> TableChanged:
    info = table_or_404(ctx, name)
    _writers_idle(ctx, name)
    with ctx.store.transaction() as tx:
        tx.truncate(name)
        tx.commit()
    return TableChanged(table=name, version=info.version)


@router.post(
    "/tables/{name}/rows",
    response_model=LoadResponse,
    summary="Append rows as one committed write (what `stepwell load` sends)",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
        ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}},
    }}},
)
async def append_rows(request: Request, name: str = TableName,
                      ctx: ServerContext = Depends(get_ctx)) -> LoadResponse:
    body = await request.body()
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type == ARROW_STREAM:
        try:
            data: pa.Table | list = pa.ipc.open_stream(body).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise ApiError(400, f"the body is not an Arrow IPC stream: {exc}") from None
    else:
        data = parse_json_rows(body, f"table {name!r}")
    try:
        ids = await ctx.ingest.add(name, data)
    except IngestError as exc:
        raise exc.api_error() from None
    return LoadResponse(table=name, rows=len(ids))


def parse_json(body: bytes, where: str) -> Any:
    """The JSON value of a request body, else 400 saying why (NaN and Infinity
    included: they are not JSON)."""
    try:
        return json.loads(body, parse_constant=_not_json)
    except ValueError as exc:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise ApiError(400, f"{where}: the body is not JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, f"{where}: the JSON body is nested too deeply") from None


def parse_json_rows(body: bytes, where: str, *, allow_empty: bool = False) -> list[dict]:
    """A JSON object (one row) or array of objects (one row each), else 4xx. An empty
    object is no row (``allow_empty``: it is, e.g. a request a step answers)."""
    payload = parse_json(body, where)
    rows = payload if isinstance(payload, list) else [payload]
    for index, row in enumerate(rows):
        at = f" element {index}" if isinstance(payload, list) else ""
        if not isinstance(row, dict):
            raise ApiError(
                422, f"{where}:{at} expected a JSON object (one row), got {type(row).__name__}"
            )
        if not row and not allow_empty:
            raise ApiError(422, f"{where}:{at} an empty object is not a row; give it a field")
        if nested_too_deep(row, MAX_NESTING + 1):  # (the row itself is one level)
            raise ApiError(422, f"{where}:{at} a value is nested more than {MAX_NESTING} "
                                "levels deep; flatten it or send it as text")  # fmt: skip
    return rows


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value (send null or a number)")
