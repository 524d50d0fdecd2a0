"""Helpers for tests that run a real `stepwell serve` (uvicorn on a free loopback port)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from stepwell.server.context import ServerSettings
from stepwell.server.serve import Serving


class ServerProcess:
    """`stepwell serve APP --port 0` as a subprocess (the real CLI entry point)."""

    def __init__(self, app: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
        self.app = Path(app)
        self.info_path = self.app / ".stepwell" / "server.json"
        self.log_path = self.app / ".stepwell" / f"serve-{time.monotonic_ns()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stepwell.cli", "serve", str(app), "--port", "0", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.info = self._wait_ready(timeout)
        self.url: str = self.info["url"]
        self.token: str | None = (self.app / ".stepwell" / "token").read_text().strip()

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stepwell serve exited ({self.proc.returncode}):\n{self.output()}")
            try:
                info = json.loads(self.info_path.read_text())
                if info.get("pid") == self.proc.pid:
                    return info
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"stepwell serve did not start in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadServer:
    """`Serving` in a background thread of the test process (faster to start)."""

    def __init__(self, app: Path, *, store_url: str | None = None, **settings: Any):
        settings.setdefault("port", 0)
        self.serving = Serving(app, store_url=store_url, settings=ServerSettings(**settings),
                               out=open(os.devnull, "w"))  # noqa: SIM115
        self.url = self.serving.start_in_thread()
        self.ctx = self.serving.ctx

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def stop(self) -> None:
        self.serving.stop()

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def runs_of(client: httpx.Client, step: str | None = None, **params: Any) -> list[dict[str, Any]]:
    """Runs, oldest first."""
    query = {"limit": 1000, **params, **({"step": step} if step else {})}
    response = client.get("/api/runs", params=query)
    response.raise_for_status()
    return list(reversed(response.json()["runs"]))


FINISHED = {"succeeded", "succeeded_no_data", "succeeded_with_errors", "failed", "timed_out",
            "cancelled", "killed"}


def wait_run(client: httpx.Client, run_id: str, timeout: float = 60) -> dict[str, Any]:
    """Wait for a run to end; returns its record."""
    def ended() -> dict[str, Any] | None:
        run = client.get(f"/api/runs/{run_id}").json()
        return run if run.get("status") in FINISHED else None

    return wait_for(ended, timeout, what=f"run {run_id} to end")


def sse_events(response: httpx.Response) -> list[tuple[float, str | None, dict[str, Any]]]:
    """A run's event stream read to its ``end`` event: (arrival time, kind, data)."""
    events: list[tuple[float, str | None, dict[str, Any]]] = []
    kind = None
    for line in response.iter_lines():
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            events.append((time.monotonic(), kind, json.loads(line[5:])))
            if kind == "end":
                break
    return events


def wait_idle(client: httpx.Client, timeout: float = 60) -> None:
    """Wait until the server runs nothing and has nothing queued."""
    def idle() -> bool:
        health = client.get("/api/health").json()
        return health["running"] == 0 and health["queued"] == 0

    wait_for(idle, timeout, what="the server to be idle")


def table_rows(client: httpx.Client, table: str, limit: int = 10_000) -> list[dict[str, Any]]:
    response = client.get(f"/api/tables/{table}/rows", params={"limit": limit})
    if response.status_code == 404:
        return []
    response.raise_for_status()
    return response.json()["rows"]
