"""Plugins and rules through a running server's API (``/api/plugins``, ``/api/rules``):
the `stepwell plugin/rule` commands use it while `stepwell serve` holds the DuckDB store."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from plugin_helpers import PLUGIN_SRC, append_rows, copy_plugin, make_app
from serverutil import ThreadServer, table_rows, wait_for
from typer.testing import CliRunner

from stepwell.cli import app as cli_app
from stepwell.server.client import ServerClient
from stepwell.store import open_store

# (the test plugin's file sink writes to tmp_path)
pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("sinks_write_to_tmp_path")]


def _readings(n: int, start: int = 0) -> list[dict]:
    return [{"id": i, "grp": "a" if i % 2 == 0 else "b"} for i in range(start, start + n)]


@pytest.fixture
def app_root(tmp_path: Path) -> Path:
    root = make_app(tmp_path / "app", streams={
        "readings": 'CREATE STREAM readings () WITH (TYPE="table", DATASOURCE="readings")'})
    store = open_store(None, root)
    append_rows(store, "readings", _readings(4))
    store.close()
    return root


def _ok(result) -> str:
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout  # (stderr may carry plugin output)


def test_plugin_and_rule_cli_through_the_running_server(app_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    root = str(app_root)
    rule_file = tmp_path / "rule.json"
    rule_file.write_text(json.dumps({"id": "cli1", "sql": "SELECT id, revstr(grp) AS g FROM readings",
                                     "actions": [{"table": {"name": "cli_out"}}]}))
    with ThreadServer(app_root) as server, server.client() as http:
        # install starts the plugin once: a misnamed one is refused at once, naming why
        misnamed = copy_plugin(tmp_path / "misnamed", name="misnamed")
        response = http.post("/api/plugins", json={"path": str(misnamed)})
        assert response.status_code == 422
        assert ("plugin 'misnamed' was not installed (it is started once to check it, as eKuiper "
                "does)") in response.json()["error"]["message"]
        assert ("its code calls PluginConfig('swtest', ...) but the plugin is named 'misnamed'"
                in response.json()["error"]["message"])
        assert "installed plugin swtest" in _ok(runner.invoke(cli_app, ["plugin", "install", root,
                                                                        str(PLUGIN_SRC)]))
        listed = json.loads(_ok(runner.invoke(cli_app, ["plugin", "list", root, "--json"])))
        assert [p["name"] for p in listed] == ["swtest"] and "revstr" in listed[0]["functions"]
        assert "swtest" in _ok(runner.invoke(cli_app, ["plugin", "list", root]))
        described = json.loads(_ok(runner.invoke(cli_app, ["plugin", "describe", root, "swtest",
                                                            "--json"])))
        assert described["aggregate_functions"] == ["spread"]
        assert {"kind": "function", "name": "spread", "aggregate": True} in described["symbols"]
        assert http.get("/api/plugins/nope").status_code == 404

        assert _ok(runner.invoke(cli_app, ["rule", "create", root, str(rule_file)])) == "rule cli1 created\n"
        assert json.loads(_ok(runner.invoke(cli_app, ["rule", "list", root, "--json"])))[0]["id"] == "cli1"
        _ok(runner.invoke(cli_app, ["rule", "start", root, "cli1"]))
        assert server.ctx.rules is not None and "cli1" in server.ctx.rules.running  # runs in the server

        def out_rows() -> int:
            status = json.loads(_ok(runner.invoke(cli_app, ["rule", "status", root, "cli1"])))
            return status["records_out"] == 4 and status["status"] == "running"

        wait_for(out_rows, what="rule cli1 to copy 4 rows")
        assert _ok(runner.invoke(cli_app, ["rule", "stop", root, "cli1"])) == "rule cli1 stopped\n"
        assert "stopped" in _ok(runner.invoke(cli_app, ["rule", "list", root]))
        assert "cli1" not in server.ctx.rules.running
        assert sorted(r["g"] for r in table_rows(http, "cli_out")) == ["a", "a", "b", "b"]

        assert _ok(runner.invoke(cli_app, ["rule", "delete", root, "cli1"])) == "rule cli1 deleted\n"
        result = runner.invoke(cli_app, ["rule", "status", root, "cli1"])
        assert result.exit_code != 0 and "no rule 'cli1'" in str(result.exception)
        result = runner.invoke(cli_app, ["plugin", "remove", root, "nope"])
        assert result.exit_code != 0 and "not installed" in str(result.exception)
        assert _ok(runner.invoke(cli_app, ["plugin", "remove", root, "swtest"])) == "removed plugin swtest\n"
        assert "no plugins installed" in _ok(runner.invoke(cli_app, ["plugin", "list", root]))


def test_rule_created_through_the_api_writes_its_table_rows(app_root: Path) -> None:
    with ThreadServer(app_root) as server, server.client() as http:
        response = http.post("/api/plugins", json={"path": str(PLUGIN_SRC)})
        assert response.status_code == 200, response.text
        assert response.json()["name"] == "swtest"
        response = http.post("/api/rules", json={
            "id": "api1", "sql": "SELECT id, revstr(grp) AS g FROM readings",
            "actions": [{"table": {"name": "api_out"}}]})
        assert response.status_code == 200, response.text
        assert response.json() == {"id": "api1", "status": "running"}
        wait_for(lambda: len(table_rows(http, "api_out")) == 4, what="the rule's first rows")
        # rows committed while it runs reach it too (the server wakes its rules on commits)
        with ServerClient(server.url) as client:
            client.load("readings", pa.Table.from_pylist(_readings(2, start=4)))
        wait_for(lambda: len(table_rows(http, "api_out")) == 6, what="rows loaded later")
        status = http.get("/api/rules/api1/status").json()
        assert status["records_out"] == 6 and status["desired"] == "running"
        assert http.get("/api/rules").json()["rules"] == [
            {"id": "api1", "status": "running", "sql": "SELECT id, revstr(grp) AS g FROM readings"}]
        definition = http.get("/api/rules/api1").json()
        assert {k: definition[k] for k in ("id", "sql", "actions", "options", "desired")} == {
            "id": "api1", "sql": "SELECT id, revstr(grp) AS g FROM readings",
            "actions": [{"table": {"name": "api_out"}}], "options": {}, "desired": "running"}
        assert definition["created_at"]

        # the server's JSON error bodies
        for method, path, body, status_code in [
            ("GET", "/api/rules/nope/status", None, 404),
            ("GET", "/api/rules/nope", None, 404),
            ("POST", "/api/rules/nope/start", None, 404),
            ("DELETE", "/api/plugins/nope", None, 404),
            ("POST", "/api/rules", {"id": "api1", "sql": "SELECT * FROM readings",
                                    "actions": [{"log": {}}]}, 422),
            ("POST", "/api/rules", {"id": "bad", "sql": "SELECT * FROM nowhere",
                                    "actions": [{"log": {}}]}, 422),
            ("POST", "/api/plugins", {"path": "/no/such/plugin"}, 422),
        ]:
            response = http.request(method, path, json=body)
            assert response.status_code == status_code, (path, response.text)
            error = response.json()["error"]
            assert error["message"] and error["code"]
        assert http.post("/api/rules/api1/stop").json() == {"id": "api1", "status": "stopped"}
        assert http.delete("/api/rules/api1").json() == {"id": "api1", "status": "deleted"}
        assert http.get("/api/rules").json() == {"rules": []}


def test_reinstalling_a_plugin_restarts_its_processes_on_the_new_code(
    app_root: Path, tmp_path: Path
) -> None:
    import shutil

    source = tmp_path / "swtest"
    shutil.copytree(PLUGIN_SRC, source)
    with ThreadServer(app_root) as server, server.client() as http:
        assert http.post("/api/plugins", json={"path": str(source)}).status_code == 200
        response = http.post("/api/rules", json={
            "id": "hot", "sql": "SELECT id, revstr(grp) AS g FROM readings",
            "actions": [{"table": {"name": "hot_out"}}]})
        assert response.status_code == 200, response.text
        wait_for(lambda: len(table_rows(http, "hot_out")) == 4, what="the rule's first rows")
        code = source / "swtest.py"
        code.write_text(code.read_text().replace("str(args[0])[::-1]", "str(args[0]).upper()"))
        assert http.post("/api/plugins", json={"path": str(source)}).status_code == 200
        with ServerClient(server.url) as client:
            client.load("readings", pa.Table.from_pylist(_readings(2, start=4)))
        wait_for(lambda: len(table_rows(http, "hot_out")) == 6, what="rows after the reinstall")
        later = sorted(r["g"] for r in table_rows(http, "hot_out") if r["id"] >= 4)
        assert later == ["A", "B"]  # the new code (the old one returned "a", "b")


def test_removing_a_plugin_with_force_fails_the_running_rules_that_use_it(tmp_path: Path) -> None:
    """A source rule went on "running" with nothing coming, a sink rule retried for a
    minute: both now stop, failed, naming the removal."""
    root = make_app(tmp_path / "app", streams={
        "readings": 'CREATE STREAM readings () WITH (TYPE="table", DATASOURCE="readings")',
        "demo": 'CREATE STREAM demo () WITH (TYPE="counter", DATASOURCE="topicA")'})
    store = open_store(None, root)
    append_rows(store, "readings", _readings(4))
    store.close()
    with ThreadServer(root) as server, server.client() as http:
        assert http.post("/api/plugins", json={"path": str(PLUGIN_SRC)}).status_code == 200
        for rule in ({"id": "from_source", "sql": "SELECT id FROM demo", "actions": [{"log": {}}]},
                     {"id": "to_sink", "sql": "SELECT id FROM readings",
                      "actions": [{"collect": {"path": str(tmp_path / "sink.txt")}}]}):
            response = http.post("/api/rules", json=rule)
            assert response.status_code == 200, response.text
        wait_for(lambda: http.get("/api/rules/to_sink/status").json()["records_out"] == 4,
                 what="the sink rule's rows")
        removed = http.delete("/api/plugins/swtest", params={"force": "true"})
        assert removed.status_code == 200, removed.text
        for rule_id, used in (("from_source", "source counter"), ("to_sink", "sink collect")):
            status = http.get(f"/api/rules/{rule_id}/status").json()
            assert status["status"] == "failed", status
            assert (f"plugin 'swtest', which provides its {used}, was removed (--force)"
                    in status["last_error"]), status["last_error"]
