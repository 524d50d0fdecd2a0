"""Shared test fixtures: stores for both backends and a throwaway PostgreSQL.

PostgreSQL tests need the server binaries (``initdb``, ``pg_ctl``; CI installs
the ``postgresql`` package). One cluster is started per test session in a
temporary folder, listening on 127.0.0.1 only, with trust authentication;
every test that asks for a PostgreSQL store gets its own fresh database.
Missing binaries make those tests fail with a message saying what to install,
unless ``STEPWELL_SKIP_POSTGRES=1`` is set, in which case they are skipped.

Other test modules reuse this: ask for the ``make_pg_database`` fixture (a
callable returning the URL of a new empty database) or ``pg_url`` (the
session's shared database), e.g. to run a whole app against PostgreSQL::

    def test_app_on_postgres(make_pg_database, tmp_path):
        url = make_pg_database()
        ...
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from stepwell.store import DuckDBStore, Store

SKIP_ENV = "STEPWELL_SKIP_POSTGRES"
_SYSTEM_USER = "postgres"


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding initdb, or one on PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """A private PostgreSQL server in a temporary folder, for one test session."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="stepwell-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_file = self.root / "server.log"
        self.port = _free_port()
        self._as_other_user = os.geteuid() == 0
        self._counter = itertools.count(1)
        self.socket_dir.mkdir()
        if self._as_other_user:
            # initdb and postgres refuse to run as root: hand the folder to the
            # postgres system user and run the server binaries as that user.
            try:
                entry = pwd.getpwnam(_SYSTEM_USER)
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise RuntimeError(
                    f"running as root, but there is no {_SYSTEM_USER!r} system user to run "
                    "the server as (PostgreSQL refuses to run as root); install the "
                    "postgresql package, which creates it, or run the tests as another user"
                ) from None
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_other_user:
            command = ["runuser", "-u", _SYSTEM_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{log}"
            )

    def start(self) -> None:
        self._run(
            "initdb",
            "-D", str(self.data_dir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
        )  # fmt: skip
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.socket_dir}",
                "-c listen_addresses=127.0.0.1",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        self.url = self.create_database("stepwell")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        name = name or f"test_{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY FILE_COPY')
        return self.url_for(name)

    def stop(self) -> None:
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL server (started on first use)."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"PostgreSQL tests skipped because {SKIP_ENV}=1")
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL server binaries not found (looked for initdb under "
            "/usr/lib/postgresql/*/bin and on PATH): install the 'postgresql' package "
            f"(e.g. apt-get install postgresql), or set {SKIP_ENV}=1 to skip these tests",
            pytrace=False,
        )
    cluster: PostgresCluster | None = None
    try:
        cluster = PostgresCluster(bin_dir)
        cluster.start()
    except Exception as exc:
        if cluster is not None:
            cluster.stop()
        pytest.fail(f"could not start a test PostgreSQL server: {exc}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_url(pg_cluster: PostgresCluster) -> str:
    """URL of a database on the session's PostgreSQL server, shared by all tests."""
    return pg_cluster.url


@pytest.fixture
def make_pg_database(pg_cluster: PostgresCluster) -> Callable[[], str]:
    """A callable that creates a fresh, empty PostgreSQL database and returns its URL."""
    return pg_cluster.create_database


@pytest.fixture
def duckdb_store(tmp_path: Path) -> Iterator[DuckDBStore]:
    from stepwell.store import DuckDBStore

    store = DuckDBStore(tmp_path / "store.duckdb")
    yield store
    store.close()


@pytest.fixture(params=["duckdb", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each test runs once per backend; PostgreSQL tests get a fresh database."""
    from stepwell.store import open_store

    if request.param == "duckdb":
        opened = open_store(f"duckdb://{tmp_path / 'store.duckdb'}", tmp_path)
    else:
        make_database = request.getfixturevalue("make_pg_database")
        opened = open_store(make_database(), tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def host_message_queue() -> Iterator[tuple[str, str]]:
    """A POSIX message queue of the host's IPC namespace, readable by anyone, with
    a message in it, seen through an ``mqueue`` mount (as systemd mounts one at
    /dev/mqueue): (the mount point, the queue's name)."""
    if os.geteuid() != 0:
        pytest.skip("mounting an mqueue file system needs root")
    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    name = f"/stepwell-canary-{os.getpid()}".encode()
    fd = rt.mq_open(name, os.O_CREAT | os.O_RDWR, 0o644, None)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    assert rt.mq_send(fd, b"host-only message", 17, 0) == 0
    mount_point = tempfile.mkdtemp(dir="/var/tmp")
    os.chmod(mount_point, 0o755)
    subprocess.run(["mount", "-t", "mqueue", "none", mount_point], check=True)
    try:
        yield mount_point, name.decode()
    finally:
        subprocess.run(["umount", mount_point], check=True)
        os.rmdir(mount_point)
        os.close(fd)
        rt.mq_unlink(name)


@pytest.fixture
def sinks_write_to_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Let plugin processes (the test plugin's file sink) write to ``tmp_path``: they
    run in the run sandbox, as its user, where the host's folders are read-only."""
    tmp_path.chmod(0o777)
    monkeypatch.setenv("STEPWELL_PLUGIN_WRITE_PATHS", str(tmp_path))
    return tmp_path
