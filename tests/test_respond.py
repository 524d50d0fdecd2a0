"""Ingest-and-respond webhooks: a real server on loopback, real workers, real stores.

A ``respond: true`` webhook stores its request as a row with a
``patterns_request_key`` and answers with what a step passes to
``respond_to_request`` for that key.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
from apputil import logs, run_app, write_app
from serverutil import ThreadServer, table_rows

from stepwell.engine.staging import StagedRun
from stepwell.store import open_store

APP = {
    "stepwell.yml": """
        title: ask
        tables: [{name: questions}, {name: unheard}]
        webhooks:
          - name: ask
            table: questions
            respond: true
            respond_timeout: 30s
          - name: void
            table: unheard
            respond: true
            respond_timeout: 0.5s
          - name: fragile
            table: fragile_questions
            respond: true
            respond_timeout: 60s
        steps:
          - name: answer
            node: answer.py
            inputs: {questions: questions}
            trigger: upstream
          - name: unserialisable
            node: bad.py
          - name: not_a_number
            node: nan.py
          - name: fragile
            node: fragile.py
            inputs: {questions: fragile_questions}
            trigger: upstream
    """,
    "fragile.py": """
        from patterns import Table, respond_to_request
        for record in Table("questions").as_stream().consume_records():
            if record.get("q") == "boom":
                raise ValueError("cannot answer " + record["q"])
            respond_to_request(record["patterns_request_key"], {"ok": record.get("q")})
    """,
    "bad.py": """
        from patterns import respond_to_request
        respond_to_request("some-key", {"when": object()})
    """,
    "nan.py": """
        import math
        from patterns import respond_to_request
        respond_to_request("some-key", {"v": math.nan})
    """,
    "answer.py": """
        from patterns import Table, respond_to_request
        for record in Table("questions").as_stream().consume_records():
            delivered = respond_to_request(
                record["patterns_request_key"],
                {"answer": record["q"].upper(), "row": record["patterns_id"]},
            )
            print("delivered" if delivered else "nobody waiting")
    """,
}


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request):
    if request.param == "duckdb":
        return None
    return request.getfixturevalue("make_pg_database")()


def test_a_step_answers_the_webhook_request(tmp_path, store_url):
    app = write_app(tmp_path / "ask", APP)
    with ThreadServer(app, store_url=store_url) as server, server.client() as client:
        hooks = {h["name"]: h for h in client.get("/api/webhooks").json()}
        assert hooks["ask"]["respond"] is True
        first = client.post("/api/webhooks/ask", json={"q": "hello"})
        assert first.status_code == 200, first.text
        assert first.json()["answer"] == "HELLO"
        # concurrent requests each get their own answer
        answers: dict[str, object] = {}

        def ask(word: str) -> None:
            answers[word] = client.post("/api/webhooks/ask", json={"q": word}).json()

        threads = [threading.Thread(target=ask, args=(w,)) for w in ("a", "bb", "ccc")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {w: a["answer"] for w, a in answers.items()} == {"a": "A", "bb": "BB", "ccc": "CCC"}
        stored = table_rows(client, "questions")
        assert sorted(r["q"] for r in stored) == ["a", "bb", "ccc", "hello"]
        assert len({r["patterns_request_key"] for r in stored}) == 4
        assert first.json()["row"] in {r["patterns_id"] for r in stored}


def test_bad_respond_requests_and_unanswered_ones_lose_nothing(tmp_path):
    app = write_app(tmp_path / "ask", APP)
    with ThreadServer(app) as server, server.client() as client:
        many = client.post("/api/webhooks/ask", json=[{"q": "x"}, {"q": "y"}])
        assert many.status_code == 422 and "one JSON object" in many.json()["error"]["message"]
        forged = client.post("/api/webhooks/ask", json={"q": "x", "patterns_request_key": "k"})
        assert forged.status_code == 422 and "set by the server" in forged.json()["error"]["message"]
        # no step reads `unheard`: the request times out, its row is kept
        silent = client.post("/api/webhooks/void", json={"q": "anyone?"})
        assert silent.status_code == 504
        error = silent.json()["error"]
        assert error["code"] == "no_response" and "0.5s" in error["message"]
        assert "respond_to_request" in error["message"]
        (row,) = table_rows(client, "unheard")
        assert row["q"] == "anyone?" and row["patterns_request_key"] in error["message"]
        assert len(server.ctx.hub.responses) == 0  # nothing left waiting


def test_a_run_failing_with_the_request_in_hand_answers_502_at_once(tmp_path):
    app = write_app(tmp_path / "ask", APP)
    with ThreadServer(app) as server, server.client() as client:
        assert client.post("/api/webhooks/fragile", json={"q": "fine"}).json() == {"ok": "fine"}
        # an empty object is a request too (its row holds the request key)
        assert client.post("/api/webhooks/fragile", json={}).json() == {"ok": None}
        began = time.monotonic()
        failed = client.post("/api/webhooks/fragile", json={"q": "boom"})
        assert time.monotonic() - began < 30  # not the 60 s respond_timeout
        assert failed.status_code == 502, failed.text
        error = failed.json()["error"]
        assert error["code"] == "step_failed"
        assert "ValueError: cannot answer boom" in error["message"]
        (row,) = [r for r in table_rows(client, "fragile_questions") if r["q"] == "boom"]
        assert row["patterns_request_key"] in error["message"]  # the request is kept
        assert len(server.ctx.hub.responses) == 0
        # the failing row now comes first in every run: a later request's run fails on
        # it before reaching its own row, and that request is told so at once (not 504)
        began = time.monotonic()
        later = client.post("/api/webhooks/fragile", json={"q": "after"})
        assert time.monotonic() - began < 30
        assert later.status_code == 502, later.text
        message = later.json()["error"]["message"]
        assert "of step 'fragile', which reads the request's row, ended failed without " \
               "answering it: ValueError: cannot answer boom" in message


def test_respond_outside_the_server_returns_false_and_says_so(tmp_path):
    app = write_app(tmp_path / "ask", APP)
    store = open_store(None, app)
    try:
        seed = StagedRun(store, "seed", "seed")
        seed.write("questions", pa.table({"q": ["late"], "patterns_request_key": ["gone"]}))
        seed.commit(None, None)
    finally:
        store.close()
    (run,) = run_app(app, steps=["answer"])
    assert run.status == "succeeded", run.error
    lines = logs(app, run.id)
    assert any("respond_to_request('gone'): no request is waiting" in line for line in lines), lines
    assert "nobody waiting" in lines
    (bad,) = run_app(app, steps=["unserialisable"])
    assert bad.status == "failed"
    assert "respond_to_request's payload must be JSON-serialisable" in bad.error
    assert "bad.py:2" in bad.error
    (nan,) = run_app(app, steps=["not_a_number"])
    assert nan.status == "failed" and "NaN or infinity; use None" in nan.error, nan.error
    assert "nan.py:3" in nan.error


def test_a_request_waiting_when_the_server_stops_gets_a_503_naming_its_row(tmp_path):
    import httpx

    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            webhooks:
              - {name: ask, table: questions, respond: true, respond_timeout: 60s}
            steps:
              - name: answer
                node: answer.py
                inputs: {questions: questions}
                trigger: upstream
        """,
        "answer.py": """
            import time
            from patterns import Table, respond_to_request
            for record in Table("questions").as_stream().consume_records():
                respond_to_request(record["patterns_request_key"], {"ok": record["q"]})
            time.sleep(2)  # the next request's run waits in the queue meanwhile
        """,
    })
    answers = []
    with ThreadServer(app, shutdown_timeout=30) as server, server.client() as client:
        assert client.post("/api/webhooks/ask", json={"q": 1}, timeout=60).json() == {"ok": 1}

        def ask() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as own:
                answers.append(own.post("/api/webhooks/ask", json={"q": 2}))

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(0.5)  # stored, its run queued behind the sleeping one: now stop
    asker.join(30)
    (response,) = answers
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "shutting_down"
    assert "the server shut down before a step answered; the request is stored as row" in error["message"]
