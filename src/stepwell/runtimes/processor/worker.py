"""Worker-side entry point of a processor run.

The statement is compiled once (:func:`~.guard.compile_statement`), then run
on one asyncio event loop for the whole run:

* no input: once, with ``INPUT_DATA = []``;
* ``bulk``: once over every new input row;
* ``row``: once per new input row, in a loop *inside this process*. Input
  arrives in Arrow batches (one request per batch, never per row) and
  output leaves in Arrow batches (a ``write`` per ~200,000 rows, sent once the
  next input batch is in, so the host stores it while the worker computes).

Nothing is committed before the end: the input position, the output rows and
``DATA_CHECKPOINT`` go to the host in the final ``done``, which commits them in
one transaction. ``log.error`` marks the execution that called it as failed
(see ``docs/processor.md`` for how that maps onto the run's status).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from stepwell.runtimes.processor.guard import (
    DEFAULT_ALLOWED_IMPORTS,
    CompiledStatement,
    compile_statement,
    install_audit_hook,
)
from stepwell.runtimes.processor.schema import OutputSchema, SchemaError, describe_value
from stepwell.sandbox.client import HostLink
from stepwell.sandbox.worker import TimeLimitReached

#: The column every tracked input table has; the input position is its last value read.
ID_COLUMN = "patterns_id"
#: Key of the step's state that holds DATA_CHECKPOINT.
CHECKPOINT_KEY = "DATA_CHECKPOINT"
#: Input rows per scan batch, and output rows per write in bulk mode.
BATCH_ROWS = 100_000
#: Row mode hands output to the host once this many rows are pending (fewer, larger
#: writes cost the host less per row).
WRITE_ROWS = 200_000
#: Pending log lines are sent when there are this many, or after LOG_SECONDS.
LOG_LINES, LOG_SECONDS = 500, 0.2
_JSON_TYPE = b"json"
#: Cyclic GC thresholds while the statement runs (CPython's default is 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 20)


class StatementFailed(Exception):
    """The run failed without a Python exception of the user's (log.error, bad result)."""


# -- the APIs the statement sees ------------------------------------------------------------


class LogSink:
    """Collects the statement's log lines and sends them to the host in batches."""

    def __init__(self, link: HostLink):
        self.link = link
        self.errors = 0
        self.first_error: str | None = None
        self._pending: list[tuple[str, str]] = []
        self._last_send = time.monotonic()
        self._repeats: dict[Any, list[Any]] = {}
        # the run log keeps prints and log lines in the order they were made: a print
        # sends the log lines before it, a log line the prints before it
        link.before_print = self._send_pending

    def emit(self, level: str, message: Any) -> None:
        text = message if type(message) is str else str(message)
        if level == "error":
            self.errors += 1
            if self.first_error is None:
                self.first_error = text
        for stream in self.link.outputs:
            if stream.has_pending:
                self._send_pending()  # (lines of ours before those prints first)
                stream.flush()
        self._pending.append((level, text))
        if len(self._pending) >= LOG_LINES or time.monotonic() - self._last_send > LOG_SECONDS:
            self.flush()

    def warn_once(self, key: Any, text: str) -> None:
        """A warning logged the first time; repeats are counted and reported at the end."""
        seen = self._repeats.get(key)
        if seen is None:
            self._repeats[key] = [text, 1]
            self.emit("warn", text)
        else:
            seen[1] += 1

    def report_repeats(self) -> None:
        for text, count in self._repeats.values():
            if count > 1:
                self.emit("warn", f"{text} (repeated {count} times in this run)")
        self._repeats.clear()

    def flush(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        self._send_pending()

    def _send_pending(self) -> None:
        if not self._pending or self.link.busy_here():
            return
        pending, self._pending = self._pending, []
        self._last_send = time.monotonic()
        start = 0
        while start < len(pending):
            level = pending[start][0]
            end = start
            while end < len(pending) and pending[end][0] == level:
                end += 1
            self.link.notify("log", level=level, lines=[text for _, text in pending[start:end]])
            start = end


class StatementLog:
    """The ``log`` object of a statement: ``trace``, ``debug``, ``info``, ``warn``
    and ``error`` (which marks the execution as failed; the statement goes on)."""

    __slots__ = ("_sink",)

    def __init__(self, sink: LogSink):
        self._sink = sink

    def trace(self, message: Any) -> None:
        """Log a trace line."""
        self._sink.emit("trace", message)

    def debug(self, message: Any) -> None:
        """Log a debug line."""
        self._sink.emit("debug", message)

    def info(self, message: Any) -> None:
        """Log an info line."""
        self._sink.emit("info", message)

    def warn(self, message: Any) -> None:
        """Log a warning."""
        self._sink.emit("warn", message)

    warning = warn

    def error(self, message: Any) -> None:
        """Log an error and mark this execution of the statement as failed."""
        self._sink.emit("error", message)

    def __repr__(self) -> str:
        return "<processor log: trace, debug, info, warn, error>"


async def sleep(seconds: float) -> None:
    """Pause the statement for ``seconds`` without blocking the event loop."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"sleep() takes a number of seconds, not {type(seconds).__name__}")
    await asyncio.sleep(max(0.0, float(seconds)))


# -- the run ----------------------------------------------------------------------------------


def _row_builder(names: list[str]) -> Callable[..., dict[str, Any]]:
    """A function building one row dict from one value per column (fast: no zip/dict())."""
    params = ", ".join(f"c{i}" for i in range(len(names)))
    items = ", ".join(f"{name!r}: c{i}" for i, name in enumerate(names))
    return eval(f"lambda {params}: {{{items}}}", {"__builtins__": {}})  # our own code, not the user's


_ROW_LOOP = """
async def row_loop(inputs, count, function, checkpoint, log, sleep, sink, failed, out_index,
                   columns, name_set, at):
    keep = out_index.append
    {unpack}
    {appends}
    {header}
        row = {row}
        at[0] = index
        errors = sink.errors
        result = await function([row], checkpoint, log, sleep)
        if sink.errors != errors:
            failed(index)
            continue
        if type(result) is not list:
            return "result", index, result
        for obj in result:
            if type(obj) is dict and len(obj) == {count}:
                {gets}
                if {present}:
                    {stores}
                    keep(index)
                    continue
            if type(obj) is not dict:
                return "object", index, obj
            if not obj.keys() <= name_set and not (obj.keys() <= with_inputs and {unchanged}):
                return "object", index, obj
            {slow_stores}
            keep(index)
    return None
"""


def _compile_row_loop(inputs: list[str], names: tuple[str, ...]) -> Callable[..., Any]:
    """The row loop specialised for one input table and one output schema: each
    INPUT_DATA row is built straight from the input columns (a dict display, no
    list of rows in between), output fields are inlined (no inner loop over
    fields) and a complete object is checked with ``len`` plus one lookup per
    field. Generated from our own template; names enter it only as ``repr``
    string literals, never as code."""
    indent = "\n                "
    k = len(inputs)
    if k == 0:
        header = "for index in range(count):"
    elif k == 1:
        header = "for index, c0 in enumerate(i0):"
    else:
        targets = ", ".join(f"c{j}" for j in range(k))
        header = f"for index, ({targets}) in enumerate(zip({', '.join(f'i{j}' for j in range(k))})):"
    source = _ROW_LOOP.format(
        unpack="; ".join(f"i{j} = inputs[{j}]" for j in range(k)) or "pass",
        appends="; ".join(f"a{i} = columns[{i}].append" for i in range(len(names))),
        header=header,
        row="{" + ", ".join(f"{name!r}: c{j}" for j, name in enumerate(inputs)) + "}",
        count=len(names),
        gets=indent.join(f"v{i} = obj.get({name!r}, MISSING)" for i, name in enumerate(names)),
        present=" and ".join(f"v{i} is not MISSING" for i in range(len(names))),
        stores=(indent + "    ").join(f"a{i}(v{i})" for i in range(len(names))),
        slow_stores="; ".join(f"a{i}(obj.get({name!r}))" for i, name in enumerate(names)),
        # the input row returned with the output fields added: its other fields as they came
        unchanged=" and ".join(f"same(obj.get({name!r}, c{j}), c{j})"
                               for j, name in enumerate(inputs) if name not in names) or "True",
    )
    namespace: dict[str, Any] = {"MISSING": object(), "enumerate": enumerate, "type": type,
                                 "list": list, "dict": dict, "len": len, "zip": zip,
                                 "range": range, "with_inputs": frozenset([*names, *inputs]),
                                 "same": lambda a, b: a is b or a == b}
    exec(compile(source, "<stepwell row loop>", "exec"), namespace)  # noqa: S102 - our template
    return namespace["row_loop"]


class ProcessorRun:
    """One run of a processor statement inside the worker."""

    def __init__(self, link: HostLink, start: dict[str, Any]):
        self.link = link
        self.start = start
        self.app_root = Path(start["app_root"])
        self.file = str(start["file"])
        self.path = self.app_root / self.file
        self.mode: str = start.get("mode") or "row"
        self.input: dict[str, Any] | None = start.get("input")
        self.output: str = start["output"]
        self.schema = OutputSchema(start["output_schema"])
        self.checkpoint_column: str | None = start.get("checkpoint_column")
        self.checkpoint = start.get("data_checkpoint")
        self.state: dict[str, Any] = dict(start.get("state") or {})
        self.sink = LogSink(link)
        self.log = StatementLog(self.sink)
        self.rows_out = 0  # rows handed to the host
        self.rows_built = 0  # output rows checked and converted (ahead of rows_out by one batch)
        self.executions = 0
        self.failed_executions: list[tuple[int | None, str]] = []
        #: in row mode, while the rows of a batch run: the input row being run
        self._running_row: Callable[[], int] | None = None
        self.position: tuple[int, Any] | None = None  # (table version, last patterns_id)
        self.last_output: pa.Table | None = None
        self.failure: BaseException | None = None
        self.statement: CompiledStatement | None = None
        self._loops: dict[tuple[str, ...], Callable[..., Any]] = {}

    # -- set-up ------------------------------------------------------------------
    def compile(self) -> bool:
        """Compile the statement; on a SyntaxError report it and return False."""
        source = self.path.read_text(encoding="utf-8")
        allowed = list(self.start.get("allowed_imports") or DEFAULT_ALLOWED_IMPORTS)
        extra = list(self.start.get("extra_imports") or [])
        if extra:
            self.sink.emit(
                "info",
                f"[stepwell] allowed_imports of this step adds to the default allow-list: "
                f"{', '.join(extra)}",
            )
        try:
            self.statement = compile_statement(source, str(self.path), allowed)
        except SyntaxError as exc:
            where = f"{self.file}, line {exc.lineno or 1}"
            text = exc.text.rstrip("\n") if exc.text else ""
            detail = f'  File "{self.file}", line {exc.lineno or 1}\n    {text.strip()}\n' if text else ""
            self.sink.flush()
            self.link.notify(
                "done",
                status="error",
                error=f"SyntaxError: {exc.msg} ({where})",
                traceback=f"{detail}SyntaxError: {exc.msg}\n",
            )
            return False
        return True

    def _capture_warnings(self) -> None:
        statement_file = str(self.path)
        sink = self.sink
        display = self.file

        def show(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                 line: Any = None) -> None:
            text = str(message)
            where = f"line {lineno}" if filename == statement_file else f"{Path(filename).name}:{lineno}"
            if issubclass(category, RuntimeWarning) and "was never awaited" in text:
                note = (
                    f"[stepwell] {display}, {where}: {text}: it never ran. Await it "
                    f"(e.g. `await sleep(1)`)"
                )
            else:
                note = f"[stepwell] {display}, {where}: {category.__name__}: {text}"
            sink.warn_once((text, filename, lineno), note)

        warnings.showwarning = show
        warnings.filterwarnings("always", message=r"coroutine .* was never awaited", category=RuntimeWarning)

    # -- running -----------------------------------------------------------------
    def execute(self) -> None:
        if not self.compile():
            return
        self._capture_warnings()
        install_audit_hook()
        # Row batches allocate many short-lived containers: keep what exists now out of
        # every collection and collect young objects less often (cycles are still found).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            self._check_checkpoint_column(None)
            try:
                asyncio.run(self._main())
            except TimeLimitReached as exc:  # (stopped while its event loop waited: in an await)
                if self._running_row is not None and not getattr(exc, "__notes__", None):
                    exc.add_note(f"input row {self._running_row()}")
                raise
            gc.collect()  # unawaited coroutines still referenced are reported now
            self.sink.report_repeats()
            if self.failure is not None:
                raise self.failure
            self.finish()
        except (StatementFailed, SchemaError) as exc:  # not a Python error of the user's code
            self.sink.flush()
            self.link.notify("done", status="error", error=str(exc), traceback=None)
        finally:
            self.sink.flush()

    async def _main(self) -> None:
        try:
            if self.input is None:
                await self._run_once([])
            elif self.mode == "bulk":
                await self._run_bulk()
            else:
                await self._run_rows()
        except BaseException as exc:  # re-raised outside the event loop, without its frames
            self.failure = exc

    def _check_checkpoint_column(self, input_names: list[str] | None) -> None:
        column = self.checkpoint_column
        if not column or column in self.schema.name_set:
            return
        if self.mode == "row" and self.input is not None:
            if input_names is None or column in input_names:
                return
            raise StatementFailed(
                f"checkpoint_column {column!r} is neither an output_schema field nor a column of "
                f"input table {self.input['table']!r} (columns: {', '.join(input_names)})"
            )
        raise StatementFailed(
            f"checkpoint_column {column!r} is not a field of output_schema "
            f"({', '.join(self.schema.names)})"
        )

    def _batches(self) -> Iterator[tuple[int, pa.RecordBatch]]:
        """New rows of the input table, in patterns_id order, after the committed position."""
        assert self.input is not None
        table = self.input["table"]
        position = self.input.get("position")
        after = [position["value"], None] if position else None
        return self.link.scan(table, [ID_COLUMN], after, BATCH_ROWS)

    def _input_columns(
        self, version: int, batch: pa.RecordBatch
    ) -> tuple[list[str], list[list[Any]]]:
        """The batch's columns as Python values (without patterns_id, JSON parsed);
        moves the input position to the batch's last row."""
        schema = batch.schema
        if ID_COLUMN not in schema.names:
            raise StatementFailed(
                f"input table {self.input['table']!r} has no {ID_COLUMN} column, so its new rows "
                f"cannot be tracked; processors read tables written by steps, webhooks or "
                f"`stepwell load`"
            )
        names = [name for name in schema.names if name != ID_COLUMN]
        columns = []
        for name in names:
            values = batch.column(schema.get_field_index(name)).to_pylist()
            field = schema.field(name)
            if field.metadata and field.metadata.get(b"stepwell.type") == _JSON_TYPE:
                values = [None if v is None else json.loads(v) for v in values]
            columns.append(values)
        last_id = batch.column(schema.get_field_index(ID_COLUMN))[-1].as_py()
        self.position = (version, last_id)
        return names, columns

    def _input_rows(self, version: int, batch: pa.RecordBatch) -> tuple[list[str], list[dict[str, Any]]]:
        """The batch as INPUT_DATA dicts (bulk mode)."""
        names, columns = self._input_columns(version, batch)
        if names:
            return names, list(map(_row_builder(names), *columns))
        return names, [{} for _ in range(batch.num_rows)]

    def _result_error(self, result: Any, where: str) -> StatementFailed:
        if result is None:
            return StatementFailed(
                f"the statement returned None{where}: it must end with `return <list of objects>`"
            )
        return StatementFailed(
            f"the statement returned {describe_value(result)}{where}, not a list: it must end "
            f"with `return <list of objects>`"
        )

    async def _call(self, rows: list[dict[str, Any]]) -> tuple[Any, bool]:
        """One execution; returns (result, failed-by-log.error)."""
        assert self.statement is not None
        errors = self.sink.errors
        result = await self.statement.function(rows, self.checkpoint, self.log, sleep)
        self.executions += 1
        if self.sink.errors != errors:
            self.failed_executions.append((None, self.sink.first_error or ""))
            return None, True
        if type(result) is not list:
            raise self._result_error(result, "")
        return result, False

    async def _run_once(self, rows: list[dict[str, Any]]) -> None:
        result, failed = await self._call(rows)
        if failed:
            return
        for first in range(0, len(result), BATCH_ROWS):
            self._write_objects(result[first : first + BATCH_ROWS], first)

    async def _run_bulk(self) -> None:
        rows: list[dict[str, Any]] = []
        names: list[str] | None = None
        for version, batch in self._batches():
            names, batch_rows = self._input_rows(version, batch)
            rows.extend(batch_rows)
        if not rows:
            self.sink.emit("info", "[stepwell] no new input rows: the statement did not run")
            return
        self._check_checkpoint_column(names)
        await self._run_once(rows)

    def _write_objects(self, objects: list[Any], first: int) -> None:
        """Bulk / no-input output: the returned objects are the output rows."""
        names, name_set = self.schema.names, self.schema.name_set
        columns: list[list[Any]] = [[] for _ in names]
        appends = list(zip(names, [c.append for c in columns], strict=True))
        for index, obj in enumerate(objects):
            if type(obj) is not dict or not obj.keys() <= name_set:
                raise self.schema.object_error(obj, f"output row {first + index}")
            for name, append in appends:
                append(obj.get(name))
        fields, arrays = self.schema.columns(columns, lambda i: f"output row {first + i}")
        self._write(pa.Table.from_arrays(arrays, schema=pa.schema(fields)))

    async def _run_rows(self) -> None:
        input_index = 0
        checked = False
        pending: list[pa.Table] = []  # checked output not yet handed to the host
        pending_rows = 0
        for version, batch in self._batches():
            # The next batch has arrived: only now hand the host the output so far, so
            # that it stores it while this batch is computed (not before it answers).
            if pending_rows >= WRITE_ROWS:
                self._write_all(pending)
                pending, pending_rows = [], 0
            names, inputs = self._input_columns(version, batch)
            if not checked:
                self._check_checkpoint_column(names)
                checked = True
            out_index, columns = await self._row_loop(names, inputs, batch.num_rows, input_index)
            if out_index:
                table = self._row_output(batch, names, out_index, columns, input_index)
                pending.append(table)
                pending_rows += table.num_rows
            input_index += batch.num_rows
        self._write_all(pending)
        if input_index == 0:
            self.sink.emit("info", "[stepwell] no new input rows: the statement did not run")

    async def _row_loop(
        self, names: list[str], inputs: list[list[Any]], count: int, first_input: int
    ) -> tuple[list[int], list[list[Any]]]:
        """The hot loop: one execution per row, results collected column by column."""
        assert self.statement is not None
        key = tuple(names)
        if key not in self._loops:
            self._loops[key] = _compile_row_loop(names, self.schema.names)
        columns: list[list[Any]] = [[] for _ in self.schema.names]
        out_index: list[int] = []
        sink = self.sink

        def failed(index: int) -> None:
            self.failed_executions.append((first_input + index, sink.first_error or ""))

        at = [0]  # the index of the row being run
        self._running_row = lambda: first_input + at[0]
        try:
            problem = await self._loops[key](
                inputs, count, self.statement.function, self.checkpoint, self.log, sleep, sink,
                failed, out_index, columns, self.schema.name_set, at,
            )
        except BaseException as exc:  # the statement raised (or was stopped): say on which row
            exc.add_note(f"input row {first_input + at[0]}")
            raise
        self._running_row = None
        if problem is not None:
            kind, index, value = problem
            if kind == "result":
                raise self._result_error(value, f" for input row {first_input + index}")
            label = f"output row {self.rows_built + len(out_index)} (input row {first_input + index})"
            raise self.schema.object_error(value, label, inputs=names)
        self.executions += count
        return out_index, columns

    def _row_output(
        self,
        batch: pa.RecordBatch,
        input_names: list[str],
        out_index: list[int],
        columns: list[list[Any]],
        first_input: int,
    ) -> pa.Table:
        """Row mode: each output row is its input row plus the returned fields
        (a returned field replaces an input column of the same name)."""
        first_out = self.rows_built

        def label(i: int) -> str:
            return f"output row {first_out + i} (input row {first_input + out_index[i]})"

        fields, arrays = self.schema.columns(columns, label)
        passed = [name for name in input_names if name not in self.schema.name_set]
        taken = pa.Table.from_batches([batch]).select(passed).take(pa.array(out_index, pa.int64()))
        table = pa.Table.from_arrays(
            [*taken.columns, *arrays], schema=pa.schema([*taken.schema, *fields])
        )
        self.rows_built += table.num_rows
        return table

    def _write_all(self, tables: list[pa.Table]) -> None:
        """Hand several output tables to the host, as one write when their types agree."""
        if len(tables) > 1 and all(t.schema.equals(tables[0].schema, check_metadata=True) for t in tables):
            tables = [pa.concat_tables(tables)]
        for table in tables:
            self._write(table)

    def _write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        # a notification: the host stores this batch while we compute the next one (a
        # failed write is reported as the answer to our next request)
        self.link.notify("write", table, table=self.output, mode="append", id_column=ID_COLUMN)
        self.rows_out += table.num_rows
        self.last_output = table

    # -- the end -----------------------------------------------------------------
    def finish(self) -> None:
        """Send ``done``: status, input position, DATA_CHECKPOINT and run info together."""
        failed = len(self.failed_executions)
        if failed and failed >= self.executions:
            raise StatementFailed(self._failure_text(failed))
        state = dict(self.state)
        if self.checkpoint_column and self.last_output is not None and self.last_output.num_rows:
            column = self.last_output.column(self.checkpoint_column)
            state[CHECKPOINT_KEY] = column[len(column) - 1].as_py()
        positions = []
        if self.input is not None:
            committed = self.input.get("position") or {}
            version, value = self.position or (committed.get("table_version"), committed.get("value"))
            if value is not None and version is not None:
                positions.append(
                    {
                        "table": self.input["table"],
                        "order_by": [ID_COLUMN],
                        "table_version": int(version),
                        "value": value,
                        "last_id": None,
                    }
                )
        if failed:
            status = "succeeded_with_errors"
        elif self.rows_out:
            status = "succeeded"
        else:
            status = "succeeded_no_data"
        info = {"executions": self.executions, "failed_executions": failed}
        self.sink.flush()
        self.link.notify(
            "done",
            status="ok",
            run_status=status,
            run_error=self._failure_text(failed) if failed else None,
            run_info=info,
            positions=positions,
            state=state,
        )

    def _failure_text(self, failed: int) -> str:
        row, message = self.failed_executions[0]
        first = f"input row {row}: {message}" if row is not None else message
        if self.executions <= 1:
            return f"log.error was called: {first}"
        return (
            f"log.error was called in {failed} of {self.executions} executions (their output "
            f"was not written); first: {first}"
        )


def run(link: HostLink, start: dict[str, Any]) -> None:
    """Entry point named in the ``start`` frame (``stepwell.runtimes.processor.worker:run``)."""
    ProcessorRun(link, start).execute()


__all__ = ["LogSink", "ProcessorRun", "SchemaError", "StatementFailed", "StatementLog", "run", "sleep"]
