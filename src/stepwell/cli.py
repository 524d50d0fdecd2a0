"""The ``stepwell`` command line (DESIGN section 7a)."""

from __future__ import annotations

import gc
import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from stepwell.cli_common import (
    AppArg,
    CliError,
    JsonOpt,
    SandboxOpt,
    StoreOpt,
    one_line,
    printable,
    show_plugin_output,
)
from stepwell.cli_common import use_sandbox as _use_sandbox
from stepwell.cli_entry import INTERRUPTED, run_command


class _PassedOn(Exception):
    """A KeyboardInterrupt or BrokenPipeError on its way through typer (see
    :class:`_Commands`); :func:`dispatch` raises it again."""


@contextmanager
def _past_typer() -> Iterator[None]:
    try:
        yield
    except (KeyboardInterrupt, BrokenPipeError) as exc:
        raise _PassedOn() from exc


class _Commands(typer.core.TyperGroup):
    """The commands, with a Ctrl-C while the command line is parsed or a command
    runs passed on to ``cli_entry`` ("aborted", exit 130) and a broken pipe (to a
    server) reported by :func:`dispatch`: typer made the one a silent exit 130 and
    the other a silent exit 1."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _past_typer():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _past_typer():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    help="Run Python steps on data: sandboxed, incremental, exactly once.",
    pretty_exceptions_enable=False,
)

_verbose = False

@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks")] = False,
) -> None:
    global _verbose
    _verbose = verbose


def _console():
    from rich.console import Console

    # Piped output (scripts, CI logs) gets wide lines rather than truncated ids.
    return Console() if sys.stdout.isatty() else Console(width=200)


def _load(app_path: str):
    """Load the app, printing its warnings."""
    from stepwell.app import load_app

    spec = load_app(app_path)
    for warning in spec.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return spec


@contextmanager
def _opened(app_path: str, store_url: str | None):
    """Load the app and open its store."""
    from stepwell.store import open_store

    spec = _load(app_path)
    store = open_store(store_url or spec.store, spec.root)
    try:
        yield spec, store
    finally:
        store.close()


@contextmanager
def _backend(app_path: str, store_url: str | None, *, warm_workers: bool = False):
    """Load the app; yield it with its data: a running server's API while
    `stepwell serve` runs for it (DESIGN 7a), else the store opened here.
    ``warm_workers`` starts the sandbox's fork-server at once when the app has
    Python steps, so its start overlaps with opening the store."""
    from stepwell.cli_backend import open_backend

    spec = _load(app_path)
    if warm_workers:
        from stepwell.sandbox.policy import sandbox_mode

        if sandbox_mode() != "none":
            from stepwell.engine.preload import prestart_forkservers

            prestart_forkservers(spec)
    with open_backend(spec, store_url) as backend:
        yield spec, backend


def _print_json(data: Any) -> None:
    from stepwell.store.schema import jsonable

    print(json.dumps(jsonable(data), indent=2))


# -- init -------------------------------------------------------------------
@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to create the app in")],
    style: Annotated[str, typer.Option(
        help="node | processor | connector | action | plugin")] = "node",
) -> None:
    """Scaffold a new app."""
    from stepwell.scaffold import next_command, scaffold

    try:
        created = scaffold(directory, style)
    except (ValueError, FileExistsError) as exc:
        raise CliError(str(exc)) from None
    _console().print(f"Created [bold]{directory}[/] ({', '.join(created)}). Next: "
                     f"[cyan]{next_command(style, str(directory))}[/]", highlight=False)


# -- run --------------------------------------------------------------------
ExecutorOpt = Annotated[str, typer.Option(
    help="local (the fork-server pool here) or ray (each run a Ray task; needs a "
         "PostgreSQL --store)")]  # fmt: skip
RayAddressOpt = Annotated[str | None, typer.Option(
    help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")]  # fmt: skip


@app.command()
def run(
    app_path: AppArg = ".",
    steps: Annotated[list[str] | None, typer.Argument(help="Steps to run (default: all)")] = None,
    store: StoreOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    sandbox: SandboxOpt = None,
) -> None:
    """Run steps once, in dependency order, with a progress display."""
    _use_sandbox(sandbox)
    if executor == "ray":
        _run_on_ray(app_path, steps, store, ray_address, sandbox)
        return
    if executor != "local":
        raise CliError(f"unknown executor {executor!r}; use --executor local or --executor ray")
    with _backend(app_path, store, warm_workers=True) as (spec, backend):
        # imported once the fork-server is starting: it warms up meanwhile
        from stepwell.cli_backend import RunInterrupted
        from stepwell.cli_progress import RunProgress
        from stepwell.engine.app_run import select_steps

        # what is loaded by now stays: keep the garbage collector from scanning it
        # again and again while the steps run
        gc.freeze()
        names = select_steps(spec, steps)
        if not names:
            print(f"nothing to run: {spec.file} declares no steps (add them under `steps:`)",
                  file=sys.stderr)  # fmt: skip
            return
        console = _console()
        interrupted: RunInterrupted | None = None
        with RunProgress(console, total_steps=len(names)) as progress:
            try:
                runs = backend.run_steps(names, progress)
            except RunInterrupted as stop:
                interrupted, runs = stop, stop.runs
    if interrupted is not None:
        _report_interrupted(runs, interrupted.note)
    _report_failures(app_path, runs, store)


def _report_interrupted(runs: list[Any], note: str = "") -> None:
    """The line saying what a Ctrl-C stopped; exit 130 (``INTERRUPTED``)."""
    cancelled = [r for r in runs if r.status == "cancelled"]
    what = note
    if cancelled and cancelled[-1].started_at is None:
        what = f"step {cancelled[-1].step!r}'s queued run {cancelled[-1].id} cancelled; "
    elif len(cancelled) > 1:
        what = (f"steps {', '.join(repr(r.step) for r in cancelled)} cancelled (runs "
                f"{', '.join(r.id for r in cancelled)}), nothing since their last commit "
                "points kept; ")  # fmt: skip
    elif cancelled:
        what = (f"step {cancelled[-1].step!r} cancelled (run {cancelled[-1].id}), nothing "
                "since its last commit point kept; ")  # fmt: skip
    print(f"interrupted: {what}later steps not run", file=sys.stderr)
    raise typer.Exit(INTERRUPTED)


def _run_on_ray(app_path: str, steps: list[str] | None, store: str | None,
                address: str | None, sandbox: str | None) -> None:  # fmt: skip
    from stepwell.cli_backend import interrupt_event
    from stepwell.cli_progress import RunProgress
    from stepwell.engine.app_run import select_steps
    from stepwell.engine.ray_executor import RayExecutorError, run_steps_on_ray

    spec = _load(app_path)
    names = select_steps(spec, steps)
    # (run_steps_on_ray cancels the runs in progress once it sees the event)
    with RunProgress(_console(), total_steps=len(names)) as progress, interrupt_event() as interrupted:
        try:
            runs = run_steps_on_ray(spec, store or spec.store or "", names, address=address,
                                    listener=progress, sandbox=sandbox, stop=interrupted.is_set)  # fmt: skip
        except RayExecutorError as exc:
            raise CliError(str(exc)) from None
    if interrupted.is_set():
        _report_interrupted(runs)
    _report_failures(app_path, runs, store)


def _report_failures(app_path: str, runs: list[Any], store: str | None) -> None:
    """One stderr line per failed run (and its traceback with --verbose); exit 1.
    A step still asking for more runs (``State.request_new_run``) is named too."""
    from stepwell.engine.app_run import MAX_FOLLOW_UPS, still_asking
    from stepwell.engine.runner import SUCCESS

    for step in still_asking(runs):
        print(f"note: step {step!r} still asks for another run after {MAX_FOLLOW_UPS} "
              "follow-up runs (as many as `stepwell run` makes): run it again, or let "
              "`stepwell serve` keep running it", file=sys.stderr)  # fmt: skip
    failed = [r for r in runs if r.status not in SUCCESS]
    where = ""
    if store:  # (a password is not repeated)
        from stepwell.store.postgres import redact

        where = f" --store {redact(store)}"
    for r in failed:
        details = f" (details: stepwell logs {app_path} {r.id}{where})" if r.id else ""
        print(f"error: step {r.step!r} {r.status}: {one_line(r.error)}{details}", file=sys.stderr)
        if _verbose and r.traceback:
            print(printable(r.traceback), file=sys.stderr)
    if failed:
        raise typer.Exit(1)


# -- load -------------------------------------------------------------------
@app.command()
def load(
    app_path: AppArg,
    table: Annotated[str, typer.Argument(help="Table to append to")],
    file: Annotated[Path, typer.Argument(help=".csv, .jsonl, .json or .parquet file")],
    store: StoreOpt = None,
) -> None:
    """Append a file's rows to a table as one committed write."""
    with _backend(app_path, store) as (_spec, backend):
        rows = backend.load(table, file)
    _console().print(f"Loaded {rows} row{'' if rows == 1 else 's'} into [bold]{table}[/].")


# -- table / tables -----------------------------------------------------------
@app.command()
def table(
    app_path: AppArg,
    name: Annotated[str, typer.Argument(help="Table name")],
    limit: Annotated[int, typer.Option(help="Rows to show", min=0)] = 20,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Preview a table's rows."""
    with _backend(app_path, store) as (spec, backend):
        info = backend.table_info(name)
        if info is None and name in _declared_tables(spec):
            if as_json:
                _print_json([])
            else:  # (not an error: nothing has been written to it yet)
                print(f"table {name!r} has no rows yet: {spec.file.name} declares it, and no "
                      "step or `stepwell load` has written to it")  # fmt: skip
            return
        if info is None:
            from stepwell.store.base import missing_table_message

            known = {t.name for t in backend.list_tables()} | _declared_tables(spec)
            raise CliError(missing_table_message(name, sorted(known)))
        rows = backend.preview(name, limit)
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table as RichTable

    view = RichTable(title=f"{name} ({info.row_count} rows, version {info.version})")
    for column in info.columns:
        view.add_column(f"{column.name}\n[dim]{column.type}[/]")
    for row in rows:
        view.add_row(*[_cell(row.get(c.name)) for c in info.columns])
    _console().print(view)


def _declared_tables(spec: Any) -> set[str]:
    """The tables the app file names: under ``tables:`` and as steps' outputs."""
    names = {t.name for t in spec.tables}
    for step in spec.steps:
        names.update(step.output_tables())
    return names


def _cell(value: Any) -> str:
    if value is None:
        return "[dim]null[/]"
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    from rich.markup import escape

    return escape(printable(text))  # (a value is data, not markup: "[/]" broke the preview)


@app.command()
def tables(app_path: AppArg = ".", as_json: JsonOpt = False, store: StoreOpt = None) -> None:
    """List tables with row counts and schemas."""
    from stepwell.server.models import TableSummary

    with _backend(app_path, store) as (_spec, backend):
        infos = backend.list_tables()
    if as_json:
        _print_json([TableSummary.of(t).model_dump() for t in infos])
        return
    from rich.table import Table as RichTable

    view = RichTable("table", "rows", "version", "columns")
    for t in infos:
        shown = ", ".join(f"{c.name} {c.type}" for c in t.columns[:_COLUMNS_SHOWN])
        if len(t.columns) > _COLUMNS_SHOWN:  # a wide table stays one readable row
            shown += f", ... {len(t.columns) - _COLUMNS_SHOWN} more (--json lists all)"
        view.add_row(t.name, str(t.row_count), str(t.version), shown)
    _console().print(view)


#: Columns `stepwell tables` names per table (all of them with --json).
_COLUMNS_SHOWN = 30


# -- runs / logs --------------------------------------------------------------


@app.command()
def runs(
    app_path: AppArg = ".",
    step: Annotated[str | None, typer.Option(help="Only this step's runs")] = None,
    limit: Annotated[int, typer.Option(help="How many", min=0)] = 50,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """List runs, newest first."""
    from stepwell.server.models import RunSummary

    with _backend(app_path, store) as (spec, backend):
        if step is not None and not step.startswith("action:"):
            spec.step(step)  # a misspelt step is an error listing the steps, not "no runs"
        records = backend.list_runs(step=step, limit=limit)
    if as_json:
        _print_json([{**RunSummary.of(r).cli_json(), **_partition_counts(r)} for r in records])
        return
    from rich.table import Table as RichTable
    from rich.text import Text

    view = RichTable(box=None, pad_edge=False)
    with_parts = any(_partition_counts(r) for r in records)
    for name in ("run", "step", "status", "started", "secs", "in", "out", "partitions")[: 8 if with_parts else 7]:
        view.add_column(name, no_wrap=True, justify="right" if name in ("secs", "in", "out") else "left")
    view.add_column("error", overflow="fold")
    for r in records:
        seconds = (r.ended_at - r.started_at).total_seconds() if r.ended_at and r.started_at else None
        view.add_row(
            r.id, r.step, _status(r.status),
            r.started_at.strftime("%m-%d %H:%M:%S") if r.started_at else "",
            f"{seconds:.2f}" if seconds is not None else "",
            f"{r.rows_in:,}", f"{r.rows_out:,}",
            *([_partitions_text(r)] if with_parts else []),
            Text(printable((r.error or "")[:200])),  # (the step's text: no markup)
        )
    _console().print(view)


def _partition_counts(run: Any) -> dict[str, Any]:
    """``{"partitions": {...}}`` for a connector run (counts of its refresh), else ``{}``."""
    counts = (getattr(run, "info", None) or {}).get("partitions")
    return {"partitions": counts} if isinstance(counts, dict) else {}


def _partitions_text(run: Any) -> str:
    counts = _partition_counts(run).get("partitions")
    if not counts:
        return ""
    text = f"{counts.get('listed', 0):,} listed, {counts.get('succeeded', 0):,} read"
    for key in ("failed", "removed", "skipped"):
        if counts.get(key):
            text += f", {counts[key]:,} {key}"
    return text


def _status(status: str) -> str:
    color = {"succeeded": "green", "succeeded_no_data": "green", "running": "cyan",
             "succeeded_with_errors": "yellow"}.get(status, "red")
    return f"[{color}]{status}[/]"


@app.command()
def logs(
    app_path: AppArg,
    run_id: Annotated[str, typer.Argument(help="Run id (see `stepwell runs`)")],
    store: StoreOpt = None,
) -> None:
    """Print a run's log lines."""
    with _backend(app_path, store) as (_spec, backend):
        record = backend.get_run(run_id)
        if record is None:
            raise CliError(f"no run {run_id!r} (list runs with `stepwell runs {app_path}`)")
        lines = backend.get_logs(run_id)
    for line in lines:
        print(f"{line.ts.strftime('%H:%M:%S.%f')[:-3]} {line.level:5} {printable(line.message)}")
    if record.error:
        print(f"{record.status}: {printable(record.error)}")
        if record.traceback:
            print(printable(record.traceback.rstrip()))


# -- state --------------------------------------------------------------------
@app.command()
def state(
    app_path: AppArg,
    step: Annotated[str, typer.Argument(help="Step name")],
    reset: Annotated[bool, typer.Option("--reset", help="Clear state and stream positions")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE (JSON or text)")] = None,
    store: StoreOpt = None,
) -> None:
    """View or change a step's state and stream positions."""
    from stepwell.engine.state_admin import parse_assignments

    with _backend(app_path, store) as (spec, backend):
        spec.step(step)
        if reset or set_:
            backend.change_state(step, reset=reset, values=parse_assignments(set_ or []))
        _print_json(backend.describe_state(step))


# -- serve / token -------------------------------------------------------------
@app.command()
def serve(
    app_path: AppArg = ".",
    host: Annotated[str, typer.Option(help="Address to listen on (beyond loopback a token is required)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port)", min=0, max=65535)] = 8765,
    store: StoreOpt = None,
    workers: Annotated[int | None, typer.Option(help="Steps running at once", min=1)] = None,
    shutdown_timeout: Annotated[
        float | None, typer.Option(help="Seconds running steps get on SIGTERM before cancel (default 30)", min=0)
    ] = None,
    rotate_token: Annotated[bool, typer.Option("--rotate-token", help="Make a new API token first")] = False,
    sandbox: SandboxOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
) -> None:
    """Run the scheduler, the workers and the HTTP API until SIGTERM / Ctrl-C."""
    _use_sandbox(sandbox)
    show_plugin_output()
    import os

    from stepwell.server.context import ServerSettings
    from stepwell.server.serve import ServeError, Serving

    settings = ServerSettings.from_env(
        dict(os.environ), host=host, port=port, workers=workers, shutdown_timeout=shutdown_timeout,
        executor=executor, ray_address=ray_address,
    )
    try:
        Serving(app_path, store_url=store, settings=settings, rotate_token=rotate_token).run()
    except ServeError as exc:
        raise CliError(str(exc)) from None


@app.command()
def token(
    app_path: AppArg = ".",
    rotate: Annotated[bool, typer.Option("--rotate", help="Replace the token (a running server uses the new one at once)")] = False,
) -> None:
    """Print the app's API token (made on first `serve`), or rotate it."""
    from stepwell.app import load_app
    from stepwell.server.auth import TOKEN_FILE, TokenFile
    from stepwell.server.info import state_dir

    spec = load_app(app_path)
    tokens = TokenFile(state_dir(spec.root) / TOKEN_FILE)
    if rotate:
        print(tokens.rotate())
        return
    current = tokens.read()
    if current is None:
        raise CliError(f"no API token yet for {spec.root}: `stepwell serve` makes one, or run "
                       f"`stepwell token {app_path} --rotate`")
    print(current)


from stepwell.cli_actions import action  # noqa: E402 - `stepwell action` (issue #8)
from stepwell.cli_plugins import plugin_app, rule_app  # noqa: E402 - sub-command groups

app.command()(action)

app.add_typer(plugin_app, name="plugin")
app.add_typer(rule_app, name="rule")


def _hoist_verbose(argv: list[str]) -> None:
    """Take ``-v``/``--verbose`` given after the command (``stepwell run APP -v``)
    as the global option it is (no command has an option of that name)."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [i for i in range(2, end) if argv[i] in ("-v", "--verbose")]
    for i in reversed(flags):
        del argv[i]
    if flags:
        argv.insert(1, "--verbose")


def _with_current_app(argv: list[str], missing: typer.BadParameter) -> list[str] | None:
    """``argv`` with APP given as ``.`` when a command whose first argument is APP
    got one argument too few in an app's folder (`stepwell logs RUN_ID`): APP
    defaults to the current directory (DESIGN 7a) for commands with arguments
    after it too. None when that does not apply: no app file here, or the first
    argument given is an app (then something else is missing)."""
    from stepwell.app import APP_FILE_NAMES

    ctx = missing.ctx
    if type(missing).__name__ != "MissingParameter" or ctx is None:
        return None
    arguments = [p for p in ctx.command.params if isinstance(p, typer.core.TyperArgument)]
    if not arguments or arguments[0].name != "app_path" or missing.param is arguments[0]:
        return None
    if not any((Path.cwd() / name).is_file() for name in APP_FILE_NAMES):
        return None
    given = ctx.params.get("app_path")
    if given and (Path(given).is_dir() or Path(given).name in APP_FILE_NAMES):
        return None
    at = 1
    while at < len(argv) and argv[at].startswith("-"):  # (--verbose, the only global option)
        at += 1
    names, level = [], ctx
    while level.parent is not None:  # (`stepwell rule status`: two names)
        names.insert(0, level.info_name)
        level = level.parent
    for name in names:
        if at >= len(argv) or argv[at] != name:
            return None
        at += 1
    return [*argv[:at], ".", *argv[at:]]


def dispatch(argv: list[str]) -> int:
    """Run the command ``argv`` names; its exit status. A failure is one clear line
    on stderr (exit 1), with its traceback under --verbose. A Ctrl-C is left to
    ``cli_entry.run_command``."""
    _hoist_verbose(argv)
    try:
        again = None
        try:
            code = app(args=argv[1:], standalone_mode=False)
        except typer.BadParameter as missing:
            again = _with_current_app(argv, missing)
            if again is None:
                raise
        if again is not None:  # (out of the except block: a failure then is its own)
            code = app(args=again[1:], standalone_mode=False)
        return code if isinstance(code, int) else 0
    except _PassedOn as passed:
        if isinstance(passed.__cause__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        return _failed(passed.__cause__)
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # usage errors from typer
            exc.show()
            return exc.exit_code
        return _failed(exc)


def _failed(exc: BaseException | None) -> int:
    """Report ``exc`` as one line (and its traceback with --verbose); exit status 1."""
    if _verbose and exc is not None:
        traceback.print_exception(exc)
    print(f"error: {one_line(exc)}", file=sys.stderr)
    return 1


def main() -> None:
    """``python -m stepwell.cli``: :func:`dispatch` as the console script
    (``cli_entry.main``) runs it, once this module is imported."""
    run_command(lambda: dispatch(sys.argv))


if __name__ == "__main__":
    main()
