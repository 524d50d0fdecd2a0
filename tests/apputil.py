"""Helpers for tests that build and run small apps."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stepwell.app import load_app
from stepwell.engine.app_run import run_steps, select_steps
from stepwell.engine.runner import Runner
from stepwell.store import open_store
from stepwell.store.base import RunRecord

#: Two steps: ``gen``'s second run writes a row with no ``ts`` behind the position
#: of ``read``'s stream ordered by ts (the stream never reads it; the log says so).
#: ``gen`` also prints a line looking like stepwell's own.
NULL_ORDER_APP = {
    "stepwell.yml": "steps:\n  - name: gen\n    node: gen.py\n  - name: read\n    node: read.py\n",
    "gen.py": """
        from patterns import State, Table
        state = State()
        second = state.get_value("ran", False)
        rows = [{"n": 3, "ts": None}, {"n": 4, "ts": 40}] if second else [{"n": 1, "ts": 10}]
        Table("events", "w").append(rows)
        state.set_value("ran", True)
        print("[stepwell] a user's own line is not one of stepwell's warnings")
    """,
    "read.py": """
        from patterns import Table
        out = Table("seen", "w")
        for r in Table("events").as_stream(order_by="ts").consume_records():
            out.append({"n": r["n"]})
    """,
}


def write_app(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (name -> text, dedented) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def run_app(root: Path, store_url: str | None = None, steps: list[str] | None = None,
            environ: dict[str, str] | None = None) -> list[RunRecord]:
    """Run steps in-process (the worker is still a separate process)."""
    app = load_app(root)
    store = open_store(store_url, app.root)
    try:
        runner = Runner(app, store, environ=environ)
        return run_steps(runner, select_steps(app, steps))
    finally:
        store.close()


@contextmanager
def app_runner(root: Path, store_url: str | None = None) -> Iterator[Runner]:
    """A Runner for the app at ``root`` (its ``store`` is open inside the block)."""
    app = load_app(root)
    store = open_store(store_url, app.root)
    try:
        yield Runner(app, store)
    finally:
        store.close()


def rows(root: Path, table: str, store_url: str | None = None, order_by: str | None = None) -> list[dict[str, Any]]:
    store = open_store(store_url, root)
    try:
        if store.table_info(table) is None:
            return []
        sql = f'select * from "{table}"' + (f' order by "{order_by}"' if order_by else "")
        return store.query(sql).to_pylist()
    finally:
        store.close()


def logs(root: Path, run_id: str, store_url: str | None = None) -> list[str]:
    store = open_store(store_url, root)
    try:
        return [line.message for line in store.get_logs(run_id)]
    finally:
        store.close()


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real `stepwell` command line."""
    return subprocess.run(
        [sys.executable, "-m", "stepwell.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )
