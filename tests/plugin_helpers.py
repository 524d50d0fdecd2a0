"""Helpers for the plugin and rule tests: a test app with the SDK-built test plugin."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from stepwell.engine.staging import StagedRun
from stepwell.store.base import Store

PLUGIN_SRC = Path(__file__).parent / "plugins" / "swtest"
CTX = json.dumps({"ruleId": "r1", "opId": "op1", "instanceId": 0, "funcId": 0})


def make_app(root: Path, streams: dict[str, str] | None = None, extra: str = "") -> Path:
    """An app folder with stream files ``streams/<name>.json`` holding ``CREATE STREAM`` sql."""
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for name, sql in (streams or {}).items():
        path = root / "streams" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"sql": sql}))
        files.append(f"streams/{name}.json")
    text = "title: plugin test app\n"
    if files:
        text += f"streams: [{', '.join(files)}]\n"
    (root / "stepwell.yml").write_text(text + extra)
    return root


def copy_plugin(target: Path, mutate: Callable[[dict[str, Any]], None] | None = None,
                name: str = "swtest") -> Path:
    """A copy of the test plugin (optionally with a changed manifest) at ``target/<name>``."""
    folder = target / name
    shutil.copytree(PLUGIN_SRC, folder)
    if name != "swtest":
        (folder / "swtest.json").rename(folder / f"{name}.json")
    manifest_path = folder / f"{name}.json"
    if mutate is not None:
        data = json.loads(manifest_path.read_text())
        mutate(data)
        manifest_path.write_text(json.dumps(data))
    return folder


def append_rows(store: Store, table: str, rows: list[dict[str, Any]]) -> None:
    staged = StagedRun(store, "test", "test-writer")
    staged.write(table, pa.Table.from_pylist(rows))
    staged.commit(None, None)


def wait_for(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s (last value {value!r})")
        time.sleep(interval)


def sink_lines(path: Path) -> list[Any]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

