"""Request and response models of the HTTP API, shared with the CLI's ``--json`` output.

Values of user data (table rows, state, stream positions) go through
:func:`jsonable` before they reach a model, so the API and the CLI print them
the same way: datetimes and dates in ISO 8601 (``+00:00``), decimals as
strings, bytes as hex.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stepwell.store.base import LogLine, PartitionRecord, RunRecord, TableInfo, TableVersion
from stepwell.store.schema import jsonable


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors ---------------------------------------------------------------------------
class ErrorBody(_Model):
    code: str = Field(description="Machine-readable kind, e.g. not_found, unauthorized")
    message: str = Field(description="What went wrong and what to do, in one line")
    details: Any = Field(default=None, description="Validation details, when any")


class ErrorResponse(_Model):
    """The body of every 4xx/5xx response."""

    error: ErrorBody


# -- runs -----------------------------------------------------------------------------
#: Fields of ``stepwell runs --json``, in order.
RUN_FIELDS = ("id", "step", "status", "started_at", "ended_at", "rows_in", "rows_out", "error")


class RunSummary(_Model):
    id: str
    step: str
    status: str
    trigger: str | None = None
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    rows_in: int = 0
    rows_out: int = 0
    error: str | None = None

    @classmethod
    def of(cls, run: RunRecord) -> RunSummary:
        return cls(**{name: getattr(run, name) for name in cls.model_fields})

    def to_record(self) -> RunRecord:
        return RunRecord(**self.model_dump())

    def cli_json(self) -> dict[str, Any]:
        """The object ``stepwell runs --json`` prints for this run."""
        return {name: getattr(self, name) for name in RUN_FIELDS}


class RunDetail(RunSummary):
    traceback: str | None = None
    host_pid: int | None = None
    info: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, run: RunRecord) -> RunDetail:
        fields = {name: getattr(run, name) for name in cls.model_fields}
        fields["info"] = jsonable(run.info or {})
        return cls(**fields)


class RunList(_Model):
    runs: list[RunSummary]


class LogLineModel(_Model):
    run_id: str
    seq: int
    ts: dt.datetime
    level: str
    message: str

    @classmethod
    def of(cls, line: LogLine) -> LogLineModel:
        return cls(run_id=line.run_id, seq=line.seq, ts=line.ts, level=line.level, message=line.message)

    def to_line(self) -> LogLine:
        return LogLine(self.run_id, self.seq, self.ts, self.level, self.message)


class LogList(_Model):
    run_id: str
    lines: list[LogLineModel]


class TriggerRequest(_Model):
    step: str = Field(description="Name of the step to run")


class TriggerResponse(_Model):
    run_id: str = Field(description="The run that will serve this trigger")
    step: str
    coalesced: bool = Field(
        description="True when the trigger joined a run of the step that was already queued"
    )


class CancelResponse(_Model):
    run_id: str
    status: Literal["cancelled", "cancelling"] = Field(
        description="cancelled: the queued run was removed; cancelling: the running run is being stopped"
    )


# -- tables ---------------------------------------------------------------------------
class TableSummary(_Model):
    """One table as ``stepwell tables --json`` prints it."""

    name: str
    rows: int
    version: int
    unique_on: list[str] | None = None
    columns: dict[str, str] = Field(description="column name -> logical type")

    @classmethod
    def of(cls, info: TableInfo) -> TableSummary:
        return cls(
            name=info.name,
            rows=info.row_count,
            version=info.version,
            unique_on=info.unique_on,
            columns={c.name: c.type for c in info.columns},
        )

    def to_info(self) -> TableInfo:
        from stepwell.store.base import ColumnInfo

        return TableInfo(
            name=self.name,
            columns=[ColumnInfo(n, t) for n, t in self.columns.items()],
            row_count=self.rows,
            version=self.version,
            unique_on=self.unique_on,
        )


class TableList(_Model):
    tables: list[TableSummary]


class RowsPage(_Model):
    table: str
    offset: int
    limit: int
    total: int
    rows: list[dict[str, Any]]


class TableVersionModel(_Model):
    table: str
    version: int
    physical_name: str
    created_at: dt.datetime | None
    active: bool
    row_count: int

    @classmethod
    def of(cls, version: TableVersion) -> TableVersionModel:
        return cls(**{name: getattr(version, name) for name in cls.model_fields})


class TableVersionList(_Model):
    table: str
    versions: list[TableVersionModel]


class TableChanged(_Model):
    table: str
    version: int = Field(description="The table's active version after the change")


class LoadResponse(_Model):
    table: str
    rows: int


# -- state ----------------------------------------------------------------------------
class PositionModel(_Model):
    table: str
    order_by: list[str]
    table_version: int = 1
    value: Any = None
    last_id: str | None = None


class StepState(_Model):
    """A step's state and stream positions, as ``stepwell state`` prints them."""

    step: str
    state: dict[str, Any]
    stream_positions: list[PositionModel]
    partitions: list[PartitionModel] | None = Field(
        default=None, description="A connector step's partitions (absent for other steps)"
    )


class StateChange(_Model):
    reset: bool = Field(default=False, description="Clear state and stream positions first")
    values: dict[str, Any] = Field(default_factory=dict, description="Keys to set")


class PartitionModel(_Model):
    """One connector partition as last committed (see ``PartitionRecord``)."""

    name: str
    fingerprint: str | None
    code_hash: str | None
    rows: int = 0
    duration_seconds: float | None = None
    status: str = "succeeded"
    error: str | None = None
    run_id: str | None = None
    updated_at: dt.datetime | None = None

    @classmethod
    def of(cls, record: PartitionRecord) -> PartitionModel:
        return cls(**{name: getattr(record, name) for name in cls.model_fields})


class PartitionList(_Model):
    step: str
    partitions: list[PartitionModel]


# -- app, steps, graph -----------------------------------------------------------------
class StepModel(_Model):
    name: str
    kind: str
    file: str
    trigger: str
    description: str | None = None
    inputs: list[str] = Field(description="Tables the step reads")
    outputs: list[str] = Field(description="Tables the step writes")
    after: str | None = None
    parameters: dict[str, Any] = Field(
        description="Parameters as written in the app file (secret references are not resolved)"
    )
    secrets: list[str] = Field(description="Names of the secrets the step uses (never values)")
    running_run: str | None = None
    queued_run: str | None = None
    last_run: RunSummary | None = Field(default=None, description="The step's newest run")
    next_tick: dt.datetime | None = Field(default=None, description="Next cron tick (UTC)")


class StepList(_Model):
    steps: list[StepModel]


class WebhookModel(_Model):
    name: str
    table: str
    url: str
    has_token: bool = Field(description="Whether the webhook has its own token (never shown)")
    respond: bool = Field(
        default=False, description="Ingest and respond: the request waits for a step's answer"
    )


class GraphNode(_Model):
    id: str = Field(description="step:<name>, table:<name> or webhook:<name>")
    kind: Literal["step", "table", "webhook"]
    name: str


class GraphEdge(_Model):
    source: str
    target: str


class Graph(_Model):
    nodes: list[GraphNode]
    edges: list[GraphEdge]


class AppModel(_Model):
    title: str | None
    root: str
    file: str
    format: str
    store: str = Field(description="Store URL with any password removed")
    steps: list[StepModel]
    tables: list[str]
    webhooks: list[WebhookModel]
    graph: Graph


class WebhookResponse(_Model):
    webhook: str
    table: str
    rows: int
    ids: list[str] = Field(description="patterns_id of each stored row, in order")


class Health(_Model):
    status: Literal["ok", "stopping"]
    app: str | None
    version: str
    store: str = Field(description="duckdb or postgresql")
    pid: int
    uptime_seconds: float
    running: int
    queued: int
