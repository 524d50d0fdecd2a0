"""Schemathesis against the live server's /openapi.json: no request it generates
gets a 5xx answer."""

from __future__ import annotations

import os
import subprocess
import sys

from apputil import write_app
from serverutil import ServerProcess
from test_server import PIPELINE


def test_schemathesis_finds_no_server_error(tmp_path):
    app = write_app(tmp_path / "hooks", PIPELINE)
    env = {"STEPWELL_SECRET_HOOK_TOKEN": "schemathesis-hook-token"}
    with ServerProcess(app, env=env) as server:
        with server.client() as client:  # some data, so reads have something to return
            client.post("/api/webhooks/ingest", json=[{"n": i} for i in range(5)])
        result = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
                "--checks", "not_a_server_error",
                "--max-examples", "20",
                "--seed", "7",
                "--request-timeout", "20",
                "--workers", "1",
                "--phases", "coverage,fuzzing,stateful",
                "--suppress-health-check", "all",
            ],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
            cwd=tmp_path,
        )
        health = server.client().get("/api/health")
    output = result.stdout + result.stderr
    print(output[-2500:])
    assert result.returncode == 0, output[-6000:]
    assert "passed" in output and "not_a_server_error" not in output.split("SUMMARY")[-1]
    assert health.status_code == 200  # still up afterwards
