"""Actions (issue #8) end to end: a real `stepwell serve` (uvicorn on a free loopback
port) running action steps in warm sandboxed workers, and the `stepwell action` CLI
both through that server and on its own. Plus the parts that need no server: the
app-file models and the `{{ }}` expression language."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from apputil import cli, write_app
from serverutil import ThreadServer, wait_for

from stepwell.app import AppError, load_app
from stepwell.runtimes.action import templating

SECRET = "sk-live-0123456789-very-secret"

#: An action telling whether process ``params.pid`` still runs (not a zombie), as an
#: entry of an app file's ``actions:`` list.
RUNNING_ACTION = """\
          - name: running
            steps:
              - name: r
                code: |
                  try:
                      with open(f"/proc/{params['pid']}/stat") as f:
                          return f.read().rsplit(")", 1)[1].split()[0] != "Z"
                  except FileNotFoundError:
                      return False
"""

APP = {
    "stepwell.yml": """
        title: actions under test
        tables: [{name: orders}]
        actions:
          - name: enrich
            params: {greeting: hello}
            steps:
              - name: load
                python: steps/load_user.py
                variables: {uid: "{{ params.user_id }}", roles: "{{ user.roles }}"}
              - name: shape
                code: |
                  print("shaping", data["id"])
                  return {**data, "seen": True, "greeting": params["greeting"]}
          - name: merge
            steps:
              - {name: a, code: "return {'a': params['x']}"}
              - {name: b, code: "return [10, 20, 30]"}
              - name: c
                code: "return {'first': first, 'second': second, 'label': label, 'prev': data}"
                variables:
                  first: "{{ steps.a.data }}"
                  second: "{{ steps.b.data[1] }}"
                  label: "n-{{ params.x }}"
          - name: fragile
            steps:
              - name: fails
                code: "raise ValueError('no luck for ' + str(params.get('who')))"
                allow_failure: true
              - name: recovers
                code: "return {'data_was': data, 'error_was': error}"
          - name: strict
            steps:
              - {name: fails, code: "raise RuntimeError('stop here')"}
              - {name: never, code: "return 'unreachable'"}
          - name: orders_of
            steps:
              - name: rows
                sql: "SELECT id, amount FROM orders WHERE customer = :who ORDER BY id"
                variables: {who: "{{ params.customer }}"}
              - name: total
                code: "return {'count': len(data), 'total': sum(r['amount'] for r in data)}"
          - name: orders_in
            steps:
              - name: rows
                sql: queries/by_ids.sql
                variables: {ids: "{{ params.ids }}"}
          - name: double
            steps:
              - {name: d, code: "return params['n'] * 2"}
          - name: doubles
            steps:
              - {name: numbers, code: "return [{'n': i} for i in range(params['count'])]"}
              - {name: each, loop: double, chunk_size: 3, max_iterations: 5}
          - name: doubles_of
            steps:
              - name: each
                loop: double
                items: "{{ params['values'] }}"
                params: {n: "{{ item }}"}
          - name: checked
            steps:
              - name: c
                code: |
                  assert params["n"] % 2 == 0, "odd"
                  return params["n"] // 2
          - name: halves
            steps:
              - name: each
                loop: checked
                items: "{{ params['values'] }}"
                params: {n: "{{ item }}"}
                chunk_size: 2
          - name: nap
            steps:
              - {name: z, code: "import time; time.sleep(0.4); return params['n']"}
          - name: naps
            steps:
              - name: each
                loop: nap
                items: [1, 2, 3]
                params: {n: "{{ item }}"}
                chunk_size: 3
          - name: call_other
            steps:
              - name: sub
                action: double
                params: {n: "{{ params.k }}"}
              - {name: plus, code: "return data + 1"}
          - name: forever
            steps:
              - {name: again, action: forever}
          - name: slow
            steps:
              - name: sleep
                code: |
                  import time
                  time.sleep(params.get("seconds", 5))
                  return "woke"
                timeout: 1s
          - name: reads_a_file
            steps:
              - {name: q, sql: "SELECT * FROM 'secrets.toml'"}
          - name: missing_lib
            steps:
              - {name: m, code: "import bs4"}
          - name: long_then_more
            steps:
              - name: nap
                code: |
                  import time
                  print("napping")
                  time.sleep(30)
                timeout: 60s
                allow_failure: true
              - {name: more, code: "print('more ran'); return 2"}
          - name: slow_action
            timeout: 1s
            steps:
              - {name: sleep, code: "import time; time.sleep(4); return 1", timeout: 10s}
          - name: syntax
            steps:
              - {name: bad, python: steps/broken.py}
          - name: templated_file
            steps:
              - {name: bad, python: steps/templated.py}
          - name: secretive
            steps:
              - name: use
                code: |
                  print("token is", token)
                  for i in range(0, len(token), 3):
                      print(token[i:i + 3])  # in pieces, one line each
                  raise ValueError("failed with " + token)
                variables: {token: "${{ secrets.api_token }}"}
          - name: whoami
            steps:
              - {name: me, code: "return user"}
          - name: where
            steps:
              - {name: pid, code: "import os; return os.getpid()"}
          - name: fresh
            steps:
              - name: count
                code: |
                  g = globals()
                  g["calls"] = g.get("calls", 0) + 1
                  return g["calls"]
          - name: typed
            steps:
              - name: t
                code: |
                  import datetime, decimal
                  import pandas as pd
                  frame = pd.DataFrame({"t": [pd.Timestamp("2024-01-01"), None], "v": [1, 2]})
                  return {"when": datetime.datetime(2024, 1, 2, 3, 4, 5),
                          "amount": decimal.Decimal("1.50"), "nan": float("nan"),
                          "pair": (1, 2), "raw": b"hi", "nat": pd.NaT, "frame": frame}
          - name: crash
            steps:
              - {name: c, code: "import os; os._exit(3)"}
          - name: remember
            steps:
              - name: r
                code: |
                  from steps import memory
                  memory.SEEN.append(params.get("secret"))
                  print("remembered", len(memory.SEEN))
                  return list(memory.SEEN)
          - name: spawn
            steps:
              - name: s
                code: |
                  import subprocess
                  return subprocess.Popen(['sleep', '30']).pid
""" + RUNNING_ACTION + """\
          - name: linger
            steps:
              - name: l
                code: |
                  import threading, time
                  from steps import memory
                  def spy():
                      while True:
                          print("spy sees", memory.SEEN)
                          time.sleep(0.02)
                  threading.Thread(target=spy, daemon=True).start()
                  return "started"
          - name: opaque
            steps:
              - {name: o, code: "return object()"}
          - name: awaits
            steps:
              - name: a
                code: |
                  import asyncio
                  await asyncio.sleep(0.01)
                  return "awaited"
          - name: stuck
            steps:
              - {name: spin, python: steps/spin.py, timeout: 1s}
              - {name: waits, code: "import asyncio\\nawait asyncio.sleep(params['t'])", timeout: 1s}
    """,
    "steps/spin.py": """
        from .helpers import spin
        if params.get("spin"):
            spin()
        return "done"
    """,
    "steps/load_user.py": """
        import json
        from .helpers import tag
        print("loading user", uid)
        return {"id": uid, "roles": roles, "json": json.dumps({"uid": uid}), "tag": tag(uid)}
    """,
    "steps/memory.py": """
        SEEN = []
    """,
    "steps/helpers.py": """
        def tag(value):
            return f"#{value}"

        def spin():
            while True:
                pass
    """,
    "steps/broken.py": """
        x = 1
        if x > 0
            return x
    """,
    "steps/templated.py": """
        return {{ params.user_id }}
    """,
    "queries/by_ids.sql": """
        SELECT id, customer FROM orders WHERE id IN :ids ORDER BY id
    """,
    ".stepwell/secrets.toml": f"""
        api_token = "{SECRET}"
    """,
}

ORDERS = [
    {"id": 1, "customer": "ann", "amount": 10},
    {"id": 2, "customer": "bob", "amount": 5},
    {"id": 3, "customer": "ann", "amount": 7},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = write_app(tmp_path_factory.mktemp("actions") / "app", APP)
    with ThreadServer(root) as server, server.client() as client:
        loaded = client.post("/api/tables/orders/rows", json=ORDERS)
        assert loaded.status_code == 200, loaded.text
        server.root = root
        server.http = client
        yield server


def run(server: Any, name: str, params: Any = None, **kwargs: Any) -> dict[str, Any]:
    response = server.http.post(f"/api/actions/{name}/run", json=params or {}, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def logs_of(server: Any, run_id: str) -> list[str]:
    """The run's stored log lines (records reach the store shortly after the response)."""
    def stored() -> list[str] | None:
        response = server.http.get(f"/api/runs/{run_id}/logs")
        if response.status_code != 200:
            return None
        lines = [line["message"] for line in response.json()["lines"]]
        record = server.http.get(f"/api/runs/{run_id}").json()
        return lines if record.get("status") not in (None, "running") else None

    return wait_for(stored, 10, what=f"the log of run {run_id}")


def record_of(server: Any, run_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        response = server.http.get(f"/api/runs/{run_id}")
        if response.status_code != 200:
            return None
        body = response.json()
        return body if body["status"] != "running" else None

    return wait_for(ended, 10, what=f"run {run_id} to be recorded")


# -- chains of steps ------------------------------------------------------------------


def test_python_file_and_inline_code_steps(served: Any) -> None:
    result = run(served, "enrich", {"user_id": 7})
    assert result["status"] == "succeeded" and result["error"] is None
    assert result["data"] == {"id": 7, "roles": [], "json": '{"uid": 7}', "tag": "#7",
                              "seen": True, "greeting": "hello"}
    assert [s["name"] for s in result["steps"]] == ["load", "shape"]
    for step in result["steps"]:
        assert step["error"] is None and step["duration_ms"] >= 0
        assert step["started_at"].endswith("+00:00")
    assert result["steps"][0]["data"] == {"id": 7, "roles": [], "json": '{"uid": 7}', "tag": "#7"}
    record = record_of(served, result["run_id"])
    assert record["step"] == "action:enrich" and record["status"] == "succeeded"
    assert record["trigger"] == "api"
    lines = logs_of(served, result["run_id"])
    assert "[load] loading user 7" in lines and "[shape] shaping 7" in lines


def test_variables_merge_earlier_steps(served: Any) -> None:
    result = run(served, "merge", {"x": 4})
    assert result["data"] == {"first": {"a": 4}, "second": 20, "label": "n-4", "prev": [10, 20, 30]}


def test_allow_failure_passes_the_error_on(served: Any) -> None:
    result = run(served, "fragile", {"who": "zoe"})
    assert result["status"] == "succeeded"
    error = result["steps"][0]["error"]
    assert error.startswith("ValueError: no luck for zoe (at stepwell.yml:")
    assert result["data"] == {"data_was": None, "error_was": error}


def test_a_failing_step_fails_the_action(served: Any) -> None:
    result = run(served, "strict")
    assert result["status"] == "failed" and result["data"] is None
    assert result["error"].startswith("step 'fails': RuntimeError: stop here (at stepwell.yml:")
    assert [s["name"] for s in result["steps"]] == ["fails"]
    record = record_of(served, result["run_id"])
    assert record["status"] == "failed" and "RuntimeError: stop here" in record["error"]
    assert "raise RuntimeError('stop here')" in (record["traceback"] or "")


def test_sql_steps_bind_variables_as_parameters(served: Any) -> None:
    result = run(served, "orders_of", {"customer": "ann"})
    assert result["steps"][0]["data"] == [{"id": 1, "amount": 10}, {"id": 3, "amount": 7}]
    assert result["data"] == {"count": 2, "total": 17}
    # a value is a value: quotes in it cannot change the query
    assert run(served, "orders_of", {"customer": "x' OR '1'='1"})["data"] == {"count": 0, "total": 0}
    listed = run(served, "orders_in", {"ids": [2, 3]})
    assert listed["data"] == [{"id": 2, "customer": "bob"}, {"id": 3, "customer": "ann"}]


def test_action_steps_call_other_actions(served: Any) -> None:
    assert run(served, "call_other", {"k": 5})["data"] == 11


def test_loop_over_previous_result_with_max_iterations(served: Any) -> None:
    result = run(served, "doubles", {"count": 8})
    assert result["status"] == "succeeded"
    assert result["data"] == [0, 2, 4, 6, 8]  # max_iterations: 5
    lines = logs_of(served, result["run_id"])
    assert any("8 items, looping over the first 5" in line for line in lines)


def test_loop_over_expression_items(served: Any) -> None:
    assert run(served, "doubles_of", {"values": [3, 4]})["data"] == [6, 8]


def test_loop_returns_results_and_errors(served: Any) -> None:
    result = run(served, "halves", {"values": [2, 3, 4]})
    assert result["status"] == "failed"
    step = result["steps"][0]
    assert step["data"] == [1, None, 2]
    assert step["error"][0] is None and step["error"][2] is None
    assert step["error"][1].startswith("action 'checked': step 'c': AssertionError: odd")
    assert "1 of 3 iterations failed" in result["error"]


def test_loop_chunks_run_in_parallel(served: Any) -> None:
    run(served, "naps")  # warm enough workers
    began = time.monotonic()
    result = run(served, "naps")
    elapsed = time.monotonic() - began
    assert result["data"] == [1, 2, 3]
    assert elapsed < 1.1, f"3 naps of 0.4 s in one chunk took {elapsed:.2f}s"


def test_an_action_calling_itself_hits_the_depth_limit(served: Any) -> None:
    result = run(served, "forever")
    assert result["status"] == "failed"
    assert "actions nested more than 10 levels deep (forever > forever" in result["error"]
    assert "needs a way to stop" in result["error"]
    assert result["error"].count("action 'forever'") <= 1  # not one prefix per level


# -- limits and failures ----------------------------------------------------------------


def test_step_timeout_kills_the_worker_and_the_pool_recovers(served: Any) -> None:
    began = time.monotonic()
    result = run(served, "slow")
    assert time.monotonic() - began < 5
    assert result["status"] == "timed_out"
    # it says where its code was when it was stopped: the line of the app file
    assert _stopped_at(served, result["error"], "step 'sleep' exceeded its time limit (1s)") \
        == 'time.sleep(params.get("seconds", 5))'
    assert result["steps"][0]["error"] == result["error"]
    assert run(served, "slow", {"seconds": 0})["data"] == "woke"
    assert record_of(served, result["run_id"])["status"] == "timed_out"


def _stopped_at(server: Any, error: str, reason: str) -> str:
    """The line of the app's files a time limit's error says the code was stopped at."""
    said, _, where = error.partition("; it was stopped at ")
    assert said == reason, error
    path, _, line = where.rpartition(":")
    return (server.root / path).read_text().splitlines()[int(line) - 1].strip()


def test_a_timed_out_step_says_where_in_its_files_and_awaits_it_was(served: Any) -> None:
    result = run(served, "stuck", {"spin": True})
    assert result["status"] == "timed_out"
    assert _stopped_at(served, result["error"], "step 'spin' exceeded its time limit (1s)") \
        in ("while True:", "pass")
    assert "at steps/helpers.py:" in result["error"]  # (called from steps/spin.py)
    result = run(served, "stuck", {"t": 30})
    assert result["status"] == "timed_out"
    assert re.fullmatch(r"step 'waits' exceeded its time limit \(1s\); it was stopped at "
                        r"stepwell\.yml:\d+", result["error"]), result["error"]
    assert run(served, "stuck", {"t": 0})["status"] == "succeeded"


def test_a_running_action_can_be_cancelled(served: Any) -> None:
    outcome: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: outcome.update(run(served, "long_then_more")))
    began = time.monotonic()
    caller.start()

    def running() -> str | None:
        runs = served.http.get("/api/runs", params={"step": "action:long_then_more",
                                                    "status": "running"}).json()["runs"]  # fmt: skip
        return runs[0]["id"] if runs else None

    run_id = wait_for(running, 10, what="the action's run")
    wait_for(lambda: "[nap] napping" in [line["message"] for line in  # its code is running
             served.http.get(f"/api/runs/{run_id}/logs").json()["lines"]], 10, what="the nap")  # fmt: skip
    cancelled = served.http.post(f"/api/runs/{run_id}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelling", cancelled.text
    caller.join(20)
    assert time.monotonic() - began < 15
    assert outcome["status"] == "cancelled" and outcome["run_id"] == run_id
    assert outcome["error"] == "action 'long_then_more' was cancelled"
    assert record_of(served, run_id)["status"] == "cancelled"
    assert not any("more ran" in line for line in logs_of(served, run_id))  # no further step
    assert run(served, "slow", {"seconds": 0})["data"] == "woke"  # the pool recovered


def test_sql_reading_a_file_is_refused_with_advice_for_actions(served: Any) -> None:
    result = run(served, "reads_a_file")
    assert result["status"] == "failed"
    assert "table 'secrets.toml' is not one of this step's tables" in result["error"]
    assert "an action's SQL reads the app's tables only" in result["error"]
    assert "Table(" not in result["error"]


def test_a_missing_library_says_how_to_install_it(served: Any) -> None:
    result = run(served, "missing_lib")
    assert result["status"] == "failed"
    assert "No module named 'bs4' (not installed: add beautifulsoup4 to a requirements file" in result["error"]
    assert "requirements_file:" in result["error"]


def test_action_timeout(served: Any) -> None:
    began = time.monotonic()
    result = run(served, "slow_action")
    assert time.monotonic() - began < 3.5
    assert result["status"] == "timed_out"
    assert _stopped_at(served, result["error"], "step 'sleep': action 'slow_action' exceeded its time limit (1s)") \
        == '- {name: sleep, code: "import time; time.sleep(4); return 1", timeout: 10s}'



def test_syntax_error_in_a_file_names_its_line(served: Any) -> None:
    result = run(served, "syntax")
    assert result["status"] == "failed"
    assert "SyntaxError" in result["error"] and "(at steps/broken.py:2: if x > 0)" in result["error"]


def test_template_inside_a_code_file_says_to_use_variables(served: Any) -> None:
    result = run(served, "templated_file")
    assert result["status"] == "failed"
    assert "steps/templated.py, line 1: {{ params.user_id }} cannot be used inside Python code" in result["error"]
    assert "`variables:`" in result["error"]


def test_a_crashing_invocation_ends_only_itself(served: Any) -> None:
    result = run(served, "crash")
    assert result["status"] == "failed"
    assert result["error"] == "step 'c': the step's process ended before it returned: exit code 3"
    assert run(served, "double", {"n": 2})["data"] == 4


def test_a_process_a_call_started_ends_with_the_call(served: Any) -> None:
    pid = run(served, "spawn")["data"]
    assert isinstance(pid, int)
    # killed with the call's process group when the call ended (SIGKILL takes effect
    # when the process is next scheduled: on a loaded machine, a moment later)
    wait_for(lambda: run(served, "running", {"pid": pid})["data"] is False, 10,
             what="the process the call started to end")


def test_nothing_an_invocation_leaves_behind_reaches_the_next(served: Any) -> None:
    """Each invocation is a fresh fork of the warm worker: module globals it changes
    and threads it starts end with it, whoever calls next."""
    assert run(served, "linger", headers={"X-Stepwell-User": '{"id": "mallory"}'})["data"] == "started"
    for _ in range(4):
        alice = run(served, "remember", {"secret": "4111-1111"},
                    headers={"X-Stepwell-User": '{"id": "alice"}'})  # fmt: skip
        assert alice["data"] == ["4111-1111"]
        assert logs_of(served, alice["run_id"]) == ["[r] remembered 1"]


def test_secrets_are_redacted_from_logs_and_errors(served: Any) -> None:
    result = run(served, "secretive")
    assert result["status"] == "failed"
    assert SECRET not in json.dumps(result)
    assert "failed with ***" in result["error"]
    lines = logs_of(served, result["run_id"])
    assert "[use] token is ***" in lines
    assert all(SECRET not in line for line in lines)
    pieces = [line for line in lines if "token is" not in line and "failed" not in line]
    assert pieces and all(line.startswith("[use] ***") for line in pieces), pieces
    assert not any(SECRET[3:6] in line for line in lines)
    assert SECRET not in json.dumps(record_of(served, result["run_id"]))


def test_results_are_plain_json(served: Any) -> None:
    data = run(served, "typed")["data"]
    assert data == {"when": "2024-01-02T03:04:05", "amount": "1.50", "nan": None,
                    "pair": [1, 2], "raw": "aGk=", "nat": None,
                    "frame": [{"t": "2024-01-01T00:00:00", "v": 1}, {"t": None, "v": 2}]}
    opaque = run(served, "opaque")
    assert opaque["status"] == "failed"
    assert "the step's result cannot be passed on: a value of type object" in opaque["error"]


def test_async_bodies_are_awaited(served: Any) -> None:
    assert run(served, "awaits")["data"] == "awaited"


# -- workers ------------------------------------------------------------------------------


def test_code_runs_in_warm_sandboxed_workers_with_fresh_globals(served: Any) -> None:
    pids = {run(served, "where")["data"] for _ in range(6)}
    assert os.getpid() not in pids  # never in the host (the server runs in this process)
    assert len(pids) <= 8  # a small pool serves many calls
    assert [run(served, "fresh")["data"] for _ in range(3)] == [1, 1, 1]


def test_concurrent_calls(served: Any) -> None:
    results: list[Any] = [None] * 8

    def call(index: int) -> None:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            results[index] = client.post("/api/actions/double/run", json={"n": index}).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r["data"] for r in results] == [2 * i for i in range(8)]
    assert len({r["run_id"] for r in results}) == 8


# -- the HTTP API ----------------------------------------------------------------------


def test_list_actions(served: Any) -> None:
    listed = served.http.get("/api/actions").json()["actions"]
    enrich = next(a for a in listed if a["name"] == "enrich")
    assert enrich["params"] == ["greeting"]
    assert enrich["steps"] == [{"name": "load", "kind": "python", "target": "steps/load_user.py"},
                               {"name": "shape", "kind": "code", "target": None}]


def test_bad_requests(served: Any) -> None:
    missing = served.http.post("/api/actions/nope/run", json={})
    assert missing.status_code == 404
    assert "no action named 'nope'" in missing.json()["error"]["message"]
    not_object = served.http.post("/api/actions/double/run", json=[1, 2])
    assert not_object.status_code == 422
    broken = served.http.post("/api/actions/double/run", content=b"{bad json",
                              headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    bad_user = served.http.post("/api/actions/whoami/run", json={},
                                headers={"X-Stepwell-User": "not json"})
    assert bad_user.status_code == 422
    huge = run(served, "double", {"n": 10**30})  # valid JSON the wire protocol cannot carry
    assert huge["status"] == "failed" and "cannot pass the step its inputs" in huge["error"]
    assert run(served, "double", {"n": 21})["data"] == 42


def test_user_on_loopback(served: Any) -> None:
    assert run(served, "whoami")["data"] == {"id": "local", "roles": []}
    acting = run(served, "whoami", headers={"X-Stepwell-User": '{"id": "ann", "roles": ["admin"]}'})
    assert acting["data"] == {"id": "ann", "roles": ["admin"]}
    token = (served.root / ".stepwell" / "token").read_text().strip()
    owner = run(served, "whoami", headers={"Authorization": f"Bearer {token}"})
    assert owner["data"] == {"id": "owner", "roles": ["owner"]}
    wrong = served.http.post("/api/actions/whoami/run", json={},
                             headers={"Authorization": "Bearer not-a-known-token"})
    assert wrong.status_code == 401


ANN_TOKEN = "ann-token-0123456789abcdef"


def test_tokens_identify_users_beyond_loopback(tmp_path: Path) -> None:
    root = write_app(tmp_path / "app", {
        "stepwell.yml": """
            actions:
              - name: whoami
                steps:
                  - {name: me, code: "return {'id': user['id'], 'roles': user['roles'], 'team': user.get('team')}"}
              - name: admins_only
                steps:
                  - name: check
                    code: |
                      if "admin" not in roles:
                          raise PermissionError("admins only")
                      return "welcome"
                    variables: {roles: "{{ user.roles }}"}
        """,
        ".stepwell/users.toml": f"""
            [users.ann]
            token = "{ANN_TOKEN}"
            roles = ["admin"]
            team = "data"

            [users.bob]
            token_sha256 = "{__import__('hashlib').sha256(b'bob-token-0123456789abcdef').hexdigest()}"
        """,
    })
    with ThreadServer(root, host="0.0.0.0") as server:
        owner = (root / ".stepwell" / "token").read_text().strip()
        with server.client() as anonymous:
            refused = anonymous.post("/api/actions/whoami/run", json={})
            assert refused.status_code == 401
        with server.client(ANN_TOKEN) as ann:
            assert ann.post("/api/actions/whoami/run", json={}).json()["data"] == {
                "id": "ann", "roles": ["admin"], "team": "data"}
            assert ann.post("/api/actions/admins_only/run", json={}).json()["data"] == "welcome"
            assert ann.get("/api/runs").status_code == 401  # user tokens are for actions only
            posing = ann.post("/api/actions/whoami/run", json={},
                              headers={"X-Stepwell-User": '{"id": "root"}'})
            assert posing.status_code == 403
        with server.client("bob-token-0123456789abcdef") as bob:
            denied = bob.post("/api/actions/admins_only/run", json={}).json()
            assert denied["status"] == "failed" and "PermissionError: admins only" in denied["error"]
        with server.client(owner) as admin:
            acting = admin.post("/api/actions/whoami/run", json={},
                                headers={"X-Stepwell-User": '{"id": "cy", "roles": ["x"]}'}).json()
            assert acting["data"] == {"id": "cy", "roles": ["x"], "team": None}
            assert admin.get("/api/runs").status_code == 200
        # a broken users file: user tokens cannot be checked (503), the owner still works
        (root / ".stepwell" / "users.toml").write_text("[users.ann\ntoken = ")
        with server.client(ANN_TOKEN) as ann:
            broken = ann.post("/api/actions/whoami/run", json={})
            assert broken.status_code == 503
            assert broken.json()["error"]["code"] == "misconfigured"
            assert str(root) not in broken.text  # the details are in the server's log
        with server.client(owner) as admin:
            assert admin.post("/api/actions/whoami/run", json={}).status_code == 200


# -- the command line ------------------------------------------------------------------


def test_cli_through_the_running_server(served: Any) -> None:
    done = cli("action", str(served.root), "enrich", "--params", '{"user_id": 3}',
               "--user", '{"id": "ann", "roles": ["admin"]}')
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["data"]["id"] == 3 and result["data"]["roles"] == ["admin"]
    assert record_of(served, result["run_id"])["trigger"] == "cli"  # it went through the API

    failed = cli("action", str(served.root), "strict")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"].startswith("step 'fails': RuntimeError: stop here")
    assert "error: action 'strict' failed" in failed.stderr

    bad = cli("action", str(served.root), "double", "--params", "{nope")
    assert bad.returncode == 1 and "--params is not valid JSON" in bad.stderr
    assert "--params is not valid JSON" in json.loads(bad.stdout)["error"]
    unknown = cli("action", str(served.root), "nope")
    assert unknown.returncode == 1 and "no action named 'nope'" in unknown.stderr


def test_cli_without_a_server(tmp_path: Path) -> None:
    root = write_app(tmp_path / "app", {
        "stepwell.yml": """
            actions:
              - name: greet
                steps:
                  - name: hi
                    code: |
                      print("greeting", user["id"])
                      return f"hi {params['name']} from {user['id']}"
        """,
    })
    done = cli("action", str(root), "greet", "--params", '{"name": "Ann"}', "--user", '{"id": "cy"}')
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["data"] == "hi Ann from cy"
    logs = cli("logs", str(root), result["run_id"])
    assert "[hi] greeting cy" in logs.stdout
    runs = json.loads(cli("runs", str(root), "--json").stdout)
    assert runs[0]["step"] == "action:greet" and runs[0]["status"] == "succeeded"
    not_object = cli("action", str(root), "greet", "--params", "[1]")
    assert not_object.returncode == 1 and "--params must be a JSON object" in not_object.stderr


def test_cli_caller_without_user_is_the_same_with_a_server(tmp_path: Path) -> None:
    root = write_app(tmp_path / "app", {
        "stepwell.yml": "actions:\n  - name: who\n    steps:\n      - {name: w, code: return user}\n",
    })
    local = cli("action", str(root), "who")
    with ThreadServer(root):
        remote = cli("action", str(root), "who")
    assert remote.returncode == local.returncode == 0, remote.stderr + local.stderr
    assert json.loads(remote.stdout)["data"] == json.loads(local.stdout)["data"] == {
        "id": "local", "roles": []}


def test_a_full_tmp_names_the_apps_tmp_limit(tmp_path: Path) -> None:
    root = write_app(tmp_path / "app", {
        "stepwell.yml": """
            defaults: {tmp: 4MiB}
            actions:
              - name: spool
                steps:
                  - name: write
                    code: |
                      with open("/tmp/spool", "wb") as out:
                          out.write(b"x" * (params["mib"] * 1024**2))
                      return "spooled"
              - name: mapped
                steps:
                  - name: touch
                    code: |
                      import mmap
                      with open("/tmp/mapped", "wb+") as file:
                          file.truncate(8 * 1024**2)
                          pages = mmap.mmap(file.fileno(), 8 * 1024**2)
                          for i in range(0, 8 * 1024**2, 4096):
                              pages[i] = 1
        """,
    })
    full = json.loads(cli("action", str(root), "spool", "--params", '{"mib": 8}').stdout)
    assert full["status"] == "failed"
    assert "No space left on device" in full["error"]
    assert "(/tmp holds at most 4MiB, its `tmp` limit; set a larger `tmp` in the app's " \
           "`defaults`)" in full["error"]
    fits = json.loads(cli("action", str(root), "spool", "--params", '{"mib": 2}').stdout)
    assert fits["data"] == "spooled"
    # a mapped file's pages past it: the step's process dies of SIGBUS, told nothing else
    mapped = json.loads(cli("action", str(root), "mapped").stdout)
    assert mapped["status"] == "failed"
    assert "killed by SIGBUS (as a memory-mapped file is when its pages do not fit: /tmp " \
           "holds at most 4MiB, its `tmp` limit" in mapped["error"], mapped["error"]


def test_template_inside_inline_code_fails_to_load(tmp_path: Path) -> None:
    root = write_app(tmp_path / "app", {
        "stepwell.yml": """
            actions:
              - name: a
                steps:
                  - name: s
                    code: |
                      x = 1
                      return {{ steps.load.data }}
        """,
    })
    done = cli("action", str(root), "a")
    assert done.returncode == 1
    assert "stepwell.yml:5: actions[0].steps[0].code: {{ }} templates cannot be used inside code" in done.stderr
    assert "line 2 of the code: {{ steps.load.data }} cannot be used inside Python code" in done.stderr
    assert "variables:" in done.stderr


def test_inline_syntax_error_fails_to_load_naming_the_line(tmp_path: Path) -> None:
    write_app(tmp_path, {"stepwell.yml": """
        actions:
          - name: a
            steps:
              - name: s
                code: |
                  x = 1
                  return x +
    """})
    with pytest.raises(AppError) as caught:
        load_app(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'stepwell.yml'}:5: actions[0].steps[0].code: "
                                        "invalid Python (invalid syntax, line 2 of the code: return x +)")


# -- the app file ----------------------------------------------------------------------


def _load_error(tmp_path: Path, text: str, files: dict[str, str] | None = None) -> str:
    write_app(tmp_path, {"stepwell.yml": text, **(files or {})})
    with pytest.raises(AppError) as caught:
        load_app(tmp_path)
    return str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("actions:\n  - name: a\n    steps:\n      - {name: s, code: 'return 1', items: [1]}\n",
     ":4: actions[0].steps[0].items: `items` cannot be used on a code step"),
    ("actions:\n  - name: a\n    steps:\n      - {name: s, code: 'return 1', colour: red}\n",
     ":4: actions[0].steps[0].colour: unknown key 'colour'"),
    ("actions:\n  - name: a\n    steps:\n      - {name: s, code: 'return 1', tmp: 8MiB}\n",
     "unknown key 'tmp' (set `tmp` for action steps in the app's `defaults:` (the app's actions "
     "share their warm workers); allowed keys:"),
    ("actions:\n  - name: a\n    steps:\n      - {name: s, loop: b}\n",
     ":4: actions[0].steps[0].loop: no action named 'b'"),
    ("actions:\n  - name: a\n    steps:\n      - {name: s, code: 'return 1', python: x.py}\n",
     "actions[0].steps[0].code: an action step has exactly one of python:, code:"),
    ("actions:\n  - name: a\n    steps:\n      - name: s\n        code: return x\n"
     "        variables: {data: '{{ params.x }}'}\n",
     ":6: actions[0].steps[0].variables.data: variable 'data' would hide the built-in `data`"),
    ("actions:\n  - name: a\n    steps:\n      - name: s\n        code: return x\n"
     "        variables: {x: '{{ params.x() }}'}\n",
     "actions[0].steps[0].variables.x: calls are not allowed"),
    ("actions:\n  - name: a\n    steps:\n      - name: s\n        code: return x\n"
     "        variables: {x: '{{ parms.x }}'}\n",
     "unknown name 'parms'"),
    ("actions:\n  - name: a\n    steps:\n      - {name: s, python: gone.py}\n",
     ":4: actions[0].steps[0].python: python file 'gone.py' not found"),
    ("actions:\n  - name: a\n    steps:\n      - {name: s, sql: \"SELECT * FROM t WHERE id = {{ params.id }}\"}\n",
     "actions[0].steps[0].sql: {{ }} templates cannot be used inside SQL"),
    ("actions:\n  - name: a\n    steps: []\n", "actions[0].steps: an action needs at least one step"),
    ("actions:\n  - name: a\n    timeout: soon\n    steps: [{name: s, code: return}]\n",
     ":3: actions[0].timeout: bad duration 'soon'"),
])
def test_app_file_errors_name_key_and_line(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _load_error(tmp_path, text)


def test_action_models(tmp_path: Path) -> None:
    write_app(tmp_path, {
        "stepwell.yml": """
            actions:
              - name: a
                params: {key: "${{ secrets.k }}"}
                timeout: 2m
                steps:
                  - {name: s, sql: q.sql, variables: {t: "${{ secrets.t }}"}}
                  - {name: l, loop: a, chunk_size: 4, max_iterations: 10, params: {n: "{{ index }}"}}
                  - {name: i, sql: "select 1"}
        """,
        "q.sql": "select 1",
    })
    action = load_app(tmp_path).actions[0]
    assert action.timeout == 120 and action.secrets == ["k", "t"]
    sql, loop, inline = action.steps
    assert (sql.kind, sql.sql_file, sql.file) == ("sql", "q.sql", "q.sql")
    assert (loop.kind, loop.source, loop.chunk_size, loop.max_iterations) == ("loop", "a", 4, 10)
    assert inline.sql_file is None and inline.source == "select 1"


# -- the expression language -----------------------------------------------------------


def test_templates_evaluate_to_values() -> None:
    context = {"params": {"ids": [1, 2], "name": "Ann", "user-id": 5},
               "steps": {"items": {"data": {"n": 3}, "error": None}}, "user": {"roles": ["a"]},
               "data": None, "error": None}
    assert templating.evaluate("{{ params.ids }}", context) == [1, 2]
    assert templating.evaluate("{{ params['user-id'] }}", context) == 5
    assert templating.evaluate("{{ steps.items.data.n }}", context) == 3  # keys, not dict methods
    assert templating.evaluate("hi {{ params.name }}!", context) == "hi Ann!"
    assert templating.evaluate("{{ params.missing }}", context) is None
    assert templating.evaluate("{{ 'a' in user.roles }}", context) is True
    assert templating.evaluate("{{ params.ids | length }}", context) == 2
    assert templating.evaluate("{{ params.nope | default('x') }}", context) == "x"
    assert templating.evaluate("{{ {'k': [1, none, true]} }}", context) == {"k": [1, None, True]}
    assert templating.evaluate("no templates", context) == "no templates"
    assert templating.evaluate_text("Bearer ${{ secrets.t }} for {{ params.name }}", context,
                                    lambda name: f"<{name}>") == "Bearer <t> for Ann"
    with pytest.raises(templating.TemplateProblem, match="has no attribute 'missing'"):
        templating.evaluate("{{ params.missing.x }}", context)


@pytest.mark.parametrize(("text", "problem"), [
    ("{{ params.x() }}", "calls are not allowed"),
    ("{{ params.__class__ }}", "names starting with '_'"),
    ("{{ params['__class__'] }}", "names starting with '_'"),
    ("{{ params.x | attr('y') }}", "filter 'attr' is not allowed"),
    ("{% for x in params %}{{ x }}{% endfor %}", "statements"),
    ("{{ params.x + 1 }}", "add is not allowed"),
    ("{{ lipsum }}", "unknown name 'lipsum'"),
    ("{{ params.x", "bad template"),
    ("{{ steps.load-user.data }}", r"write steps\['load-user'\] instead"),
])
def test_templates_refuse_anything_executable(text: str, problem: str) -> None:
    with pytest.raises(templating.TemplateProblem, match=problem):
        templating.check_template(text)


@pytest.mark.postgres
def test_actions_on_postgresql(tmp_path: Path, make_pg_database: Any) -> None:
    root = write_app(tmp_path / "app", {
        "stepwell.yml": """
            tables: [{name: orders}]
            actions:
              - name: orders_of
                steps:
                  - name: rows
                    sql: "SELECT id, amount FROM orders WHERE customer = :who AND id IN :ids ORDER BY id"
                    variables: {who: "{{ params.customer }}", ids: "{{ params.ids }}"}
                  - {name: total, code: "return sum(r['amount'] for r in data)"}
        """,
    })
    with ThreadServer(root, store_url=make_pg_database()) as server, server.client() as client:
        assert client.post("/api/tables/orders/rows", json=ORDERS).status_code == 200
        result = client.post("/api/actions/orders_of/run",
                             json={"customer": "ann", "ids": [1, 2, 3]}).json()
        assert result["steps"][0]["data"] == [{"id": 1, "amount": 10}, {"id": 3, "amount": 7}]
        assert result["data"] == 17
        injected = client.post("/api/actions/orders_of/run",
                               json={"customer": "x' OR '1'='1", "ids": [1]}).json()
        assert injected["data"] == 0

        def recorded() -> bool:
            response = client.get(f"/api/runs/{result['run_id']}")
            return response.status_code == 200 and response.json()["status"] == "succeeded"

        wait_for(recorded, 10, what="the run record in PostgreSQL")


def test_init_action_style(tmp_path: Path) -> None:
    assert cli("init", str(tmp_path / "app"), "--style", "action").returncode == 0
    done = cli("action", str(tmp_path / "app"), "greet", "--params", '{"name": "Ann"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data"]["message"] == "Hello, Ann!"


def test_an_action_over_its_memory_limit_names_the_limit(tmp_path: Path) -> None:
    app = write_app(tmp_path / "app", {"stepwell.yml": """
        defaults: {memory: 256MiB}
        actions:
          - name: hog
            steps:
              - {name: h, code: "x = b'a' * (600 * 1024 ** 2)\\nreturn len(x)"}
          - name: fine
            steps:
              - {name: f, code: "return 1"}
    """})
    result = cli("action", str(app), "hog")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error.startswith("step 'h': memory limit 256MiB exceeded (MemoryError")
    fine = cli("action", str(app), "fine")
    assert fine.returncode == 0, fine.stderr
    assert json.loads(fine.stdout)["data"] == 1


def test_the_body_is_read_as_json_whatever_its_content_type(served: Any) -> None:
    """`curl -d '{...}'` sends a form content type: the params are still JSON."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    ran = served.http.post("/api/actions/double/run", content=b'{"n": 21}', headers=form)
    assert ran.status_code == 200 and ran.json()["data"] == 42
    listed = served.http.post("/api/actions/double/run", content=b"[1, 2]", headers=form)
    assert listed.status_code == 422
    assert "the body must be a JSON object of its params, got list" in listed.text
    broken = served.http.post("/api/actions/double/run", content=b"{nope", headers=form)
    assert broken.status_code == 400 and "the body is not JSON" in broken.text
    unknown = served.http.post("/api/actions/nope/run", content=b"{nope", headers=form)
    assert unknown.status_code == 404 and "no action named 'nope'" in unknown.text


def test_jinja_templates_in_code_that_imports_jinja2_are_left_alone(tmp_path: Path) -> None:
    app = write_app(tmp_path / "app", {"stepwell.yml": """
        actions:
          - name: greet
            steps:
              - name: render
                code: |
                  from jinja2 import Template
                  return Template("Hello {{ user.name }}, {{ params.n }}").render(
                      user={"name": "ann"}, params=params)
    """})
    result = cli("action", str(app), "greet", "--params", '{"n": 3}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"] == "Hello ann, 3"


# -- the worker pool under pressure ------------------------------------------------------


@pytest.fixture
def one_worker(tmp_path: Path) -> Any:
    """An executor whose pool has a single worker (kept warm)."""
    from stepwell.engine.action_executor import ActionExecutor
    from stepwell.store import open_store

    root = write_app(tmp_path / "app", {"stepwell.yml": """
        actions:
          - name: nap
            timeout: 3s
            steps:
              - name: s
                timeout: 1s
                code: |
                  import time
                  time.sleep(float(params.get("t", 0.6)))
                  return "rested"
          - name: quick
            timeout: 1s
            steps:
              - {name: q, timeout: 1s, code: "import time; time.sleep(0.7); return 'q'"}
    """})
    app = load_app(root)
    store = open_store(None, app.root)
    executor = ActionExecutor(app, store, environ={**os.environ, "STEPWELL_ACTION_WORKERS": "1",
                                                  "STEPWELL_ACTION_WARM": "1"})
    try:
        yield executor
    finally:
        executor.close()
        store.close()


def _invoke_together(executor: Any, name: str, count: int) -> list[Any]:
    results: list[Any] = [None] * count

    def call(index: int) -> None:
        results[index] = executor.invoke(name, {}, {"id": "t", "roles": []})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_waiting_for_a_free_worker_does_not_count_against_the_step_limit(one_worker: Any) -> None:
    # three 0.6 s calls on one worker: the last waits 1.2 s, more than its step's 1 s
    results = _invoke_together(one_worker, "nap", 3)
    assert [r.status for r in results] == ["succeeded"] * 3, [r.error for r in results]
    # the action's own limit does count the wait, and says that it was a wait
    late = [r for r in _invoke_together(one_worker, "quick", 2) if r.status != "succeeded"]
    assert [r.status for r in late] == ["timed_out"]
    assert "action 'quick' exceeded its time limit (1s): step 'q' waited" in late[0].error
    assert "for a free worker (all 1 were busy; STEPWELL_ACTION_WORKERS" in late[0].error


def test_a_dead_idle_worker_is_replaced_not_handed_a_call(one_worker: Any) -> None:
    assert one_worker.invoke("nap", {"t": 0}, {"id": "t", "roles": []}).status == "succeeded"
    (idle,) = wait_for(lambda: list(one_worker.pool._idle), 10, what="an idle worker")
    idle.process.kill()
    time.sleep(0.2)
    result = one_worker.invoke("nap", {"t": 0}, {"id": "t", "roles": []})
    assert result.status == "succeeded", result.error


def test_shutdown_lets_calls_end_then_cancels_them_and_refuses_new_ones(tmp_path: Path) -> None:
    root = write_app(tmp_path / "app", {"stepwell.yml": """
        actions:
          - name: long
            steps:
              - {name: s, timeout: 60s, code: "import time; print('in'); time.sleep(30)"}
          - name: echo
            steps:
              - {name: e, code: "return params"}
    """})
    server = ThreadServer(root, shutdown_timeout=1.0)
    outcome: dict[str, Any] = {}
    with server.client() as client:
        caller = threading.Thread(target=lambda: outcome.update(
            client.post("/api/actions/long/run", json={}).json()))
        caller.start()
        wait_for(lambda: client.get("/api/runs", params={"status": "running"}).json()["runs"], 10,
                 what="the long call")  # fmt: skip
        stopper = threading.Thread(target=server.stop)
        began = time.monotonic()
        stopper.start()
        refused = wait_for(lambda: (r := client.post("/api/actions/echo/run", json={}))
                           .status_code == 503 and r, 5, what="a refused call")  # fmt: skip
        assert "shutting down" in refused.json()["error"]["message"]
        caller.join(20)
        stopper.join(30)
    assert outcome["status"] == "cancelled", outcome
    assert time.monotonic() - began < 15
    from stepwell.store import open_store

    store = open_store(None, root)
    try:
        assert store.get_run(outcome["run_id"]).status == "cancelled"
    finally:
        store.close()


@pytest.fixture
def litter_worker(tmp_path: Path) -> Any:
    """An executor whose pool has a single warm worker, for an app with a small /tmp."""
    from stepwell.engine.action_executor import ActionExecutor
    from stepwell.store import open_store

    root = write_app(tmp_path / "app", {"stepwell.yml": """
        defaults: {tmp: 4MiB}
        actions:
          - name: litter
            steps:
              - name: l
                code: |
                  import os, tempfile, uuid
                  tmp = tempfile.gettempdir()  # (/tmp, unless there is no mount namespace)
                  with open(f"{tmp}/{params['who']}.txt", "w") as out:
                      out.write(params["secret"])
                  with open(f"{tmp}/{uuid.uuid4().hex}.bin", "wb") as out:
                      out.write(b"x" * 3 * 1024**2)
                  os.makedirs(f"{tmp}/.cache/deep/er")
                  os.symlink("/etc", f"{tmp}/etc-link")
                  os.chmod(tmp, 0o777)
                  try:
                      os.setxattr(tmp, "user.note", params["secret"].encode())
                  except OSError:  # (no user attributes on this file system)
                      pass
                  if tmp == "/tmp":  # (and /dev/shm is the sandbox's own too)
                      with open(f"/dev/shm/{params['who']}", "w") as out:
                          out.write(params["secret"])
                  return "littered"
          - name: peek
            steps:
              - name: p
                code: |
                  import os, tempfile
                  tmp = tempfile.gettempdir()
                  shm = sorted(os.listdir("/dev/shm")) if tmp == "/tmp" else []
                  return [sorted(os.listdir(tmp)), oct(os.stat(tmp).st_mode & 0o777), shm,
                          os.listxattr(tmp)]
          - name: detach
            steps:
              - name: d
                code: |
                  import subprocess
                  loop = "while true; do date > $TMPDIR/still-here; sleep 0.05; done"
                  return subprocess.Popen(["sh", "-c", loop], start_new_session=True).pid
""" + RUNNING_ACTION + """\
          - name: end_worker
            steps:
              - {name: e, code: "import os, signal; os.kill(os.getppid(), signal.SIGKILL); return 1"}
          - name: stop_worker
            steps:
              - {name: e, code: "import os, signal; os.kill(os.getppid(), signal.SIGSTOP); return 1"}
    """})
    app = load_app(root)
    store = open_store(None, app.root)
    executor = ActionExecutor(app, store, environ={**os.environ, "STEPWELL_ACTION_WORKERS": "1",
                                                  "STEPWELL_ACTION_WARM": "1"})
    try:
        yield executor
    finally:
        executor.close()
        store.close()


def _call(executor: Any, name: str, params: dict[str, Any] | None = None, who: str = "t") -> Any:
    result = executor.invoke(name, params or {}, {"id": who, "roles": []})
    assert result.status == "succeeded", result.error
    return result.data


def test_what_a_call_leaves_in_tmp_is_gone_for_the_next_call(litter_worker: Any) -> None:
    """A warm worker's calls share its sandbox: what one leaves in /tmp would reach
    the next call, whoever makes it, and fill the worker's `tmp` limit call by call."""
    before = _call(litter_worker, "peek")
    for _ in range(3):  # 3 MiB each, 4 MiB in all: only when each call's files go
        assert _call(litter_worker, "litter", {"who": "mallory", "secret": "4111-1111"},
                     who="mallory") == "littered"  # fmt: skip
        assert _call(litter_worker, "peek", who="alice") == before


def test_ipc_objects_a_call_leaves_are_gone_for_the_next_call(
    tmp_path: Path, host_message_queue: tuple[str, str]
) -> None:
    """A warm worker's calls share its IPC namespace: a System V shared memory
    segment, semaphore set or message queue, or a POSIX message queue, that one
    call leaves (holding its user's data) would reach the next call, whoever makes
    it. The POSIX queues show through an ``mqueue`` mount (/dev/mqueue on most
    hosts: the fixture mounts one), which the sandbox makes the worker's own."""
    from stepwell.engine.action_executor import ActionExecutor
    from stepwell.store import open_store

    mount_point, host_queue = host_message_queue
    root = write_app(tmp_path / "app", {"stepwell.yml": f"""
        actions:
          - name: ipc_litter
            steps:
              - name: l
                code: |
                  import ctypes, os
                  libc = ctypes.CDLL(None, use_errno=True)
                  created = [libc.shmget(0x5157, 4096, 0o1666), libc.semget(0x5157, 1, 0o1666),
                             libc.msgget(0x5157, 0o1666),
                             libc.mq_open(b"/left-by-mallory", os.O_CREAT | os.O_RDWR, 0o600, None)]
                  assert -1 not in created, os.strerror(ctypes.get_errno())
                  return "littered"
          - name: ipc_peek
            steps:
              - name: p
                code: |
                  import os
                  tables = [open(f"/proc/sysvipc/{{kind}}").read().splitlines()[1:]
                            for kind in ("shm", "sem", "msg")]
                  return [tables, sorted(os.listdir("{mount_point}"))]
    """})
    app = load_app(root)
    store = open_store(None, app.root)
    executor = ActionExecutor(app, store, environ={**os.environ, "STEPWELL_ACTION_WORKERS": "1",
                                                  "STEPWELL_ACTION_WARM": "1"})
    try:
        before = _call(executor, "ipc_peek", who="alice")
        assert before == [[[], [], []], []], "the host's IPC objects are in the worker's view"
        for _ in range(2):  # (the second time, the keys are free again)
            assert _call(executor, "ipc_litter", who="mallory") == "littered"
            assert _call(executor, "ipc_peek", who="alice") == before
    finally:
        executor.close()
        store.close()
    assert host_queue[1:] in os.listdir(mount_point)  # (the host's own queue is untouched)


def test_a_call_leaving_many_files_does_not_hold_up_the_next(tmp_path: Path) -> None:
    """Removing 150,000 files took the next call's time (over 2 s, past its 1 s
    limit): past a few thousand, the worker ends, its /tmp with it, and the next
    call goes to a new one."""
    from stepwell.engine.action_executor import ActionExecutor
    from stepwell.store import open_store

    root = write_app(tmp_path / "app", {"stepwell.yml": """
        actions:
          - name: many
            steps:
              - name: m
                timeout: 60s
                code: |
                  import os, tempfile
                  for i in range(params["n"]):
                      open(os.path.join(tempfile.gettempdir(), f"f{i}"), "w").close()
          - name: quick
            steps:
              - {name: q, timeout: 1s, code: "import os, tempfile; return os.listdir(tempfile.gettempdir())"}
    """})
    app = load_app(root)
    store = open_store(None, app.root)
    executor = ActionExecutor(app, store, environ={**os.environ, "STEPWELL_ACTION_WORKERS": "1",
                                                  "STEPWELL_ACTION_WARM": "1"})
    try:
        before = _call(executor, "quick")
        _call(executor, "many", {"n": 150_000}, who="mallory")
        assert _call(executor, "quick", who="alice") == before
    finally:
        executor.close()
        store.close()


def test_a_process_a_call_started_in_a_session_of_its_own_ends_with_the_call(
    litter_worker: Any,
) -> None:
    pid = _call(litter_worker, "detach")
    assert isinstance(pid, int)
    wait_for(lambda: _call(litter_worker, "running", {"pid": pid}) is False, 10,
             what="the process the call started in its own session to end")
    assert "still-here" not in _call(litter_worker, "peek")[0]


def test_a_call_after_one_that_ended_its_worker_gets_a_new_worker(litter_worker: Any) -> None:
    """The worker a call killed went back to the pool (its result came first) and was
    handed the next call, whoever made it, which failed: "the worker running the step
    ended". A worker gone before the call's code said anything is replaced, the call
    given to another."""
    for _ in range(3):
        litter_worker.invoke("end_worker", {}, {"id": "mallory", "roles": []})
        assert _call(litter_worker, "peek", who="alice")[1] == "0o700"


def test_a_call_after_one_that_stopped_its_worker_gets_a_new_worker(litter_worker: Any) -> None:
    """A call may stop its worker (SIGSTOP: calls run as the worker's user): the next
    call, whoever made it, was handed the stopped worker and waited out its time limit."""
    for _ in range(2):
        assert litter_worker.invoke("stop_worker", {}, {"id": "mallory", "roles": []}).data == 1
        began = time.monotonic()
        assert _call(litter_worker, "peek", who="alice")[1] == "0o700"
        assert time.monotonic() - began < 10
