"""Per-app Python environments, built once per requirements content hash.

An app may declare ``requirements_file: requirements.txt``.  Its steps run in
worker processes started with the host's Python, which already has stepwell,
pyarrow, pandas and friends; the app's extra packages go into a virtual
environment built with ``uv`` and cached under a key derived from the content
of the requirements file.  Every later run with the same requirements reuses
that environment, and the worker puts its ``site-packages`` in front of
``sys.path`` (see :func:`prepend_site_packages`).

Layout of the cache directory (``$STEPWELL_CACHE_DIR`` or
``~/.cache/stepwell/envs``)::

    <key>/                  a finished environment (holds .complete)
    <key>.lock              flock(2)-ed by whoever builds <key>
    <key>.tmp-<pid>/        an environment being built, renamed to <key> when done

The key is the sha256 of the requirements file's bytes, the Python version
(major.minor and ABI) and the platform.  Local paths that the file refers to
(``./pkg``, ``./dist/pkg.whl``, ``-e ../lib``, ``-r other.txt``, ``file:...``)
are hashed by content as well, so editing a local package or an included file
gives a new environment, and two apps whose files read the same but point at
different local packages do not share one.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = [
    "EnvError",
    "EnvInfo",
    "default_cache_dir",
    "ensure_env",
    "env_for_app",
    "env_key",
    "prepend_site_packages",
]

COMPLETE_MARKER = ".complete"
"""File written into an environment once it is fully installed."""

_PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
_ERROR_LINES = 3  # how many of uv's last output lines go into an EnvError
_SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        "__pycache__",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".tox",
        ".nox",
        "node_modules",
        "build",
        "dist",
    }
)


class EnvError(RuntimeError):
    """An app environment could not be built; the message is one line for users."""


@dataclass(frozen=True)
class EnvInfo:
    """A ready environment.

    Attributes:
        key: hex sha256 the environment is cached under.
        site_packages: the environment's ``lib/pythonX.Y/site-packages``.
        reused: True if an existing environment was found (possibly one that a
            concurrent caller had just built), False if this call built it.
        build_seconds: wall time this call spent building (0.0 when reused).
    """

    key: str
    site_packages: Path
    reused: bool
    build_seconds: float

    def log_line(self, requirements_file: str, first_use: bool) -> str:
        """What a run's log says of the environment it runs in (built by this
        process for its first use, else reused)."""
        how = "reused" if self.reused or not first_use else f"built in {self.build_seconds:.1f}s"
        return f"[stepwell] environment {self.key[:12]} for {requirements_file}: {how}"


def default_cache_dir() -> Path:
    """``$STEPWELL_CACHE_DIR`` if set, else ``~/.cache/stepwell/envs``."""
    configured = os.environ.get("STEPWELL_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "stepwell" / "envs"


def env_key(requirements_file: Path) -> str:
    """Return the cache key for ``requirements_file`` on this interpreter."""
    req = Path(requirements_file).expanduser().resolve()
    digest = hashlib.sha256()
    digest.update(_read(req))
    platform_tag = "\0".join(
        [
            f"python={_PY_VERSION}",
            f"implementation={sys.implementation.name}",
            f"soabi={sysconfig.get_config_var('SOABI') or ''}",
            f"platform={sysconfig.get_platform()}",
        ]
    )
    digest.update(b"\0" + platform_tag.encode())
    _hash_local_refs(req, digest, seen=set())
    return digest.hexdigest()


def ensure_env(requirements_file: Path, cache_dir: Path | None = None) -> EnvInfo:
    """Return an environment with ``requirements_file`` installed, building it if needed.

    The build (``uv venv`` + ``uv pip install -r``, run from the requirements
    file's folder so relative paths work) happens at most once per key: callers
    in other threads or processes wait on a file lock and then reuse the result.

    Raises:
        EnvError: the file cannot be read, ``uv`` is missing, or installation
            failed (the message names the file and quotes uv's last lines).
    """
    req = Path(requirements_file).expanduser().resolve()
    key = env_key(req)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key

    if (final / COMPLETE_MARKER).is_file():
        return EnvInfo(key, _site_packages(final), reused=True, build_seconds=0.0)

    with _locked(root / f"{key}.lock"):
        if (final / COMPLETE_MARKER).is_file():  # built while we waited
            return EnvInfo(key, _site_packages(final), reused=True, build_seconds=0.0)
        started = time.monotonic()
        _build(req, key, root)
        return EnvInfo(
            key,
            _site_packages(final),
            reused=False,
            build_seconds=time.monotonic() - started,
        )


def env_for_app(
    app_root: Path, requirements_file: str | None, cache_dir: Path | None = None
) -> EnvInfo | None:
    """Environment for an app whose manifest says ``requirements_file: ...``.

    ``requirements_file`` is relative to ``app_root`` (an absolute path is used
    as is).  Returns None when the app declares no requirements.
    """
    if not requirements_file or not requirements_file.strip():
        return None
    req = Path(app_root) / requirements_file.strip()
    if not req.is_file():
        raise EnvError(f"requirements file {req} declared by the app does not exist")
    return ensure_env(req, cache_dir=cache_dir)


def prepend_site_packages(site_packages: Path) -> None:
    """Put ``site_packages`` (and paths from its ``.pth`` files) first on ``sys.path``.

    Meant for worker processes: the environment's packages then take precedence
    over the host's.  Unlike a bare ``sys.path.insert``, this also honours
    ``.pth`` files, which editable installs rely on.
    """
    before = list(sys.path)
    site.addsitedir(str(site_packages))
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + [p for p in before if p not in added]


# -- building -----------------------------------------------------------------


def _build(req: Path, key: str, root: Path) -> None:
    """Build the environment for ``key``; the caller holds the key's lock."""
    final = root / key
    # Leftovers of builders that died: nobody else can be building this key now.
    for stale in root.glob(f"{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # no marker, so never finished
        shutil.rmtree(final, ignore_errors=True)

    uv = _find_uv()
    tmp = root / f"{key}.tmp-{os.getpid()}"
    try:
        _run_uv(
            [*uv, "venv", "--quiet", "--relocatable", "--python", sys.executable, str(tmp)],
            req,
            "could not create an environment for",
        )
        python = tmp / "bin" / "python"
        _run_uv(
            [*uv, "pip", "install", "--quiet", "--python", str(python), "-r", str(req)],
            req,
            "could not install requirements from",
        )
        _site_packages(tmp)  # fails loudly if the layout is not what we expect
        info = {
            "requirements_file": str(req),
            "python": sys.executable,
            "python_version": _PY_VERSION,
            "created": time.time(),
        }
        (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        os.rename(tmp, final)  # atomic publish: <key>/ exists only when complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _find_uv() -> list[str]:
    exe = shutil.which("uv")
    if exe:
        return [exe]
    if importlib.util.find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    raise EnvError(
        "stepwell needs `uv` to install app requirements but found none "
        "(not on PATH, not importable); install it with `pip install uv`"
    )


def _run_uv(cmd: list[str], req: Path, failure: str) -> None:
    env = {**os.environ, "NO_COLOR": "1", "UV_NO_PROGRESS": "1"}
    env.pop("VIRTUAL_ENV", None)  # the target is always given with --python
    try:
        proc = subprocess.run(
            cmd,
            cwd=req.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as exc:
        raise EnvError(f"{failure} {req}: cannot run uv ({exc})") from exc
    if proc.returncode != 0:
        raise EnvError(f"{failure} {req}: {_last_lines(proc.stderr or proc.stdout)}")


def _last_lines(output: str) -> str:
    """uv's last few output lines (led by its first ``error:`` line) as one line."""
    lines = [" ".join(line.split()) for line in output.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return "uv failed without output"
    tail = lines[-_ERROR_LINES:]
    first_error = next((line for line in lines if line.startswith("error:")), None)
    if first_error is not None and first_error not in tail:
        tail = [first_error, "...", *tail]
    return " | ".join(tail)


def _site_packages(env_dir: Path) -> Path:
    expected = env_dir / "lib" / f"python{_PY_VERSION}" / "site-packages"
    if expected.is_dir():
        return expected
    found = sorted(env_dir.glob("lib/python*/site-packages"))
    if found:
        return found[0]
    raise EnvError(f"environment {env_dir} has no lib/python*/site-packages")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; works across processes and threads.

    flock locks belong to the open file description, so two opens of the same
    file in one process exclude each other as well.
    """
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -- hashing local references ------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EnvError(f"cannot read requirements file {path}: {exc.strerror or exc}") from exc


def _logical_lines(text: str) -> Iterator[str]:
    """Lines of a requirements file with comments and continuations resolved."""
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.lstrip().startswith("#"):
            continue
        # pip treats " #" (whitespace, then #) as the start of a comment.
        for marker in (" #", "\t#"):
            if marker in line:
                line = line[: line.index(marker)]
        line = line.strip()
        if line:
            yield line
    if pending.strip():
        yield pending.strip()


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


# (short, long) spellings of the options whose argument may be a local path.
_PATH_OPTIONS = (("-r", "--requirement"), ("-c", "--constraint"), ("-e", "--editable"))


def _split_option(tokens: list[str]) -> tuple[str | None, str]:
    """``(short option, argument)`` for -r/-c/-e lines, ``(None, "")`` otherwise."""
    first, rest = tokens[0], (tokens[1] if len(tokens) > 1 else "")
    for short, long in _PATH_OPTIONS:
        if first in (short, long):
            return short, rest
        if first.startswith(long + "="):
            return short, first[len(long) + 1 :]
        if first.startswith(short) and not first.startswith("--"):  # -rfile.txt
            return short, first[len(short) :].lstrip("=")
    return None, ""


def _hash_local_refs(req: Path, digest: _Digest, seen: set[Path]) -> None:
    """Feed the content of local files/folders referenced by ``req`` into ``digest``."""
    if req in seen:
        return
    seen.add(req)
    base = req.parent
    try:
        text = req.read_text(errors="replace")
    except OSError:
        return  # reported by the caller (top level) or by uv (includes)
    for line in _logical_lines(text):
        try:
            tokens = shlex.split(line)
        except ValueError:
            tokens = line.split()
        if not tokens:
            continue
        option, target = _split_option(tokens)
        if option in ("-r", "-c"):
            if target and "://" not in target:
                included = (base / Path(target).expanduser()).resolve()
                digest.update(b"\0include\0" + target.encode())
                digest.update(_content_or_missing(included))
                _hash_local_refs(included, digest, seen)
            continue
        if option is None:
            if tokens[0].startswith("-"):
                continue  # --index-url and friends: covered by the file's bytes
            target = line.split(" @ ", 1)[1].strip() if " @ " in line else tokens[0]
        path = _local_path(target, base)
        if path is not None:
            digest.update(b"\0local\0" + target.encode())
            _hash_path(path, digest)


def _local_path(target: str, base: Path) -> Path | None:
    """The local path a requirement points at, or None for index/remote ones."""
    target = target.split(";", 1)[0].strip()  # environment markers
    target = target.split("#", 1)[0]  # URL fragments such as #egg=name
    if target.startswith("file://"):
        target = target[len("file://") :]
    elif target.startswith("file:"):
        target = target[len("file:") :]
    elif not target.startswith((".", "/", "~")):
        return None
    if target.endswith("]") and "[" in target:  # extras: ./pkg[cli]
        target = target[: target.rindex("[")]
    return (base / Path(target).expanduser()).resolve()


def _hash_path(path: Path, digest: _Digest) -> None:
    if path.is_file():
        digest.update(_content_or_missing(path))
        return
    if not path.is_dir():
        digest.update(b"\0missing")
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")
        )
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")):
                continue
            file = Path(dirpath) / name
            digest.update(b"\0file\0" + file.relative_to(path).as_posix().encode())
            digest.update(_content_or_missing(file))


def _content_or_missing(path: Path) -> bytes:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return b"\0missing"
