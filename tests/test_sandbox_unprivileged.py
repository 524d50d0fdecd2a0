"""The sandbox when stepwell is run by an ordinary user, not root.

The rest of the suite runs as whoever runs it (root in CI), so this test runs
the real ``stepwell run`` as ``nobody``: in a private mount namespace of its
own where the folders Python and stepwell live in are visible to it (``/root``
is not, for one), then as that user with no capabilities. The fork-server must
then make itself root of its own user namespace and PID 1 of its own PID
namespace; each run still gets its own PID namespace, a read-only view and a
scrubbed environment, and hidden folders stay hidden.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from apputil import logs, rows, write_app

from stepwell.store import open_store

NOBODY = 65534

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="the suite runs as an ordinary user already: every sandbox test covers that mode",
    ),
    pytest.mark.skipif(
        not (shutil.which("unshare") and shutil.which("setpriv")), reason="needs util-linux"
    ),
]

PROBE = """
import json
import os
from patterns import Table

def can_write(path):
    try:
        open(path, "w").close()
        return True
    except OSError:
        return False

def listing(path):
    try:
        return ",".join(sorted(os.listdir(path)))
    except OSError as exc:
        return type(exc).__name__

hidden = HIDDEN
Table("seen", "w").append({
    "pid": os.getpid(),
    "pids": ",".join(sorted(p for p in os.listdir("/proc") if p.isdigit())),
    "uid_map": " ".join(open("/proc/self/uid_map").read().split()),
    "write_app": can_write(os.path.join(os.path.dirname(__file__), "written.txt")),
    "write_tmp": can_write("/tmp/written.txt"),
    "tmp_fs": ",".join(line.split()[2] for line in open("/proc/self/mounts") if line.split()[1] == "/tmp"),
    "host_env": os.environ.get("HOST_ONLY", ""),
    "hidden": listing(hidden),
})
"""


def _blocked_ancestor(path: Path) -> Path | None:
    """The topmost folder above ``path`` that others may not enter, if any."""
    for folder in reversed(path.parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


def _as_nobody(command: list[str], stage: Path) -> list[str]:
    """``command`` as nobody, in a mount namespace where the folders this Python
    and stepwell live in are reachable: a closed folder above them (``/root``) is
    replaced by an open, empty one into which only those folders are bound."""
    needed = {Path(p).resolve() for p in (sys.base_prefix, sys.prefix, Path(__file__).parents[1])}
    by_closed: dict[Path, list[Path]] = {}
    for path in needed:
        closed = _blocked_ancestor(path)
        if closed is not None:
            by_closed.setdefault(closed, []).append(path.relative_to(closed))
    script = []
    for index, (closed, inside) in enumerate(sorted(by_closed.items())):
        original = stage / str(index)
        original.mkdir()
        script += [f"mount --bind {shlex.quote(str(closed))} {original}",
                   f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(closed))}"]  # fmt: skip
        for rel in inside:
            target = shlex.quote(str(closed / rel))
            script += [f"mkdir -p {target}", f"mount --bind {shlex.quote(str(original / rel))} {target}"]
    drop = f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --inh-caps=-all"
    script.append(drop + " " + shlex.join(command))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", "\n".join(script)]


def _user_namespaces_allowed(stage: Path) -> bool:
    probe = _as_nobody(["unshare", "--user", "--pid", "--fork", "true"], stage)
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.fixture
def open_tmp():
    """A temp folder anyone may enter (pytest's ``tmp_path`` is under a closed one)."""
    # (not under /tmp: each sandbox has a /tmp of its own, so nothing there is in view)
    path = Path(tempfile.mkdtemp(prefix="stepwell-unprivileged-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_sandbox_started_by_an_ordinary_user_is_isolated(open_tmp):
    tmp_path = open_tmp
    hidden = tmp_path / "private"
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: probe\n    node: probe.py\n",
        "probe.py": PROBE.replace("HIDDEN", repr(str(hidden))),
    })  # fmt: skip
    hidden.mkdir()
    (hidden / "key.pem").write_text("secret")
    home = tmp_path / "home"
    home.mkdir()
    for path in (app, hidden, home, *app.iterdir(), hidden / "key.pem"):
        os.chown(path, NOBODY, NOBODY)
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage2").mkdir()
    full_isolation = _user_namespaces_allowed(tmp_path / "stage2")

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HOST_ONLY": "not for steps",
        "STEPWELL_SANDBOX_HIDE": str(hidden),
    }
    command = [sys.executable, "-m", "stepwell.cli", "run", str(app)]
    result = subprocess.run(
        _as_nobody(command, tmp_path / "stage"), env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    store = open_store(None, app)
    try:
        (run,) = store.list_runs("probe")
    finally:
        store.close()
    assert run.status == "succeeded"
    (seen,) = rows(app, "seen")
    assert seen["host_env"] == ""  # the environment is scrubbed
    assert not seen["write_app"] and seen["write_tmp"]  # read-only view but for /tmp
    assert not (app / "written.txt").exists()
    notes = [line for line in logs(app, run.id) if "[stepwell] sandbox:" in line]
    if full_isolation:
        assert notes == []
        assert seen["hidden"] == ""  # shown empty: nobody owns key.pem, but may not see it
        # one uid inside (0), mapped to the fork-server's namespace's only one (nobody)
        assert seen["uid_map"] == "0 0 1"
        assert seen["tmp_fs"] == "tmpfs"  # a /tmp of its own, in memory
        assert seen["pid"] == 2 and set(seen["pids"].split(",")) <= {"1", "2"}  # no host process
    else:  # the kernel refuses user namespaces to ordinary users here: the log says so
        assert any("namespace unavailable" in line for line in notes), notes


def test_a_plugin_process_started_by_an_ordinary_user_is_confined(open_tmp):
    """`sandbox.confine` (how eKuiper plugin processes start) run by an ordinary
    user: the program runs without capabilities, under seccomp, with the host
    folder it was given as its /tmp (the SDK's sockets are there), and the rest of
    the filesystem read-only."""
    folder = open_tmp / "plugin-tmp"
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    (open_tmp / "stage").mkdir()
    (open_tmp / "stage2").mkdir()
    if not _user_namespaces_allowed(open_tmp / "stage2"):
        pytest.skip("the kernel refuses user namespaces to ordinary users here")
    probe = ("echo planted > /tmp/note && ls /tmp; grep -E '^(CapEff|Seccomp):' /proc/self/status; "
             f"touch {shlex.quote(str(open_tmp))}/outside || echo read-only; "
             "echo processes $(ls /proc | grep -E '^[0-9]+$')")  # fmt: skip
    job = {"argv": ["/bin/sh", "-c", probe, "plugin.py", "{}"], "cwd": "/",
           "env": {"PATH": "/usr/bin:/bin"}, "tmp_folder": str(folder), "keep": [],
           "read_paths": [], "write_paths": [], "hide_paths": []}  # fmt: skip
    command = [sys.executable, "-I", "-m", "stepwell.sandbox.confine", json.dumps(job)]
    result = subprocess.run(_as_nobody(command, open_tmp / "stage"), capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.split()
    assert "note" in lines and "read-only" in lines, result.stdout
    assert "CapEff:" in lines and lines[lines.index("CapEff:") + 1] == "0000000000000000"
    assert lines[lines.index("Seccomp:") + 1] == "2"
    assert (folder / "note").read_text() == "planted\n" and (folder / "note").stat().st_uid == NOBODY
    assert not (open_tmp / "outside").exists()
    # a PID namespace of its own: its /proc shows its shell (1) and the few processes
    # of the probe's pipeline, numbered from there, and no host process
    shown = result.stdout.split("processes", 1)[1].split()
    assert "1" in shown and len(shown) < 6 and all(int(p) < 20 for p in shown), result.stdout
    assert "unavailable" not in result.stderr, result.stderr
