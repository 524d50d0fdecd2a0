"""`stepwell init --style ...`: every style's starter app works as created, through
the real command line (and, for the plugin style, a real server running its rule
with its plugin process)."""

from __future__ import annotations

import json

import pytest
from apputil import cli
from serverutil import ThreadServer, table_rows, wait_for

from stepwell.scaffold import STYLES


def _ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _rows(app, table):
    return json.loads(_ok(cli("table", str(app), table, "--json", "--limit", "100")).stdout)


@pytest.mark.parametrize("style", ["node", "processor", "connector"])
def test_a_new_app_runs_twice(tmp_path, style):
    app = tmp_path / style
    created = _ok(cli("init", str(app), "--style", style))
    assert f"Next: stepwell run {app}" in " ".join(created.stdout.split())  # (rich wraps lines)
    _ok(cli("run", str(app)))
    _ok(cli("run", str(app)))  # and again: incremental where the style is
    if style == "node":
        counts = _rows(app, "event_counts")
        assert [c["new_events"] for c in counts] == [10, 10]
    elif style == "processor":
        scored = _rows(app, "scored")
        # each reading scored once (the one with value < 5 filtered out)
        assert len(scored) == 19 and {r["level"] for r in scored} == {"normal", "high"}
    else:
        totals = {r["region"]: r["total"] for r in _rows(app, "totals")}
        assert totals == {"north": 165.0, "south": 80.0}
        assert len(_rows(app, "file_rows")) == 3  # the unchanged file was not read again


def test_a_new_node_app_runs_its_upstream_step_under_the_server(tmp_path):
    """count_events declares no inputs: its code's Table("events") makes it a reader
    of what ingest writes, so it runs after ingest (and is triggered by it)."""
    app = tmp_path / "node"
    _ok(cli("init", str(app)))
    with ThreadServer(app) as server, server.client() as client:
        assert client.post("/api/runs", json={"step": "ingest"}).status_code == 202
        counts = wait_for(lambda: table_rows(client, "event_counts"), 60,
                          what="count_events to run after ingest")
    assert [c["new_events"] for c in counts] == [10]


def test_a_new_action_app_answers(tmp_path):
    app = tmp_path / "act"
    _ok(cli("init", str(app), "--style", "action"))
    result = json.loads(_ok(cli("action", str(app), "greet", "--params", '{"name": "ada"}')).stdout)
    assert result["status"] == "succeeded" and result["data"]["message"] == "Hello, ada!"


def test_a_new_plugin_app_runs_its_rule_under_the_server(tmp_path):
    app = tmp_path / "plug"
    created = _ok(cli("init", str(app), "--style", "plugin"))
    assert f"stepwell serve {app}" in " ".join(created.stdout.split())
    _ok(cli("run", str(app)))  # the node step writes the names
    with ThreadServer(app) as server, server.client() as client:
        greetings = wait_for(lambda: len(rows := table_rows(client, "greetings")) == 3 and rows,
                             60, what="the rule's output")
    assert sorted(r["greeting"] for r in greetings) == ["ADA!", "GRACE!", "LINUS!"]


def test_init_refuses_unknown_styles_and_existing_apps(tmp_path):
    unknown = cli("init", str(tmp_path / "x"), "--style", "dag")
    assert unknown.returncode == 1 and "unknown style 'dag'" in unknown.stderr
    assert all(style in unknown.stderr for style in STYLES)
    _ok(cli("init", str(tmp_path / "y")))
    again = cli("init", str(tmp_path / "y"))
    assert again.returncode == 1 and "already has stepwell.yml" in again.stderr
    # a user's file of the same name is never overwritten, nor a Patterns graph.yml shadowed
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "ingest.py").write_text("# my code\n")
    (tmp_path / "z" / "graph.yml").write_text("title: mine\n")
    refused = cli("init", str(tmp_path / "z"))
    assert refused.returncode == 1 and "already has ingest.py, graph.yml" in refused.stderr
    assert (tmp_path / "z" / "ingest.py").read_text() == "# my code\n"
    assert not (tmp_path / "z" / "stepwell.yml").exists()
