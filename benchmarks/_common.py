"""Shared helpers for the benchmarks: temporary apps, seeding, result files."""

from __future__ import annotations

import json
import platform
import textwrap
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def write_app(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def seed(store, table: str, data) -> None:
    """Append an Arrow table as one committed write (with patterns_id)."""
    from stepwell.engine.staging import StagedRun

    staged = StagedRun(store, run_id="", step="")
    staged.write(table, data)
    staged.commit(None, None)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        **result,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
