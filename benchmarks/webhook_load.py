"""Webhook throughput: N concurrent POSTs to a real `stepwell serve`, zero rows lost.

A `stepwell serve` subprocess on a free loopback port receives N webhook posts
(one JSON row each) from an asyncio httpx client with C connections; an
``upstream`` step copies each new row to a second table meanwhile. Side by
side, the same client posts the same bodies to a bare FastAPI endpoint on
uvicorn that only parses the JSON (no store, no commit): the ratio shows what
committing every post before answering costs. Afterwards both tables are
checked: every posted row is there exactly once.

    uv run python benchmarks/webhook_load.py [--posts 2000] [--concurrency 32]

Writes benchmarks/results/webhook_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

APP = {
    "stepwell.yml": """
        title: webhook load
        tables: [{name: events}, {name: copied}]
        webhooks:
          - name: ingest
            table: events
        steps:
          - name: copy
            node: copy.py
            inputs: {events: events}
            outputs: {copied: copied}
            trigger: upstream
    """,
    "copy.py": """
        from patterns import Table
        out = Table("copied", "w")
        rows = [{"i": r["i"], "source": r["patterns_id"]} for r in Table("events").as_stream().consume_records()]
        out.append(rows)
    """,
}

BARE_SERVER = """
import json, sys
import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()

@app.post("/api/webhooks/ingest", status_code=202)
async def ingest(request: Request):
    rows = json.loads(await request.body())
    rows = rows if isinstance(rows, list) else [rows]
    return {"rows": len(rows), "ids": ["x" * 26 for _ in rows]}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


async def post_all(url: str, posts: int, concurrency: int, path: str = "/api/webhooks/ingest",
                   token: str | None = None) -> dict[str, Any]:
    """POST ``{"i": k}`` for k in range(posts) with ``concurrency`` connections.

    Returns seconds, requests/s, the status codes and the ids each post got."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ids: dict[int, list[str]] = {}
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in range(posts):
        queue.put_nowait(k)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:

        async def worker() -> None:
            while True:
                try:
                    k = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                for attempt in range(3):
                    try:
                        response = await client.post(path, json={"i": k})
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 202:
                    ids[k] = response.json()["ids"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests_per_second": posts / seconds, "statuses": statuses, "ids": ids}


async def post_all_raw(url: str, posts: int, concurrency: int,
                       path: str = "/api/webhooks/ingest") -> dict[str, Any]:
    """Like :func:`post_all`, with a minimal keep-alive HTTP/1.1 client on asyncio
    streams: far cheaper per request than httpx, so the server, not the client,
    sets the pace. Same bodies, same checks."""
    from urllib.parse import urlsplit

    target = urlsplit(url)
    ids: dict[int, list[str]] = {}
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in range(posts):
        queue.put_nowait(k)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(target.hostname, target.port)
        try:
            while True:
                try:
                    k = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = b'{"i": %d}' % k
                writer.write(
                    b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s"
                    % (path.encode(), target.netloc.encode(), len(body), body)
                )
                status_line = await reader.readline()
                status = int(status_line.split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                payload = await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 202:
                    ids[k] = json.loads(payload)["ids"]
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests_per_second": posts / seconds, "statuses": statuses, "ids": ids}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout}s")


def bare_baseline(posts: int, concurrency: int, client: str = "httpx") -> dict[str, Any]:
    """The same load against a FastAPI endpoint that stores nothing."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/docs", proc)
        return asyncio.run(CLIENTS[client](url, posts, concurrency))
    finally:
        proc.terminate()
        proc.wait(30)


def stepwell_run(posts: int, concurrency: int, store: str | None = None,
                 client: str = "httpx") -> dict[str, Any]:
    """The load against `stepwell serve`, then a check that no row was lost or repeated."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serverutil import ServerProcess, wait_for

    with tempfile.TemporaryDirectory(prefix="stepwell-load-") as tmp:
        root = Path(tmp) / "app"
        root.mkdir()
        for name, text in APP.items():
            (root / name).write_text(textwrap.dedent(text).lstrip("\n"))
        args = ["--store", store] if store else []
        with ServerProcess(root, *args) as server:
            result = asyncio.run(CLIENTS[client](server.url, posts, concurrency))
            with server.client() as client:
                def settled() -> bool:
                    tables = {t["name"]: t["rows"] for t in client.get("/api/tables").json()["tables"]}
                    idle = client.get("/api/health").json()
                    return tables.get("copied") == posts and not idle["running"] and not idle["queued"]

                start = time.perf_counter()
                try:
                    wait_for(settled, 120, interval=0.2, what="the upstream step to copy every row")
                except AssertionError:
                    pass
                result["copy_settle_seconds"] = time.perf_counter() - start
                events = client.get("/api/tables/events/rows", params={"limit": posts + 10}).json()["rows"]
                copied = client.get("/api/tables/copied/rows", params={"limit": posts + 10}).json()["rows"]
                result["copy_runs"] = len(client.get("/api/runs", params={"step": "copy", "limit": 1000}).json()["runs"])
    posted = result.pop("ids")
    returned_ids = sorted(i for ids in posted.values() for i in ids)
    result["accepted"] = len(posted)
    result["rows_stored"] = len(events)
    result["rows_lost"] = len(set(range(posts)) - {r["i"] for r in events})
    result["rows_duplicated"] = len(events) - len({r["i"] for r in events})
    result["ids_match"] = returned_ids == sorted(r["patterns_id"] for r in events)
    result["copied_rows"] = len(copied)
    result["copied_lost"] = len(set(range(posts)) - {r["i"] for r in copied})
    result["copied_duplicated"] = len(copied) - len({r["i"] for r in copied})
    return result


CLIENTS = {"httpx": post_all, "raw": post_all_raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--store", default=None, help="a postgresql:// URL (default: DuckDB)")
    parser.add_argument("--clients", default="httpx,raw",
                        help="client(s) to load with: httpx (asyncio httpx), raw (minimal HTTP/1.1)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import save

    os.environ.setdefault("STEPWELL_LOG_LEVEL", "warning")
    results: dict[str, Any] = {}
    for client in args.clients.split(","):
        stepwell = stepwell_run(args.posts, args.concurrency, args.store, client)
        bare = bare_baseline(args.posts, args.concurrency, client)
        bare.pop("ids")
        ratio = stepwell["requests_per_second"] / bare["requests_per_second"]
        print(f"[{client} client] stepwell webhooks: {stepwell['requests_per_second']:.0f} requests/s "
              f"({args.posts} posts, {args.concurrency} connections, each committed before its 202); "
              f"bare FastAPI endpoint: {bare['requests_per_second']:.0f} requests/s; "
              f"ratio {ratio:.2f}")
        print(f"[{client} client] rows stored {stepwell['rows_stored']}, lost {stepwell['rows_lost']}, "
              f"duplicated {stepwell['rows_duplicated']}; copied by the upstream step "
              f"{stepwell['copied_rows']} in {stepwell['copy_runs']} runs (lost "
              f"{stepwell['copied_lost']}, duplicated {stepwell['copied_duplicated']})")
        results[client] = {"stepwell": stepwell, "bare_fastapi": bare,
                           "ratio_stepwell_over_bare": round(ratio, 3)}
    path = save("webhook_load", {
        "posts": args.posts,
        "concurrency": args.concurrency,
        "store": "postgresql" if args.store else "duckdb",
        "clients": results,
    })
    print(f"written {path}")


if __name__ == "__main__":
    main()
