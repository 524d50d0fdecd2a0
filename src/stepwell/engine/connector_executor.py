"""Host side of a connector run: list, compare, read in parallel, commit per partition.

A refresh goes like this:

1. **List.** One worker runs ``context`` + ``list_objects`` (recursively) and
   returns the leaves in a few batched round trips (:class:`ListingSession`).
   A prefix whose subtree was read in full at its current fingerprint (by the
   same code) is not listed again: the records below it stay as they are
   (:func:`skippable_prefixes`). Nothing is changed if the listing fails.
2. **Compare.** One query loads the stored partition records; a partition is
   read when it is new, its fingerprint changed, its last read failed, or the
   connector's *code hash* (connector file, parser, requirements file) changed.
   Partitions no longer listed lose their rows and records in one transaction.
3. **Read.** ``parallelism`` workers (default: the number of cores), each a
   sandboxed process of its own, take partitions from a shared queue
   (:class:`PartitionSession`). A worker streams each partition's rows to the
   host, which adds the ``_partition`` column and buffers them (in memory up
   to :data:`SPILL_BYTES`, then in a spill file in a private temp dir).
4. **Commit.** When a partition's rows are complete, one transaction deletes
   the partition's previous rows, inserts the new ones and stores its record
   (fingerprint, code hash, rows, duration, status). Commits are serialized
   by the host (one writer), so partitions never conflict with each other on
   either store; a crash at any point leaves every partition either as it was
   or fully replaced.

The first failing partition fails the run: no further partitions are handed
out, the ones in progress finish and commit, and the failed one keeps its
previous rows and fingerprint (its record says ``failed`` with the error, so
the next refresh reads it again).

At the end, each listed prefix whose whole subtree is now read at this
listing's fingerprints gets a record (status ``prefix``) with its fingerprint;
one with anything unread or failed below it keeps its old record, so the next
refresh lists it again (:func:`_record_prefixes`).
"""

from __future__ import annotations

import ast
import collections
import datetime as dt
import hashlib
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from stepwell.app.pyparse import parse_python
from stepwell.engine.logs import Redactor, RunLog, secret_strings
from stepwell.engine.staging import StagedRun
from stepwell.engine.worker_session import Outcome, WorkerSession
from stepwell.runtimes.connector.contract import MAX_DEPTH, READ_FUNCTIONS
from stepwell.runtimes.connector.worker import LIST_ENTRY, READ_ENTRY
from stepwell.sandbox.launcher import WorkerProcess, start_worker
from stepwell.sandbox.protocol import decode_table
from stepwell.store.base import PREFIX_STATUS, PartitionRecord

if TYPE_CHECKING:
    from stepwell.engine.runner import ActiveRun, Runner

#: Column holding each output row's partition name.
PARTITION_COLUMN = "_partition"
#: Bumped when stepwell's own reading of connectors changes what rows come out.
CODE_HASH_VERSION = b"stepwell-connector/1\n"
#: A partition's rows are kept in host memory up to this size, then spilled to disk.
SPILL_BYTES = 32 << 20
#: Rows inserted per statement at commit time.
COMMIT_ROWS = 262_144
#: Complete partitions waiting for the committer before workers have to wait.
COMMIT_QUEUE = 8
#: Ops each kind of connector worker may send.
_LISTING_OPS = frozenset({"log", "partitions", "listed", "done"})
_READING_OPS = frozenset(
    {"log", "write", "next_partition", "partition_done", "partition_failed", "done"}
)


class ConnectorSetupError(ValueError):
    """The connector step cannot run as configured; the message says what to change."""


def code_hash(app_root: Path, step: Any, requirements_file: str | None) -> str:
    """Content hash of what decides a partition's rows besides its data: the
    connector file and the app's modules it imports, the parser and the app's
    requirements file."""
    digest = hashlib.sha256(CODE_HASH_VERSION)
    connector = (app_root / step.file).resolve()
    digest.update(connector.read_bytes())
    root = app_root.resolve()
    for path in app_modules_used(app_root, connector):
        if path != connector:  # (a connector importing nothing hashes as it always did)
            digest.update(f"\nmodule {path.relative_to(root)}\n".encode())
            digest.update(path.read_bytes())
    digest.update(f"\nparser={step.parser or ''}\n".encode())
    if requirements_file:
        path = app_root / requirements_file
        digest.update(path.read_bytes() if path.exists() else b"<missing>")
    return digest.hexdigest()


def app_modules_used(app_root: Path, file: Path) -> list[Path]:
    """``file`` and the files of the app's own modules it imports, directly or
    through each other (found by reading their import statements; modules outside
    the app folder are not followed)."""
    root = app_root.resolve()
    found: dict[Path, None] = {}
    todo = [file.resolve()]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found[path] = None
        try:
            tree = parse_python(path.read_bytes(), filename=str(path))
        except (OSError, SyntaxError, ValueError):
            continue  # (the run itself reports a connector that does not parse)
        for name in _imported_names(tree, path, root):
            todo.extend(_module_files(root, name))
    return sorted(found, key=str)


def _imported_names(tree: ast.AST, path: Path, root: Path) -> list[str]:
    """Dotted names of the modules ``tree`` imports (relative ones resolved to names
    from the app folder; ``from a import b`` gives ``a`` and ``a.b``)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = path.parent
                for _ in range(node.level - 1):
                    package = package.parent
                try:
                    prefix = ".".join(package.relative_to(root).parts)
                except ValueError:
                    continue
                base = ".".join(p for p in (prefix, base) if p)
            names += [base] if base else []
            names += [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
    return names


def _module_files(root: Path, name: str) -> list[Path]:
    """The app folder's files of module ``name`` and of the packages above it."""
    files = []
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        base = root.joinpath(*parts[:depth])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                files.append(candidate.resolve())
    return files


def worker_options(runner: Runner, active: ActiveRun, sys_path: list[str]) -> dict[str, Any]:
    """Sandbox options of the step's workers, as the runner gives its own workers:
    the step's limits, its app environment readable, the store hidden."""
    return {
        "limits": active.context.worker_limits,
        "read_paths": list(sys_path),
        "hide_paths": runner._store_paths,
        "mode": runner.sandbox,
    }


# -- small thread-safe helpers ------------------------------------------------------


class SafeLog:
    """A run log shared by the threads serving the connector's workers."""

    def __init__(self, log: RunLog):
        self._log = log
        self._lock = threading.Lock()

    def add(self, level: str, lines: list[str]) -> None:
        with self._lock:
            self._log.add(level, lines)

    def flush(self) -> None:
        with self._lock:
            self._log.flush()


class WorkerGroup:
    """The workers of one connector run; ``kill`` stops them all (used by
    ``Runner.cancel``) and keeps new ones from starting."""

    def __init__(self) -> None:
        self._workers: list[WorkerProcess] = []
        self._lock = threading.Lock()
        self.killed = False

    def start(
        self, cwd: Path, env: dict[str, str] | None, options: Mapping[str, Any]
    ) -> WorkerProcess | None:
        with self._lock:
            if self.killed:
                return None
            worker = start_worker(cwd, env, **options)
            self._workers.append(worker)
            return worker

    def release(self, worker: WorkerProcess) -> None:
        with self._lock:
            self._workers = [w for w in self._workers if w is not worker]
        worker.close()

    def kill(self) -> None:
        with self._lock:
            self.killed = True
            workers = list(self._workers)
        for worker in workers:
            worker.kill()


class PartitionBuffer:
    """One partition's rows between arrival and commit: Arrow tables in memory
    up to ``limit`` bytes, then appended to Arrow IPC spill files."""

    def __init__(self, spill_dir: Path, limit: int = SPILL_BYTES):
        self.spill_dir = spill_dir
        self.limit = limit
        self.rows = 0
        self._segments: list[pa.Table | Path] = []
        self._memory = 0
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._writer_schema: pa.Schema | None = None
        self._sink: Any = None

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        if self._writer is None and self._memory + table.nbytes <= self.limit:
            self._segments.append(table)
            self._memory += table.nbytes
            return
        if self._writer is None:  # over the limit: everything from here on goes to disk
            held = [s for s in self._segments if isinstance(s, pa.Table)]
            self._segments = [s for s in self._segments if not isinstance(s, pa.Table)]
            self._memory = 0
            for part in held:
                self._spill(part)
        self._spill(table)

    def _spill(self, table: pa.Table) -> None:
        if self._writer is not None and table.schema != self._writer_schema:
            self._close_writer()
        if self._writer is None:
            fd, name = tempfile.mkstemp(prefix="partition-", suffix=".arrows", dir=self.spill_dir)
            os.close(fd)
            self._sink = pa.OSFile(name, "wb")
            self._writer = pa.ipc.new_stream(self._sink, table.schema)
            self._writer_schema = table.schema
            self._segments.append(Path(name))
        self._writer.write_table(table)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = self._writer_schema = None

    def _batches(self) -> Iterator[pa.RecordBatch]:
        self._close_writer()
        for segment in self._segments:
            if isinstance(segment, pa.Table):
                yield from segment.to_batches()
            else:
                with pa.memory_map(str(segment)) as source:
                    yield from pa.ipc.open_stream(source)

    def tables(self, rows: int = COMMIT_ROWS) -> Iterator[pa.Table]:
        """The rows in arrival order, as tables of about ``rows`` rows with one schema."""
        pending: list[pa.RecordBatch] = []
        count = 0
        for batch in self._batches():
            if pending and (batch.schema != pending[0].schema or count >= rows):
                yield pa.Table.from_batches(pending)
                pending, count = [], 0
            pending.append(batch)
            count += batch.num_rows
        if pending:
            yield pa.Table.from_batches(pending)

    def close(self) -> None:
        self._close_writer()
        for segment in self._segments:
            if isinstance(segment, Path):
                segment.unlink(missing_ok=True)
        self._segments = []
        self._memory = 0


# -- the listing worker ------------------------------------------------------------


class ListingSession(WorkerSession):
    """Serves the listing worker: collects the leaves, the read function's name and
    the schema from ``infer_schema``. It commits nothing."""

    def __init__(self, *args: Any, skip_prefixes: dict[str, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.leaves: list[dict[str, Any]] = []
        #: the prefix each leaf was listed under (None: the root), in step with leaves
        self.parents: list[str | None] = []
        #: prefixes met: name, fingerprint, parent, skipped (not listed again)
        self.prefixes: list[dict[str, Any]] = []
        self.skip_prefixes = skip_prefixes
        self._names: set[str] = set()
        self.read_function: str | None = None
        self.schema: pa.Schema | None = None
        self.listed = False

    def _dispatch(self, op: Any, message: dict, body: bytes) -> tuple[dict, bytes]:
        if op not in _LISTING_OPS:
            return {"ok": False, "error": f"request {op!r} is not available while listing"}, b""
        return super()._dispatch(op, message, body)

    def op_partitions(self, message: dict, _body: bytes) -> dict:
        leaves, parents = message.get("leaves") or [], message.get("parents") or []
        if len(parents) != len(leaves):
            raise ValueError("every listed partition needs its parent prefix")
        for leaf, parent in zip(leaves, parents, strict=True):
            name = leaf.get("name") if isinstance(leaf, dict) else None
            if not isinstance(name, str) or not isinstance(leaf.get("fingerprint"), str):
                raise ValueError(f"malformed partition {leaf!r}")
            if name in self._names:
                raise ValueError(f"partition {name!r} was listed twice")
            if parent is not None and not isinstance(parent, str):
                raise ValueError(f"malformed parent of partition {name!r}")
            self._names.add(name)
            self.leaves.append(leaf)
            self.parents.append(parent)
        for prefix in message.get("prefixes") or []:
            name = prefix.get("name") if isinstance(prefix, dict) else None
            fingerprint = prefix.get("fingerprint") if isinstance(prefix, dict) else None
            if not isinstance(name, str) or not isinstance(fingerprint, str | None):
                raise ValueError(f"malformed prefix {prefix!r}")
            if prefix.get("skipped") and self.skip_prefixes.get(name) != fingerprint:
                raise ValueError(f"prefix {name!r} was skipped without being read in full before")
            self.prefixes.append(
                {"name": name, "fingerprint": fingerprint, "parent": prefix.get("parent"),
                 "skipped": bool(prefix.get("skipped"))}
            )  # fmt: skip
        return {}

    def op_listed(self, message: dict, body: bytes) -> dict:
        name = message.get("read_function")
        if name not in READ_FUNCTIONS:
            raise ValueError(f"unknown read function {name!r}")
        self.read_function = name
        self.schema = pa.ipc.read_schema(pa.py_buffer(body)) if body else None
        self.listed = True
        return {}

    def op_done(self, message: dict, _body: bytes) -> dict:
        if message.get("status") == "ok" and self.listed:
            self._done = Outcome("succeeded")
        else:
            self._done = Outcome(
                "failed",
                self.redact(str(message.get("error") or "the listing ended without a result")),
                self.redact(message.get("traceback")),
            )
        return {}


# -- the partition workers ------------------------------------------------------------


@dataclass
class Job:
    """One partition being read."""

    leaf: dict[str, Any]
    old: PartitionRecord | None
    buffer: PartitionBuffer
    started: float = field(default_factory=time.monotonic)
    #: seconds from handing the partition out to its last row arriving
    read_seconds: float | None = None
    #: a host-side problem with the rows received (the partition fails at its end)
    error: str | None = None

    def elapsed(self) -> float:
        seconds = self.read_seconds
        return round(time.monotonic() - self.started if seconds is None else seconds, 6)

    @property
    def name(self) -> str:
        return self.leaf["name"]


class PartitionSession(WorkerSession):
    """Serves one reading worker: hands out partitions, receives their rows and
    has each one committed (or recorded as failed) when the worker ends it."""

    def __init__(self, refresh: Refresh, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.refresh = refresh
        self.job: Job | None = None

    def _dispatch(self, op: Any, message: dict, body: bytes) -> tuple[dict, bytes]:
        if op not in _READING_OPS:
            return {"ok": False, "error": f"request {op!r} is not available to a connector"}, b""
        return super()._dispatch(op, message, body)

    def _current(self, message: dict) -> Job:
        job = self.job
        if job is None or message.get("partition") != job.name:
            raise ValueError(f"partition {message.get('partition')!r} is not being read here")
        return job

    def op_next_partition(self, _message: dict, _body: bytes) -> dict:
        if self.job is not None:
            raise ValueError(f"partition {self.job.name!r} is still being read")
        self.job = self.refresh.next_job()
        return {"partition": self.job.leaf if self.job is not None else None}

    def op_write(self, message: dict, body: bytes) -> dict:
        job = self._current(message)
        if job.error is not None:
            return {}
        try:
            data = decode_table(body)
            column = pa.array([job.name] * data.num_rows, pa.string())
            if PARTITION_COLUMN in data.column_names:
                if not self.refresh.said_partition_replaced:
                    self.refresh.said_partition_replaced = True
                    self.refresh.log.add("warn", [
                        f"[stepwell] partition {job.name!r}: the rows' own {PARTITION_COLUMN} "
                        f"column was replaced by the partition's name (stepwell keeps each row's "
                        f"partition there); return that value under another column name"
                    ])  # fmt: skip
                index = data.column_names.index(PARTITION_COLUMN)
                data = data.set_column(index, pa.field(PARTITION_COLUMN, pa.string()), column)
            else:
                data = data.append_column(pa.field(PARTITION_COLUMN, pa.string()), column)
            job.buffer.add(data)
        except Exception as exc:  # reported when the worker ends the partition
            job.error = f"receiving rows of partition {job.name!r} failed: {exc}"
            return {}
        self.rows_in += data.num_rows
        self.refresh.received(data.num_rows)
        return {}

    def op_partition_done(self, message: dict, _body: bytes) -> dict:
        job = self._current(message)
        self.job = None
        job.read_seconds = time.monotonic() - job.started
        if job.error is not None:
            self.refresh.fail(job, job.error)
        else:
            self.refresh.submit(job)  # committed by the committer thread, in order
        return {}

    def op_partition_failed(self, message: dict, _body: bytes) -> dict:
        job = self._current(message)
        self.job = None
        self.refresh.fail(
            job,
            self.redact(str(message.get("error") or "the read function failed")),
            self.redact(message.get("traceback")),
        )
        return {}

    def op_done(self, message: dict, _body: bytes) -> dict:
        if message.get("status") == "ok":
            self._done = Outcome("succeeded")
        else:
            self._done = Outcome(
                "failed",
                self.redact(str(message.get("error") or "the worker failed")),
                self.redact(message.get("traceback")),
            )
        return {}


class Refresh:
    """The shared state of one refresh: the queue of partitions to read, the
    committer (one thread, the only writer: complete partitions wait in a short
    queue, so workers go on reading while earlier partitions commit), and the
    counts."""

    def __init__(
        self,
        runner: Runner,
        active: ActiveRun,
        *,
        output: str,
        code_hash: str,
        jobs: list[tuple[dict[str, Any], PartitionRecord | None]],
        schema: pa.Schema | None,
        log: SafeLog,
        group: WorkerGroup,
        spill_dir: Path,
    ):
        self.runner = runner
        self.active = active
        self.store = runner.store
        self.output = output
        self.code_hash = code_hash
        self.total = len(jobs)
        self.queue = collections.deque(jobs)
        self.declared = {f.name: f.type for f in schema} if schema is not None else None
        self.log = log
        self.group = group
        self.spill_dir = spill_dir
        self.lock = threading.Lock()
        self.commit_lock = threading.Lock()
        self._complete: queue.Queue[Job | None] = queue.Queue(maxsize=COMMIT_QUEUE)
        self._committer: threading.Thread | None = None
        self.stopping = False
        #: the log said that rows came with their own _partition column
        self.said_partition_replaced = False
        #: delete by ``_partition`` even for partitions without stored rows
        self.always_delete = False
        self.succeeded = 0
        self.failed = 0
        self.rows_in = 0
        self.rows_out = 0
        self.failures: list[tuple[str, str, str | None]] = []
        self._partition_hook = getattr(runner.listener, "partition_progress", None)
        self._last_progress = 0.0
        #: the prefix each partition was listed under (recorded with it)
        self.parents: dict[str, str | None] = {}

    # -- handing out work
    def next_job(self) -> Job | None:
        with self.lock:
            if self.stopping or self.group.killed or not self.queue:
                return None
            leaf, old = self.queue.popleft()
        job = Job(leaf, old, PartitionBuffer(self.spill_dir))
        self._notify(
            PartitionRecord(
                self.active.step.name, job.name, leaf["fingerprint"], self.code_hash, 0,
                None, "running", None, self.active.run.id, parent=self.parents.get(job.name),
            )
        )
        return job

    @property
    def skipped(self) -> int:
        return len(self.queue)

    def received(self, rows: int) -> None:
        with self.lock:
            self.rows_in += rows
            now = time.monotonic()
            if now - self._last_progress < 0.1:
                return
            self._last_progress = now
            rows_in, rows_out = self.rows_in, self.rows_out
        self.runner.listener.progress(self.active.run, rows_in, rows_out)

    # -- ending partitions
    def start_committer(self) -> None:
        """Start the thread committing complete partitions (see :meth:`submit`)."""
        active = self.active
        staged = StagedRun(
            self.store, active.run.id, active.step.name, on_commit=active.staged.on_commit
        )

        def commit_loop() -> None:
            while (job := self._complete.get()) is not None:
                self.commit(job, staged)

        self._committer = threading.Thread(
            target=commit_loop, name="stepwell-connector-commit", daemon=True
        )
        self._committer.start()

    def submit(self, job: Job) -> None:
        """Hand a partition whose rows are complete to the committer (waits while
        :data:`COMMIT_QUEUE` partitions are already waiting)."""
        self._complete.put(job)

    def finish_commits(self) -> None:
        """Commit what was submitted, then stop the committer."""
        if self._committer is not None:
            self._complete.put(None)
            self._committer.join()
            self._committer = None

    def commit(self, job: Job, staged: StagedRun) -> bool:
        """Replace the partition's rows and record its fingerprint, in one transaction."""
        step = self.active.step.name
        record = PartitionRecord(
            step, job.name, job.leaf["fingerprint"], self.code_hash, job.buffer.rows,
            job.elapsed(), "succeeded", None, self.active.run.id,
            parent=self.parents.get(job.name),
        )
        try:
            with self.commit_lock:
                try:
                    tx = staged.tx()
                    if self.always_delete or (job.old is not None and job.old.rows):
                        tx.delete_where(self.output, PARTITION_COLUMN, [job.name])
                    for table in job.buffer.tables():
                        staged.write(self.output, table, schema=self.declared)
                    tx.set_partition(record)
                    staged.commit(None, None)
                except BaseException:
                    staged.rollback()
                    raise
        except Exception as exc:
            self.fail(job, f"storing partition {job.name!r} failed: {exc}")
            return False
        finally:
            job.buffer.close()
        with self.lock:
            self.succeeded += 1
            self.rows_out += record.rows
        self.log.add(
            "info",
            [f"[stepwell] partition {job.name!r}: {record.rows:,} rows in "
             f"{record.duration_seconds:.2f}s"],
        )
        self._notify(record)
        return True

    def fail(self, job: Job, error: str, traceback: str | None = None) -> None:
        """Record that ``job`` failed; its previous rows and fingerprint stay."""
        job.buffer.close()
        old = job.old
        record = PartitionRecord(
            self.active.step.name,
            job.name,
            old.fingerprint if old else None,
            old.code_hash if old else None,
            old.rows if old else 0,
            job.elapsed(),
            "failed",
            error,
            self.active.run.id,
            parent=self.parents.get(job.name),
        )
        with self.lock:
            self.failed += 1
            self.failures.append((job.name, error, traceback))
            self.stopping = True
        self.log.add("error", [f"[stepwell] partition {job.name!r} failed: {error}"])
        try:
            with self.commit_lock, self.store.transaction() as tx:
                tx.set_partition(record)
                tx.commit()
        except Exception as exc:
            self.log.add("error", [f"[stepwell] could not record the failure: {exc}"])
        self._notify(record)

    def _notify(self, record: PartitionRecord) -> None:
        if self._partition_hook is None:
            return
        with self.lock:
            done = self.succeeded + self.failed
        try:
            self._partition_hook(self.active.run, record, done, self.total)
        except Exception:  # a display problem must not fail the run
            pass


# -- the run ------------------------------------------------------------------------


def run_connector(runner: Runner, active: ActiveRun) -> Outcome:
    """Execute one refresh of a connector step (see the module docstring)."""
    from stepwell.app import secrets

    step = active.step
    app_root = Path(runner.app.root)
    output = step.output
    if not output:
        raise ConnectorSetupError(
            "a connector step needs `output:` naming the table it fills (e.g. `output: raw_files`)"
        )
    credentials = None
    if step.credentials is not None:
        credentials = secrets.resolve(step.credentials, app_root, runner.environ, step=step.name)
        active.redact.values = Redactor([*active.redact.values, *secret_strings(credentials)]).values
    requirements = getattr(runner.app, "requirements_file", None)
    sys_path = runner._environment(active.log)
    hashed = code_hash(app_root, step, requirements)
    log = SafeLog(active.log)
    group = WorkerGroup()
    runner.attach_worker(active.run.id, group)
    time_limit = active.context.time_limit
    deadline = active.began + time_limit if time_limit else None
    limit_note = f" (timeout {time_limit:g}s)" if time_limit else ""
    base = {
        "op": "start",
        "run_id": active.run.id,
        "step": step.name,
        "app_root": str(app_root),
        "file": step.file,
        "code": runner.bytecode.for_node(step.file),
        "sys_path": sys_path,
        "parser": step.parser,
        "time_limit": time_limit,
        "parameters": active.context.parameters,
    }

    # 1. list (prefixes whose subtree was read in full at their fingerprint are not listed again)
    records = {p.name: p for p in runner.store.get_partitions(step.name, prefixes=True)}
    skip = skippable_prefixes(records, hashed)
    listing_staged = StagedRun(runner.store, active.run.id, step.name)
    options = worker_options(runner, active, sys_path)
    worker = group.start(app_root, None, options)
    if worker is None:
        return Outcome("cancelled", "cancelled before the listing started")
    if worker.notes:  # isolation that is not available here (the same for every worker)
        log.add("warn", list(worker.notes))
    try:
        listing = ListingSession(
            runner.store, listing_staged, worker, log, active.redact,
            deadline=deadline, limit_note=limit_note, skip_prefixes=skip,
        )
        outcome = listing.serve(
            {**base, "entry": LIST_ENTRY, "credentials": credentials, "skip_prefixes": skip}
        )
    finally:
        group.release(worker)
    if outcome.status != "succeeded":
        outcome.error = f"listing failed: {outcome.error}"
        return outcome

    # 2. compare with what is stored
    stored = {name: p for name, p in records.items() if p.status != PREFIX_STATUS}
    skipped = {p["name"] for p in listing.prefixes if p["skipped"]}
    kept = under_prefixes(records, skipped)  # as they are: their prefix is unchanged
    kept_leaves = sum(1 for name in kept if name in stored)
    notes, always_delete = _check_output(runner, active, output, stored)
    listed = {leaf["name"] for leaf in listing.leaves} | kept
    removed = [name for name in stored if name not in listed]
    listed_prefixes = {p["name"] for p in listing.prefixes}
    gone_prefixes = [
        name for name, p in records.items()
        if p.status == PREFIX_STATUS and name not in listed_prefixes and name not in kept
    ]  # fmt: skip
    jobs: list[tuple[dict[str, Any], PartitionRecord | None]] = []
    new = changed = 0
    for leaf in listing.leaves:
        old = stored.get(leaf["name"])
        if old is None:
            new += 1
        elif (
            old.status != "succeeded"
            or old.fingerprint != leaf["fingerprint"]
            or old.code_hash != hashed
        ):
            changed += 1
        else:
            continue
        jobs.append((leaf, old))
    unchanged = len(listing.leaves) - len(jobs) + kept_leaves
    code_changed = any(p.code_hash != hashed for p in stored.values() if p.status == "succeeded")
    if code_changed:
        notes.append("the connector's code changed: every partition is read again")
    parallelism = min(step.parallelism or os.cpu_count() or 1, max(len(jobs), 1))
    log.add(
        "info",
        [
            *(f"[stepwell] {note}" for note in notes),
            f"[stepwell] {len(listing.leaves) + kept_leaves:,} partitions: {new:,} new, "
            f"{changed:,} changed, {unchanged:,} unchanged"
            + (f" ({kept_leaves:,} of the unchanged under {len(skipped):,} unchanged "
               f"prefix{'es' if len(skipped) != 1 else ''}, not listed again)" if skipped else "")
            + f", {len(removed):,} removed"
            + f"; read with {listing.read_function}"
            + (f" by {parallelism} worker{'s' if parallelism > 1 else ''}" if jobs else ""),
        ],
    )

    # 3. the output table's schema, and partitions that are gone
    if listing.schema is not None:
        _create_output(runner, active, output, listing.schema)
    if removed or gone_prefixes:
        with runner.store.transaction() as tx:
            if any(stored[name].rows for name in removed):
                tx.delete_where(output, PARTITION_COLUMN, removed)
            for name in [*removed, *gone_prefixes]:
                tx.delete_partition(step.name, name)
            tx.commit()

    # 4. read the partitions
    spill_dir = Path(tempfile.mkdtemp(prefix="stepwell-connector-"))
    refresh = Refresh(
        runner, active, output=output, code_hash=hashed, jobs=jobs, schema=listing.schema,
        log=log, group=group, spill_dir=spill_dir,
    )
    refresh.always_delete = always_delete
    refresh.parents = {
        leaf["name"]: parent for leaf, parent in zip(listing.leaves, listing.parents, strict=True)
    }
    outcomes: list[Outcome] = []
    try:
        if jobs:
            start = {
                **base,
                "entry": READ_ENTRY,
                "credentials": credentials,
                "schema": listing.schema.serialize().to_pybytes() if listing.schema else None,
            }
            env = (
                {"SPARK_LOCAL_IP": "127.0.0.1"}
                if listing.read_function == "read_spark_dataframe"
                else None
            )
            threads = [
                threading.Thread(
                    target=_serve_partitions,
                    args=(refresh, app_root, dict(start), env, options, deadline, limit_note,
                          outcomes),
                    name=f"stepwell-connector-{i}",
                    daemon=True,
                )
                for i in range(parallelism)
            ]
            refresh.start_committer()
            try:
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            finally:
                refresh.finish_commits()
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    # 5. prefixes whose subtree is now read in full; the run's result
    _record_prefixes(runner.store, step.name, active.run.id, listing, hashed)
    counts = {
        "listed": len(listing.leaves),
        "unchanged_prefixes": len(skipped),
        "under_unchanged_prefixes": kept_leaves,
        "new": new,
        "changed": changed,
        "unchanged": unchanged,
        "removed": len(removed),
        "read": refresh.succeeded + refresh.failed,
        "succeeded": refresh.succeeded,
        "failed": refresh.failed,
        "skipped": refresh.skipped,
        "parallelism": parallelism if jobs else 0,
    }
    info = {"partitions": counts, "read_function": listing.read_function, "code_hash": hashed[:16]}
    active.staged.rows_out = active.staged.committed_rows_out = refresh.rows_out
    bad = [o for o in outcomes if o.status != "succeeded"]
    if refresh.failures or bad or refresh.skipped:
        runner.store.update_run(
            active.run.id, info=info, rows_in=refresh.rows_in, rows_out=refresh.rows_out
        )
        return _failure(refresh, bad)
    status = "succeeded" if jobs or removed else "succeeded_no_data"
    log.flush()
    active.staged.commit(
        None,
        None,
        run_fields={
            "status": status,
            "ended_at": dt.datetime.now(dt.UTC),
            "rows_in": refresh.rows_in,
            "rows_out": refresh.rows_out,
            "info": info,
        },
    )
    return Outcome(status, info=info)


# -- prefixes ----------------------------------------------------------------------------


def _ancestors(name: str, records: dict[str, PartitionRecord]) -> list[str]:
    """The prefixes ``name`` was recorded under, nearest first."""
    chain: list[str] = []
    parent = records[name].parent if name in records else None
    while parent is not None and len(chain) < MAX_DEPTH:
        chain.append(parent)
        parent = records[parent].parent if parent in records else None
    return chain


def skippable_prefixes(records: dict[str, PartitionRecord], code_hash: str) -> dict[str, str]:
    """``{prefix: fingerprint}`` of the prefixes that need not be listed again: each
    was recorded by this code at that fingerprint, and every partition recorded
    under it (at any depth) was last read successfully by this code."""
    incomplete: set[str] = set()
    for name, record in records.items():
        done = record.code_hash == code_hash and record.status in ("succeeded", PREFIX_STATUS)
        if not done:
            incomplete.update(_ancestors(name, records))
            incomplete.add(name)
    return {
        name: record.fingerprint
        for name, record in records.items()
        if record.status == PREFIX_STATUS and record.fingerprint is not None
        and record.code_hash == code_hash and name not in incomplete
    }  # fmt: skip


def under_prefixes(records: dict[str, PartitionRecord], prefixes: set[str]) -> set[str]:
    """Names of the records below any of ``prefixes`` (at any depth)."""
    if not prefixes:
        return set()
    return {name for name in records if prefixes.intersection(_ancestors(name, records))}


def _record_prefixes(
    store: Any, step: str, run_id: str, listing: ListingSession, code_hash: str
) -> None:
    """Record the listed prefixes whose whole subtree is now read at this listing's
    fingerprints (so the next refresh may skip them while they stay unchanged).
    A prefix with a partition still unread or failed below it keeps its old record,
    so the next refresh lists it again."""
    if not listing.prefixes:
        return
    final = {p.name: p for p in store.get_partitions(step)}
    complete: dict[str | None, bool] = collections.defaultdict(lambda: True)
    for leaf, parent in zip(listing.leaves, listing.parents, strict=True):
        record = final.get(leaf["name"])
        if not (
            record is not None and record.status == "succeeded"
            and record.fingerprint == leaf["fingerprint"] and record.code_hash == code_hash
        ):  # fmt: skip
            complete[parent] = False
    # the listing is depth first, so in reverse every prefix comes after its subprefixes
    done = []
    for prefix in reversed(listing.prefixes):
        name = prefix["name"]
        if prefix["skipped"]:
            continue
        if complete[name]:
            done.append(prefix)
        else:
            complete[prefix["parent"]] = False
    if done:
        with store.transaction() as tx:
            for p in done:
                tx.set_partition(PartitionRecord(
                    step, p["name"], p["fingerprint"], code_hash, status=PREFIX_STATUS,
                    run_id=run_id, parent=p["parent"],
                ))  # fmt: skip
            tx.commit()


def _serve_partitions(
    refresh: Refresh,
    app_root: Path,
    start: dict[str, Any],
    env: dict[str, str] | None,
    options: Mapping[str, Any],
    deadline: float | None,
    limit_note: str,
    outcomes: list[Outcome],
) -> None:
    """One reading worker, from start to end (runs in its own thread)."""
    active = refresh.active
    # the session's own staged run stays empty: partitions commit in the committer
    staged = StagedRun(refresh.store, active.run.id, active.step.name)
    try:
        worker = refresh.group.start(app_root, env, options)
    except Exception as exc:
        outcomes.append(Outcome("failed", f"could not start a worker: {exc}"))
        return
    if worker is None:
        return
    session: PartitionSession | None = None
    try:
        session = PartitionSession(
            refresh, refresh.store, staged, worker, refresh.log, active.redact,
            deadline=deadline, limit_note=limit_note,
        )
        outcome = session.serve(start)
    except Exception as exc:  # never leave a thread's failure unreported
        outcome = Outcome("failed", f"serving a connector worker failed: {exc}")
    finally:
        refresh.group.release(worker)
    if session is not None and session.job is not None:
        job, session.job = session.job, None
        refresh.fail(job, outcome.error or "the worker ended in the middle of the partition")
    outcomes.append(outcome)


def _failure(refresh: Refresh, bad: list[Outcome]) -> Outcome:
    """The run's failed outcome: the first partition error, or the first worker's."""
    status = "failed"
    for candidate in ("timed_out", "killed", "cancelled"):
        if any(o.status == candidate for o in bad):
            status = candidate
            break
    summary = (
        f"{refresh.succeeded} partitions committed, {refresh.failed} failed"
        + (f", {refresh.skipped} not read" if refresh.skipped else "")
    )
    if refresh.failures:
        name, error, traceback = refresh.failures[0]
        return Outcome(status, f"partition {name!r} failed: {error} ({summary})", traceback)
    first = bad[0] if bad else Outcome("failed", "the workers stopped before every partition was read")
    return Outcome(status, f"{first.error} ({summary})", first.traceback)


def _check_output(
    runner: Runner,
    active: ActiveRun,
    output: str,
    stored: dict[str, PartitionRecord],
) -> tuple[list[str], bool]:
    """Compare the output table with the partition records (their row counts add
    up to the table's when nothing else touched it). Returns log notes and
    whether every partition's old rows must be deleted before its new ones go in.

    - the table was dropped or reset while records remain: forget the records
      (one transaction) so every partition is read again;
    - the table has rows but no records exist (records lost, or a table filled
      before): delete by ``_partition`` for every partition read;
    - any other difference is reported, not acted on.
    """
    expected = sum(p.rows for p in stored.values())
    info = runner.store.table_info(output)
    actual = info.row_count if info is not None else 0
    if actual == expected:
        return [], False
    if actual == 0:
        with runner.store.transaction() as tx:
            for name in stored:
                tx.delete_partition(active.step.name, name)
            tx.commit()
        stored.clear()
        return [f"table {output!r} is empty or gone: every partition is read again"], False
    if not stored:
        return [], True
    return [
        f"warning: table {output!r} holds {actual:,} rows but the partition records account "
        f"for {expected:,} (was it changed by something else?)"
    ], True


def _create_output(runner: Runner, active: ActiveRun, output: str, schema: pa.Schema) -> None:
    """Create (or widen) the output table with the schema from ``infer_schema``."""
    fields = list(schema)
    if PARTITION_COLUMN not in schema.names:
        fields.append(pa.field(PARTITION_COLUMN, pa.string()))
    staged = StagedRun(runner.store, active.run.id, active.step.name)
    try:
        staged.write(output, pa.schema(fields).empty_table())
        staged.commit(None, None)
    except BaseException:
        staged.rollback()
        raise


__all__ = [
    "PARTITION_COLUMN",
    "ConnectorSetupError",
    "ListingSession",
    "PartitionBuffer",
    "PartitionSession",
    "Refresh",
    "code_hash",
    "run_connector",
]
