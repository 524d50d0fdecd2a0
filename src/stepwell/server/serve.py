"""Running the server: uvicorn startup, ``server.json``, signals, graceful shutdown.

While a server runs for an app, ``APP/.stepwell/server.json`` says where::

    {"url": "http://127.0.0.1:8765", "host": "127.0.0.1", "port": 8765,
     "pid": 4242, "token_path": "/abs/APP/.stepwell/token",
     "store_key": "<sha256 of the store URL>", "started_at": "...",
     "app_root": "/abs/APP"}

Other `stepwell` commands on the app read it to talk to the API instead of
opening the store (DESIGN section 7a). It is written once the server accepts
requests and removed when it exits; a file left by a process that is gone is
stale and ignored (and removed by the next reader).

SIGTERM or SIGINT: while the API still answers (runs, logs, tables, cancels;
503 for new triggers and webhook rows), stop accepting triggers, close live
event streams, give running steps ``shutdown_timeout`` seconds to end and cancel
the rest (their work since the last commit point is rolled back); then stop
listening and let HTTP requests in flight finish. Queued runs stay queued in the
store and run after the next start. A second signal cancels the running steps at
once (no more waiting) and stops listening (a third SIGINT exits at once).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import uvicorn

from stepwell.server.auth import TOKEN_FILE, TokenFile, is_loopback
from stepwell.server.context import ServerContext, ServerSettings
from stepwell.server.info import SERVER_FILE, ServerInfo, read_server_info, state_dir, store_key

#: Seconds HTTP requests in flight get on shutdown (live streams are ended first).
HTTP_GRACE_SECONDS = 5


class ServeError(Exception):
    """The server cannot start; the message says why and what to do."""


def _client_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class _Uvicorn(uvicorn.Server):
    """uvicorn that drains stepwell (``on_exit``) before it stops listening, and exits
    normally after a signal instead of re-raising it. A second signal calls
    ``on_hurry`` (running steps are cancelled instead of waited for)."""

    def __init__(self, config: uvicorn.Config, on_exit: Any, on_hurry: Any):
        super().__init__(config)
        self._on_exit = on_exit
        self._on_hurry = on_hurry
        self._draining = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining:  # a second signal: cancel running steps, stop listening now
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            threading.Thread(target=self._on_hurry, name="stepwell-hurry", daemon=True).start()
            return
        self._draining = True
        threading.Thread(target=self._drain_then_exit, name="stepwell-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        try:
            self._on_exit()
        finally:
            self.should_exit = True


class Serving:
    """One `stepwell serve` of one app."""

    def __init__(
        self,
        app_path: str | Path,
        *,
        store_url: str | None = None,
        settings: ServerSettings | None = None,
        environ: dict[str, str] | None = None,
        rotate_token: bool = False,
        out: Any = None,
    ):
        from stepwell.app import load_app

        self.environ = dict(os.environ if environ is None else environ)
        self.settings = settings or ServerSettings()
        self.spec = load_app(app_path)
        self.store_url = store_url or self.spec.store
        self.out = out if out is not None else sys.stdout
        self.rotate_token = rotate_token
        self.server: _Uvicorn | None = None
        self.ctx: ServerContext | None = None
        self.url: str | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._info_path = state_dir(self.spec.root) / SERVER_FILE
        #: True once this process joined a Ray cluster (``--executor ray``)
        self._joined_ray = False
        #: why the server stopped by itself (the Ray cluster was lost), if it did
        self._failure: str | None = None

    @property
    def rules(self) -> Any:
        """The running rule engine (None when the app has no plugins, streams or rules)."""
        return self.ctx.rules if self.ctx is not None else None

    # -- lifecycle --------------------------------------------------------------------
    def _prepare(self) -> None:
        running = read_server_info(self.spec.root)
        if running is not None:
            raise ServeError(
                f"a server already runs for this app at {running.url} (pid {running.pid}); "
                f"stop it first (kill {running.pid})"
            )
        self._sock = self._bind()
        try:
            self._build()
        except BaseException:
            self._sock.close()
            raise

    def _build(self) -> None:
        from stepwell.engine.scheduler import Scheduler
        from stepwell.server.app import create_app
        from stepwell.server.ingest import Ingest
        from stepwell.server.live import LiveHub
        from stepwell.store import open_store

        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        self.url = f"http://{_client_host(self.settings.host)}:{port}"
        tokens = TokenFile(state_dir(self.spec.root) / TOKEN_FILE)
        if self.rotate_token:
            token, created = tokens.rotate(), True
        else:
            token, created = tokens.ensure()
        auth_required = not is_loopback(self.settings.host)
        runner_factory = self._runner_factory()
        store = open_store(self.store_url, self.spec.root)
        try:
            hub = LiveHub()
            hub.tables_read_by = self._tables_read_by
            scheduler = Scheduler(
                self.spec, store, max_workers=self.settings.workers, listener=hub,
                environ=self.environ, runner_factory=runner_factory,
            )
            ingest = Ingest(
                store,
                unique_on={t.name: list(t.unique_on) for t in self.spec.tables if t.unique_on},
                on_commit=lambda table: scheduler.notify_commit([table]),
            )
        except BaseException:
            store.close()
            raise
        self.ctx = ServerContext(
            app=self.spec, store=store, scheduler=scheduler, hub=hub, ingest=ingest,
            tokens=tokens, settings=self.settings, auth_required=auth_required,
            environ=self.environ, on_ready=self._on_ready, say=self._say,
        )
        config = uvicorn.Config(
            create_app(self.ctx),
            log_level=self.environ.get("STEPWELL_LOG_LEVEL", "warning").lower(),
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=HTTP_GRACE_SECONDS,
            server_header=False,
        )
        self.server = _Uvicorn(config, on_exit=self._exit_requested, on_hurry=self._hurry)
        self._say(f"stepwell serving {self.spec.title or self.spec.root.name} at {self.url} "
                  f"(API docs: {self.url}/docs)")
        if created:
            self._say(f"API token (new): {token}\n  stored in {tokens.path}; "
                      f"rotate with `stepwell token {self.spec.root} --rotate`")
        if auth_required:
            self._say(f"listening on {host} beyond loopback: every request needs "
                      f"`Authorization: Bearer <token>` (token in {tokens.path})")
        self._say(self._ui_line(token, created, auth_required, tokens.path))

    def _runner_factory(self) -> Any:
        """What runs the steps: the local runner, or (``--executor ray``) one making
        each run a Ray task, once this process has joined the cluster."""
        from stepwell.engine.runner import Runner

        if self.settings.executor == "local":
            return Runner
        if self.settings.executor != "ray":
            raise ServeError(f"unknown executor {self.settings.executor!r}; use local or ray")
        from stepwell.engine.ray_executor import (
            RayExecutorError,
            RayRunner,
            join_cluster,
            needs_shared_store,
        )

        try:
            needs_shared_store(self.store_url or "")
            self._joined_ray = join_cluster(self.settings.ray_address)
        except RayExecutorError as exc:
            raise ServeError(str(exc)) from None
        return functools.partial(RayRunner, store_url=self.store_url,
                                 on_cluster_lost=self._cluster_lost)  # fmt: skip

    def _cluster_lost(self, why: str) -> None:
        """Stop (as on SIGTERM, then exit 1): no run can start any more, and each
        one triggered would fail. Queued runs stay queued for the next start."""
        if self._failure is not None or self.server is None:
            return
        self._failure = f"{why}; the server stopped (queued runs run after the next start)"
        self._say(f"stopping: {why}")
        self.server.handle_exit(signal.SIGTERM, None)

    def _ui_line(self, token: str, shown: bool, auth_required: bool, token_path: Path) -> str:
        """Where the web UI is. With a token required, the address carries it in
        its fragment (never sent to the server) only when the token was just
        printed anyway; otherwise the line says where the token is."""
        address = f"{self.url}/ui/"
        if not auth_required:
            return f"web UI: {address}"
        if shown:
            return f"web UI: {address}#token={token}"
        return f"web UI: {address} (it asks for the token: see {token_path})"

    def _bind(self) -> socket.socket:
        host = self.settings.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), self.settings.port))
        except OSError as exc:
            sock.close()
            raise ServeError(
                f"cannot listen on {host}:{self.settings.port}: {exc.strerror or exc}; "
                f"choose another port with --port"
            ) from None
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    def _on_ready(self) -> None:
        assert self._sock is not None and self.url is not None
        host, port = self._sock.getsockname()[:2]
        info = ServerInfo(
            url=self.url, host=self.settings.host, port=int(port), pid=os.getpid(),
            token_path=str(self.ctx.tokens.path if self.ctx else ""),
            store_key=store_key(self.store_url),
            started_at=dt.datetime.now(dt.UTC).isoformat(), app_root=str(self.spec.root),
        )
        self._info_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._info_path.with_name(SERVER_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
        os.replace(tmp, self._info_path)
        self._ready.set()

    def _tables_read_by(self, step: str) -> set[str]:
        found = next((s for s in self.spec.steps if s.name == step), None)
        return set(found.input_tables()) if found is not None else set()

    def _exit_requested(self) -> None:
        if self.ctx is not None:
            from stepwell.server.app import drain

            drain(self.ctx)

    def _hurry(self) -> None:
        if self.ctx is not None:
            self.ctx.scheduler.hurry()
            if self.ctx.actions is not None:
                self.ctx.actions.executor.cancel_all()

    def _cleanup(self) -> None:
        try:
            current = json.loads(self._info_path.read_text())
            if current.get("pid") == os.getpid():
                self._info_path.unlink()
        except (OSError, ValueError):
            pass
        if self.ctx is not None:
            self.ctx.store.close()
        if self._sock is not None:
            self._sock.close()
        if self._joined_ray:  # (the Ray cluster this process started or joined)
            import ray

            ray.shutdown()

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (blocking; the CLI's `stepwell serve`)."""
        self._prepare()
        assert self.server is not None and self._sock is not None
        # what is loaded by now stays for the server's life: keep the garbage
        # collector from scanning it again (a full pass over its ~86,000 objects took
        # 43-49 ms here)
        gc.freeze()
        try:
            self.server.run(sockets=[self._sock])
        finally:
            self._cleanup()
        if not self._ready.is_set():
            raise ServeError("the server did not start; see the messages above")
        if self._failure is not None:
            raise ServeError(self._failure)
        self._say("stepwell server stopped")

    def start_in_thread(self, timeout: float = 60.0) -> str:
        """Serve from a background thread (tests); returns the base URL when ready."""
        self._prepare()
        assert self.server is not None and self._sock is not None
        server, sock = self.server, self._sock

        def target() -> None:
            try:
                server.run(sockets=[sock])
            finally:
                self._cleanup()

        self._thread = threading.Thread(target=target, name="stepwell-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServeError("the server did not start in time")
        assert self.url is not None
        return self.url

    def stop(self, timeout: float = 120.0) -> None:
        """Graceful shutdown of a server started with :meth:`start_in_thread`."""
        if self.server is None:
            return
        self.server.handle_exit(signal.SIGTERM, None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
