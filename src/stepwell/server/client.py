"""The httpx client other `stepwell` commands use while a server runs for their app.

It answers in the same plain types as the store (``TableInfo``, ``RunRecord``,
``LogLine``), so the CLI prints the same output whichever way it went. Errors
from the server come back as :class:`ApiError` carrying the server's one-line
message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pyarrow as pa

from stepwell.server.models import (
    LogLineModel,
    LogList,
    RowsPage,
    RunDetail,
    RunList,
    RunSummary,
    StepState,
    TableList,
    TableSummary,
    TriggerResponse,
)
from stepwell.store.base import LogLine, RunRecord, TableInfo

ARROW_STREAM = "application/vnd.apache.arrow.stream"


class ApiError(Exception):
    """The server refused or failed a request (or could not be reached)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class ServerClient:
    """Typed calls to a running `stepwell serve`."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the stepwell server at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def get_json(self, path: str, **params: Any) -> Any:
        params = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=params).json()

    # -- health / tables ---------------------------------------------------------------
    def health(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.request("GET", "/api/health", timeout=timeout).json()

    def list_tables(self) -> list[TableInfo]:
        return [t.to_info() for t in TableList.model_validate(self.get_json("/api/tables")).tables]

    def table_info(self, name: str) -> TableInfo | None:
        try:
            return TableSummary.model_validate(self.get_json(f"/api/tables/{name}")).to_info()
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def preview(self, name: str, limit: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while len(rows) < limit:
            page = RowsPage.model_validate(self.get_json(
                f"/api/tables/{name}/rows", limit=min(limit - len(rows), 10_000), offset=len(rows)
            ))
            rows.extend(page.rows)
            if not page.rows:
                break
        return rows

    def load(self, table: str, data: pa.Table) -> int:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, data.schema) as writer:
            writer.write_table(data)
        response = self.request(
            "POST", f"/api/tables/{table}/rows", content=sink.getvalue().to_pybytes(),
            headers={"Content-Type": ARROW_STREAM},
        )
        return int(response.json()["rows"])

    # -- runs -------------------------------------------------------------------------
    def list_runs(self, step: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Up to ``limit`` runs, newest first, any number (the API pages them by 1000)."""
        runs: list[RunSummary] = []
        while len(runs) < limit:
            page = RunList.model_validate(self.get_json(
                "/api/runs", step=step, limit=min(limit - len(runs), 1000),
                before=runs[-1].id if runs else None,
            )).runs
            runs.extend(page)
            if not page:
                break
        return [r.to_record() for r in runs]

    def get_run(self, run_id: str) -> RunRecord | None:
        try:
            return RunDetail.model_validate(self.get_json(f"/api/runs/{run_id}")).to_record()
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def get_logs(self, run_id: str) -> list[LogLine]:
        lines = LogList.model_validate(self.get_json(f"/api/runs/{run_id}/logs")).lines
        return [line.to_line() for line in lines]

    def trigger(self, step: str) -> TriggerResponse:
        response = self.request("POST", "/api/runs", json={"step": step})
        return TriggerResponse.model_validate(response.json())

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/runs/{run_id}/cancel").json()

    def events(self, run_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The run's server-sent events as (kind, data), until it ends."""
        try:
            with self._http.stream(
                "GET", f"/api/runs/{run_id}/events", timeout=httpx.Timeout(60.0, read=120.0)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                kind, data = "message", []
                for line in response.iter_lines():
                    if line == "":
                        if data:
                            yield kind, json.loads("\n".join(data))
                        kind, data = "message", []
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip())
        except httpx.HTTPError as exc:
            raise ApiError(f"lost the event stream of run {run_id} from {self.url}: {exc}") from None

    def wait(self, run_id: str, listener: Any = None) -> RunRecord:
        """Follow run ``run_id`` to its end, reporting to a ``RunListener``."""
        started = False
        record: RunRecord | None = None
        for kind, data in self.events(run_id):
            if kind in ("status", "end"):
                record = RunDetail.model_validate(data).to_record()
                if listener is not None and not started and record.status != "queued":
                    listener.run_started(record)
                    started = True
                if kind == "end":
                    if listener is not None:
                        listener.run_finished(record)
                    return record
            elif kind == "log" and listener is not None and record is not None:
                listener.log_line(record, LogLineModel.model_validate(data).to_line())
            elif kind == "progress" and listener is not None and record is not None:
                listener.progress(record, int(data["rows_in"]), int(data["rows_out"]))
            elif kind == "closing":
                raise ApiError(f"the server at {self.url} shut down while run {run_id} was in "
                               f"progress; see `stepwell runs` once it is back")
        raise ApiError(f"the event stream of run {run_id} ended before the run did")

    def run_steps(self, names: Sequence[str], listener: Any = None) -> list[RunRecord]:
        """Trigger each step in turn and wait for its run (like `stepwell run`)."""
        return [self.wait(self.trigger(name).run_id, listener) for name in names]

    # -- state ------------------------------------------------------------------------
    def describe_state(self, step: str) -> dict[str, Any]:
        return _state_dict(self.get_json(f"/api/steps/{step}/state"))

    def change_state(self, step: str, *, reset: bool, values: dict[str, Any]) -> dict[str, Any]:
        response = self.request("PATCH", f"/api/steps/{step}/state",
                                json={"reset": reset, "values": values})
        return _state_dict(response.json())


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()["error"]
        return ApiError(str(body["message"]), response.status_code, body.get("code"))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:300] or response.reason_phrase
        return ApiError(f"the server answered {response.status_code}: {text}", response.status_code)


def _state_dict(body: Any) -> dict[str, Any]:
    """A step's state as ``describe_state`` gives it locally (partitions only for
    connectors)."""
    described = StepState.model_validate(body).model_dump()
    if described["partitions"] is None:
        del described["partitions"]
    return described
