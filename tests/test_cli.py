"""The `stepwell` command line, run as a real subprocess."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest
from apputil import NULL_ORDER_APP, cli, write_app
from serverutil import ThreadServer


def _ok(result):
    assert result.returncode == 0, result.stderr + result.stdout
    return result


def test_init_run_tables_runs_logs_state(tmp_path):
    app = tmp_path / "demo"
    _ok(cli("init", str(app)))
    assert (app / "stepwell.yml").exists()
    first = _ok(cli("run", str(app)))
    assert "ingest" in first.stdout and "count_events" in first.stdout
    _ok(cli("run", str(app)))
    tables = json.loads(_ok(cli("tables", str(app), "--json")).stdout)
    by_name = {t["name"]: t for t in tables}
    assert by_name["events"]["rows"] == 20
    assert by_name["events"]["columns"]["n"] == "int"
    assert by_name["events"]["columns"]["patterns_id"] == "str"
    counts = json.loads(_ok(cli("table", str(app), "event_counts", "--json")).stdout)
    assert sorted(r["new_events"] for r in counts) == [10, 10]
    limited = json.loads(_ok(cli("table", str(app), "events", "--json", "--limit", "3")).stdout)
    assert len(limited) == 3
    runs = json.loads(_ok(cli("runs", str(app), "--json")).stdout)
    assert len(runs) == 4
    assert set(runs[0]) == {"id", "step", "status", "started_at", "ended_at", "rows_in", "rows_out", "error"}
    assert runs[0]["step"] == "count_events" and runs[0]["status"] == "succeeded"
    only = json.loads(_ok(cli("runs", str(app), "--step", "ingest", "--json")).stdout)
    assert {r["step"] for r in only} == {"ingest"} and len(only) == 2
    misspelt = cli("runs", str(app), "--step", "ingets")
    assert misspelt.returncode == 1 and "no step named 'ingets' (did you mean 'ingest'?" in misspelt.stderr
    log = _ok(cli("logs", str(app), runs[0]["id"])).stdout
    assert "10 new events" in log
    state = json.loads(_ok(cli("state", str(app), "count_events")).stdout)
    assert state["stream_positions"][0]["table"] == "events"
    changed = json.loads(_ok(cli("state", str(app), "ingest", "--set", "next=100", "--set", 'tag="x"')).stdout)
    assert changed["state"] == {"next": 100, "tag": "x"}
    reset = json.loads(_ok(cli("state", str(app), "count_events", "--reset")).stdout)
    assert reset["state"] == {} and reset["stream_positions"] == []
    _ok(cli("run", str(app), "count_events"))
    counts = json.loads(_ok(cli("table", str(app), "event_counts", "--json")).stdout)
    assert sorted(r["new_events"] for r in counts) == [10, 10, 20]  # re-read from the start


def test_run_exits_1_with_one_clear_line(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: bad\n    node: bad.py\n",
        "bad.py": "raise ValueError('no good')\n",
    })
    result = cli("run", str(app))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "step 'bad' failed: ValueError: no good (at bad.py:1)" in lines[0]
    assert "stepwell logs" in lines[0]
    verbose = cli("--verbose", "run", str(app))
    assert 'File "bad.py", line 1' in verbose.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps:\n  - name: a\n    node: [unclosed\n", "stepwell.yml:4: invalid YAML"),
        ("steps:\n  - name: a\n    node: a.py\n    colour: red\n", "stepwell.yml:4: steps[0].colour"),
        ("steps:\n  - name: a\n    node: missing.py\n", "missing.py"),
        ("steps:\n  - name: a\n    node: a.py\n    timeout: soon\n", "steps[0].timeout"),
    ],
)
def test_malformed_app_files_give_one_line_naming_file_line_key(tmp_path, text, expected):
    app = write_app(tmp_path / "app", {"stepwell.yml": text, "a.py": "pass\n"})
    result = cli("run", str(app))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_load_every_file_type_as_one_committed_write(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    app = write_app(tmp_path / "app", {"stepwell.yml": "title: loads\n"})
    (tmp_path / "a.csv").write_text("id,name\n1,ann\n2,bob\n")
    (tmp_path / "b.jsonl").write_text('{"id": 3, "name": "cy"}\n{"id": 4, "name": "di"}\n')
    (tmp_path / "c.json").write_text('[{"id": 5, "name": "ed", "tags": ["x"]}]')
    pq.write_table(pa.table({"id": [6], "name": ["fay"]}), tmp_path / "d.parquet")
    for name in ("a.csv", "b.jsonl", "c.json", "d.parquet"):
        _ok(cli("load", str(app), "people", str(tmp_path / name)))
    got = json.loads(_ok(cli("table", str(app), "people", "--json")).stdout)
    assert sorted(r["id"] for r in got) == [1, 2, 3, 4, 5, 6]
    assert all(len(r["patterns_id"]) == 26 for r in got)
    (tmp_path / "bad.csv").write_text("id,name\nseven,gus\n")
    result = cli("load", str(app), "people", str(tmp_path / "bad.csv"))
    assert result.returncode == 1 and "'id'" in result.stderr
    assert len(json.loads(_ok(cli("table", str(app), "people", "--json")).stdout)) == 6
    missing = cli("load", str(app), "people", str(tmp_path / "nope.csv"))
    assert missing.returncode == 1 and "nope.csv" in missing.stderr


def test_run_says_when_a_step_still_asks_for_more_runs(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: forever\n    node: forever.py\n",
        "forever.py": "from patterns import State\nState().request_new_run()\n",
    })
    result = _ok(cli("run", str(app)))
    assert "note: step 'forever' still asks for another run after 100 follow-up runs" in (
        result.stderr
    )
    counts = re.findall(r"steps\s.*?(\d+)/(\d+)", result.stdout)
    assert counts and all(c == ("1", "1") for c in counts)  # follow-up runs are not steps
    runs = json.loads(_ok(cli("runs", str(app), "--json", "--limit", "200")).stdout)
    assert len(runs) == 101


def test_unknown_table_run_and_step_are_clear(tmp_path):
    app = write_app(tmp_path / "app", {"stepwell.yml": "steps:\n  - name: a\n    node: a.py\n",
                                       "a.py": "pass\n"})
    result = cli("table", str(app), "ghost")
    assert result.returncode == 1 and "table 'ghost' does not exist" in result.stderr
    result = cli("logs", str(app), "01nosuchrun")
    assert result.returncode == 1 and "no run" in result.stderr
    result = cli("run", str(app), "ghost")
    assert result.returncode == 1 and "ghost" in result.stderr and "a" in result.stderr
    for command in ("runs", "table"):  # runs showed DuckDB's 'Binder Error: LIMIT/OFFSET ...'
        result = cli(command, str(app), *(["ghost"] if command == "table" else []), "--limit", "-1")
        assert result.returncode == 2, result.stderr
        assert "Invalid value for '--limit': Input should be greater than or equal to 0" in result.stderr


def test_patterns_graph_yml_app_runs_unchanged(tmp_path):
    app = write_app(tmp_path / "graph_app", {
        "graph.yml": """
            title: Patterns app
            slug: patterns-app
            functions:
              - node_file: source.py
                id: a1b2c3d4
                outputs: {out: raw}
                parameter_values: {how_many: 3}
              - node_file: doubled.sql
                id: e5f6g7h8
              - node_file: consume.py
                id: i9j0k1l2
                inputs: {raw: raw}
            stores:
              - table: raw
              - table: doubled
        """,
        "source.py": """
            from patterns import Parameter, Table
            n = Parameter("how_many", type=int)
            Table("out", "w").append([{"v": i} for i in range(n)])
        """,
        "doubled.sql": 'select v * 2 as v2 from {{ Table("raw") }}\n',
        "consume.py": """
            from patterns import Table
            for r in Table("raw").as_stream().consume_records():
                print("got", r["v"])
        """,
    })
    _ok(cli("run", str(app / "graph.yml")))
    raw = json.loads(_ok(cli("table", str(app), "raw", "--json")).stdout)
    assert sorted(r["v"] for r in raw) == [0, 1, 2]
    runs = json.loads(_ok(cli("runs", str(app), "--json")).stdout)
    assert {r["step"] for r in runs} == {"source", "doubled", "consume"}
    assert all(r["status"] == "succeeded" for r in runs)


def _wheel(folder: Path, name: str, version: str, module_text: str) -> Path:
    """A minimal pure-Python wheel, built by hand (no network needed)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", module_text)
        wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}/RECORD", "")
    return path


def test_requirements_installed_once_and_reused(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            requirements_file: requirements.txt
            steps:
              - name: use
                node: use.py
        """,
        "use.py": """
            import greetlib
            from patterns import Table
            Table("greetings", "w").append({"text": greetlib.greet("world")})
        """,
    })
    wheel = _wheel(app, "greetlib", "1.0", "def greet(who):\n    return f'hello {who}'\n")
    (app / "requirements.txt").write_text(f"./{wheel.name}\n")
    env = {**__import__("os").environ, "STEPWELL_CACHE_DIR": str(tmp_path / "cache"), "UV_OFFLINE": "1"}
    _ok(cli("run", str(app), env=env))
    _ok(cli("run", str(app), env=env))
    runs = json.loads(_ok(cli("runs", str(app), "--json", env=env)).stdout)
    logs = [_ok(cli("logs", str(app), r["id"], env=env)).stdout for r in reversed(runs)]
    assert "environment" in logs[0] and "built in" in logs[0]
    assert "reused" in logs[1]
    rows = json.loads(_ok(cli("table", str(app), "greetings", "--json", env=env)).stdout)
    assert [r["text"] for r in rows] == ["hello world", "hello world"]


def test_table_json_is_strict_json_with_nested_values(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - {name: odd, node: odd.py}\n",
        "odd.py": """
            from patterns import Table
            Table("odd", "w").append({"d": {"a": 1, "b": [1, 2]}, "l": [1, 2], "f": float("nan")})
        """,
    })
    _ok(cli("run", str(app)))

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    (row,) = json.loads(_ok(cli("table", str(app), "odd", "--json")).stdout, parse_constant=refuse)
    assert row["d"] == {"a": 1, "b": [1, 2]} and row["l"] == [1, 2] and row["f"] is None
    with ThreadServer(app) as server, server.client() as client:  # the API says the same
        assert client.get("/api/tables/odd/rows").json()["rows"][0]["d"] == {"a": 1, "b": [1, 2]}


def test_ctrl_c_cancels_the_run_in_progress_and_records_it(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    app = write_app(tmp_path / "app", {
        "stepwell.yml": f"""
            steps:
              - name: slow
                node: slow.py
                parameters: {{port: {listener.getsockname()[1]}}}
              - name: later
                node: later.py
        """,
        "slow.py": """
            import socket, time
            from patterns import Parameter, Table
            Table("out", "w").append({"n": 1})  # not committed: rolled back on cancel
            socket.create_connection(("127.0.0.1", Parameter("port", type=int))).close()
            time.sleep(60)
        """,
        "later.py": "print('should not run')\n",
    })
    env = {k: v for k, v in os.environ.items() if k != "STEPWELL_SANDBOX"}
    proc = subprocess.Popen([sys.executable, "-m", "stepwell.cli", "run", str(app)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        listener.accept()[0].close()  # the step is running
    finally:
        listener.close()
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - began < 20
    assert "interrupted: step 'slow' cancelled" in err and "later steps not run" in err
    runs = json.loads(_ok(cli("runs", str(app), "--json")).stdout)
    assert [(r["step"], r["status"]) for r in runs] == [("slow", "cancelled")]
    assert "interrupted (Ctrl-C)" in runs[0]["error"]
    assert json.loads(cli("table", str(app), "out", "--json").stdout) == []  # nothing was kept


def test_ctrl_c_outside_a_run_says_aborted(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    from stepwell.server.info import store_key

    app = write_app(tmp_path / "app", {"stepwell.yml": "title: t\n"})
    hung = socket.create_server(("127.0.0.1", 0))  # a "server" that never answers
    hung.settimeout(30)
    (app / ".stepwell").mkdir()
    (app / ".stepwell" / "server.json").write_text(json.dumps({
        "url": f"http://127.0.0.1:{hung.getsockname()[1]}", "host": "127.0.0.1",
        "port": hung.getsockname()[1], "pid": os.getpid(),
        "token_path": str(app / ".stepwell" / "token"),
        "store_key": store_key(None), "started_at": "2020-01-01T00:00:00+00:00",
        "app_root": str(app.resolve())}))
    proc = subprocess.Popen([sys.executable, "-m", "stepwell.cli", "tables", str(app)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hung.accept()[0]  # it asks the server for its health, and waits
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        hung.close()
    assert (proc.returncode, err) == (130, "aborted\n")


def test_a_failure_is_one_line_when_its_message_has_several(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: bad\n    node: bad.py\n",
        "bad.py": 'raise ValueError("first line\\nsecond line")\n',
    })
    failed = cli("run", str(app))
    assert failed.returncode == 1
    (line,) = failed.stderr.splitlines()
    assert "ValueError: first line second line (at bad.py:1)" in line
    refused = cli("tables", str(app), "--store", "postgresql://nobody@127.0.0.1:1/none")
    assert refused.returncode == 1
    (line,) = refused.stderr.splitlines()  # (libpq adds a hint line to "connection refused")
    assert line.startswith("error: cannot connect to PostgreSQL at postgresql://nobody@127.0.0.1:1/none")


def test_run_says_when_the_app_has_no_steps(tmp_path):
    app = write_app(tmp_path / "app", {"stepwell.yml": "title: empty\n"})
    result = _ok(cli("run", str(app)))
    assert "nothing to run" in result.stderr and "declares no steps" in result.stderr


def test_load_errors_name_the_file(tmp_path):
    app = write_app(tmp_path / "app", {"stepwell.yml": "title: loads\n"})
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{bad\n')
    (tmp_path / "mixed.json").write_text('[{"a": 1}, {"a": "x"}]')
    (tmp_path / "deep.jsonl").write_text('{"v": ' + '{"a": ' * 150 + "1" + "}" * 151 + "\n")
    (tmp_path / "latin1.csv").write_bytes("a\nok\n\u00e9t\u00e9\n".encode("latin-1"))
    (tmp_path / "header.csv").write_bytes(b"a\xff,b\n1,2\n")
    (tmp_path / "utf16.csv").write_bytes("a,b\n1,2\n".encode("utf-16"))
    (tmp_path / "parts").mkdir()  # was: "unsupported file type ''"
    for name, problem in (
        ("empty.csv", "Empty CSV file"),
        ("bad.jsonl", "JSON parse error: Missing a name for object member. on line 2"),
        ("mixed.json", "file 'mixed.json', row 1, field 'a': got str 'x' but earlier rows have int"),
        ("latin1.csv", "line 3 is not UTF-8 text (invalid continuation byte at byte 0); "
                       "convert the file to UTF-8 first, e.g. `iconv -f latin1 -t utf-8 latin1.csv"),
        ("header.csv", "line 1 is not UTF-8 text"),
        ("utf16.csv", "the file is UTF-16 text; save it as UTF-8"),
        ("deep.jsonl", "field 'v' is nested more than 100 levels deep; flatten it first"),
        ("parts", "a folder, not a file; load its files one at a time"),
    ):
        result = cli("load", str(app), "t", str(tmp_path / name))
        assert result.returncode == 1
        assert f"error: {tmp_path / name}: {problem}" in result.stderr, result.stderr
    assert cli("table", str(app), "t").returncode == 1  # nothing was written


def test_the_details_hint_of_a_failure_names_the_store_it_used(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - {name: boom, node: boom.py}\n",
        "boom.py": "raise ValueError('x')\n",
    })
    url = f"duckdb://{tmp_path / 'elsewhere.duckdb'}"
    failed = cli("run", str(app), "--store", url)
    assert failed.returncode == 1
    hint = failed.stderr.split("(details: ", 1)[1].split(")")[0]
    assert hint.startswith("stepwell logs ") and hint.endswith(f" --store {url}"), hint
    logs = cli(*hint.split()[1:])
    assert logs.returncode == 0 and "ValueError: x" in logs.stdout + logs.stderr, logs.stderr


def test_verbose_works_after_the_command_too(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - {name: boom, node: boom.py}\n",
        "boom.py": "def inner():\n    raise RuntimeError('deep')\ninner()\n",
    })
    for args in (("-v", "run", str(app)), ("run", str(app), "--verbose")):
        result = cli(*args)
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "in inner" in result.stderr, args
    assert "Traceback" not in cli("run", str(app)).stderr


def test_tables_names_at_most_30_columns_per_table(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - {name: wide, node: wide.py}\n",
        "wide.py": "from patterns import Table\nTable('wide', 'w').append({f'c{i}': i for i in range(100)})\n",
    })
    _ok(cli("run", str(app)))
    listed = _ok(cli("tables", str(app))).stdout
    assert "c29 int" in listed and "c30 int" not in listed and "71 more (--json lists all)" in listed
    (wide,) = json.loads(_ok(cli("tables", str(app), "--json")).stdout)
    assert len(wide["columns"]) == 101  # with patterns_id


def test_run_shows_stepwells_own_warnings_once(tmp_path):
    app = write_app(tmp_path / "app", NULL_ORDER_APP)
    first = _ok(cli("run", str(app)))
    assert "warning" not in first.stdout
    second = _ok(cli("run", str(app)))  # rows the stream skips: said where the user looks
    warnings = [line for line in second.stdout.splitlines() if "warning" in line]
    assert warnings == ["  warning (read): table 'events': 1 row(s) have no ts (null); a stream "
                        "ordered by ts has read past them and will not read them: give them a "
                        "ts, or stream by patterns_id"], second.stdout


def test_app_defaults_to_the_current_folder_for_commands_with_more_arguments(tmp_path):
    """DESIGN 7a: APP defaults to the current directory, also where arguments come
    after it (`stepwell logs RUN_ID`, `stepwell load TABLE FILE`); a command given
    an app but not the rest still says what is missing."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: hello\n    node: hello.py\n",
        "hello.py": "from patterns import Table\nprint('hi there')\nTable('greetings', 'w').append({'n': 1})\n",
    })  # fmt: skip
    (tmp_path / "more.jsonl").write_text('{"n": 2}\n')
    assert cli("run", cwd=app).returncode == 0
    (run,) = json.loads(cli("runs", "--json", cwd=app).stdout)
    logs = cli("logs", run["id"], cwd=app)
    assert logs.returncode == 0 and "hi there" in logs.stdout, logs.stderr
    loaded = cli("load", "greetings", str(tmp_path / "more.jsonl"), cwd=app)
    assert loaded.returncode == 0, loaded.stderr
    table = cli("table", "greetings", "--json", cwd=app)
    assert sorted(row["n"] for row in json.loads(table.stdout)) == [1, 2]
    state = cli("state", "hello", cwd=app)
    assert state.returncode == 0 and json.loads(state.stdout)["step"] == "hello"
    for args, cwd in [(["logs", str(app)], tmp_path), (["logs", run["id"]], tmp_path)]:
        missing = cli(*args, cwd=cwd)  # an app and no run id; no app here at all
        assert missing.returncode == 2 and "Missing argument" in missing.stderr, missing.stderr


def test_run_through_a_server_follows_the_follow_up_runs(tmp_path):
    """`stepwell run` while a server serves the app makes the runs it would make
    without one: a step asking for another run (`State.request_new_run`) gets its
    follow-ups before the next step starts (the server queues them; the command
    follows them)."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - {name: again, node: again.py}\n  - {name: after, node: after.py}\n",
        "again.py": """
            from patterns import State
            state = State()
            n = state.get_value("n", 0) + 1
            state.set_value("n", n)
            if n < 3:
                state.request_new_run(wait_atleast_seconds=0.5)
        """,
        "after.py": "print('after')\n",
    })  # fmt: skip
    with ThreadServer(app):
        result = cli("run", str(app))
        assert result.returncode == 0 and "still asks" not in result.stderr, result.stderr
        runs = json.loads(cli("runs", str(app), "--json").stdout)
    assert [(r["step"], r["status"]) for r in reversed(runs)] == [
        ("again", "succeeded_no_data"), ("again", "succeeded_no_data"), ("again", "succeeded_no_data"),
        ("after", "succeeded_no_data"),
    ]  # fmt: skip


def test_a_declared_table_without_rows_yet_is_empty_not_missing(tmp_path):
    """`stepwell table` on a table the app declares but nothing has written to yet
    said it did not exist; a misspelt name is still an error, with suggestions
    from the declared tables too."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "tables: [{name: orders}]\nsteps:\n  - {name: s, node: s.py, outputs: {out: made}}\n",
        "s.py": "from patterns import Table\nTable('out', 'w').append({'n': 1})\n",
    })  # fmt: skip
    for name in ("orders", "made"):
        shown = cli("table", str(app), name)
        assert shown.returncode == 0 and f"table {name!r} has no rows yet" in shown.stdout, shown.stderr
        assert json.loads(cli("table", str(app), name, "--json").stdout) == []
    misspelt = cli("table", str(app), "ordrs")
    assert misspelt.returncode == 1 and "did you mean 'orders'?" in misspelt.stderr, misspelt.stderr


def _script() -> str:
    """The real `stepwell` console script (what a shell runs)."""
    import sys

    script = Path(sys.executable).parent / "stepwell"
    assert script.exists(), f"{script}: run `uv sync` (it installs the console script)"
    return str(script)


def test_ctrl_c_while_the_command_line_is_still_importing_says_aborted(tmp_path):
    """A Ctrl-C while the console script imports typer, rich and the engine (most of
    a command's start) printed Python's KeyboardInterrupt traceback."""
    import os
    import signal
    import subprocess

    app = write_app(tmp_path / "app", {"stepwell.yml": "title: t\n"})
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}  # each import, on stderr, as it ends
    proc = subprocess.Popen([_script(), "tables", str(app)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        seen = []
        for line in proc.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if line.split("|")[-1].strip() == "typer":  # typer imported (not yet rich, the store)
                break
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=30)
    finally:
        proc.kill()
    err = "".join(line for line in rest.splitlines(keepends=True) if not line.startswith("import time:"))
    assert (proc.returncode, err, out) == (130, "aborted\n", ""), "".join(seen[-5:]) + rest[-2000:]


def test_ctrl_c_while_the_arguments_are_parsed_is_aborted_too(monkeypatch):
    """typer made a Ctrl-C while it parsed the command line a silent exit 130, where
    the rest of the CLI says "aborted": it now reaches the console script's handler."""
    import typer

    from stepwell.cli import dispatch

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(typer.core.TyperGroup, "make_context", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dispatch(["stepwell", "tables", "."])


def test_a_broken_pipe_inside_a_command_is_its_error_line(monkeypatch, capsys):
    """A BrokenPipeError of the command's own (a server's connection, not its
    output) was a silent exit 1 (typer's handling); it is the error line."""
    import stepwell.cli

    def broken(*_args, **_kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(stepwell.cli, "_load", broken)
    assert stepwell.cli.dispatch(["stepwell", "tables", "."]) == 1
    assert capsys.readouterr().err == "error: [Errno 32] Broken pipe\n"


def _into_closed_pipe(*args: str, cwd: Path | None = None, stderr_too: bool = False) -> tuple[int, str]:
    """Run the real `stepwell` with its stdout (and with ``stderr_too`` its stderr)
    a pipe whose reader has gone, as in `stepwell runs | head -1` once head has its
    line: (exit status, stderr)."""
    import subprocess

    proc = subprocess.Popen([_script(), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE, text=True)  # fmt: skip
    proc.stdout.close()  # type: ignore[union-attr]  # (before it writes: it is still starting)
    err = "" if stderr_too else proc.stderr.read()  # type: ignore[union-attr]
    return proc.wait(timeout=120), err


def test_every_read_command_into_a_closed_pipe_ends_quietly_with_141(tmp_path):
    """They exited 1, silently (typer's handling), or with "Exception ignored ...
    BrokenPipeError" from Python's shutdown; now 141, a process SIGPIPE killed, as
    git or cat in `... | head -1`. A command's own failure is still exit 1, said."""
    app = tmp_path / "demo"
    _ok(cli("init", str(app)))
    _ok(cli("run", str(app)))
    run_id = json.loads(_ok(cli("runs", str(app), "--json")).stdout)[0]["id"]
    for command in (["runs", "."], ["runs", ".", "--json"], ["tables", "."], ["tables", ".", "--json"],
                    ["table", ".", "events"], ["table", ".", "events", "--json"], ["logs", ".", run_id],
                    ["state", ".", "count_events"], ["--help"], ["token", ".", "--rotate"]):  # fmt: skip
        assert _into_closed_pipe(*command, cwd=app) == (141, ""), command
    status, err = _into_closed_pipe("runs", ".", "--step", "nosuch", cwd=app)
    assert status == 1 and err.startswith("error: ") and "no step named 'nosuch'" in err, err


def test_run_into_a_closed_pipe_still_runs_and_records_every_step(tmp_path):
    """`stepwell run APP | head -1`: the warning `run` prints under its progress met the
    closed pipe inside the run, whose BrokenPipeError ended it (no record, its
    transaction rolled back) and the command (exit 1, later steps not run)."""
    app = write_app(tmp_path / "app", NULL_ORDER_APP)
    _ok(cli("run", str(app)))
    assert _into_closed_pipe("run", str(app)) == (141, "")  # (its second run warns)
    assert _into_closed_pipe("run", str(app), stderr_too=True) == (141, "")
    runs = json.loads(_ok(cli("runs", str(app), "--json")).stdout)
    assert [(r["step"], r["status"]) for r in runs] == [("read", "succeeded"), ("gen", "succeeded")] * 3
    failing = write_app(tmp_path / "failing", {
        "stepwell.yml": "steps:\n  - name: bad\n    node: bad.py\n",
        "bad.py": "raise ValueError('no good')\n",
    })
    status, err = _into_closed_pipe("run", str(failing))
    assert status == 1 and "error: step 'bad' failed: ValueError: no good" in err, err


def test_ctrl_c_while_output_waits_for_its_reader_says_aborted(tmp_path):
    """Ctrl-C while a long output waits for a reader that reads no more (a pager)."""
    import signal
    import subprocess
    import time

    app = write_app(tmp_path / "app", {"stepwell.yml": "title: t\n"})
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"n": i, "text": "x" * 500}) + "\n" for i in range(3000)))
    _ok(cli("load", str(app), "big", str(rows)))
    proc = subprocess.Popen([_script(), "table", str(app), "big", "--json", "--limit", "3000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout.read(1) == b"["  # type: ignore[union-attr]  # it writes; 1.5 MB do not fit
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, b"aborted\n")
