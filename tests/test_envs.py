"""Tests for stepwell.engine.envs; offline: packages are wheels written by the tests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from stepwell.engine import envs
from stepwell.engine.envs import EnvError, EnvInfo, ensure_env, env_for_app, env_key

pytestmark = pytest.mark.timeout(240)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(
    folder: Path, name: str, version: str = "0.1.0", extra: dict[str, str] | None = None
) -> Path:
    """Write a minimal pure-Python wheel holding package ``name`` (plus ``extra`` files)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\nWHO = 'wheel {name}'\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: stepwell-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
        **(extra or {}),
    }
    record = [
        f"{path},{_record_hash(text.encode())},{len(text.encode())}" for path, text in files.items()
    ]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.fixture(autouse=True)
def offline_uv(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No network for uv, and a uv cache of the tests' own."""
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "uv-cache"))


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """An app folder with a local wheel referenced by a relative path."""
    root = tmp_path / "app"
    root.mkdir()
    make_wheel(root, "swtestpkg")
    (root / "requirements.txt").write_text("# app deps\n./swtestpkg-0.1.0-py3-none-any.whl\n")
    return root


def _import_in_subprocess(site_packages: Path, module: str) -> str:
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(site_packages)!r})\n"
        f"import {module}\n"
        f"print({module}.WHO, {module}.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.strip()


def test_build_then_reuse(app: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = ensure_env(app / "requirements.txt", cache_dir=cache)
    assert isinstance(first, EnvInfo)
    assert first.reused is False
    assert first.build_seconds > 0
    assert first.site_packages.is_dir()
    assert first.site_packages.parent.name == f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert first.site_packages.is_relative_to(cache / first.key)
    assert (cache / first.key / envs.COMPLETE_MARKER).is_file()
    assert (first.site_packages / "swtestpkg" / "__init__.py").is_file()
    assert not list(cache.glob("*.tmp-*"))
    print(f"\nfirst build: {first.build_seconds * 1000:.0f} ms")

    start = time.perf_counter()
    second = ensure_env(app / "requirements.txt", cache_dir=cache)
    elapsed = time.perf_counter() - start
    print(f"reuse: {elapsed * 1000:.2f} ms")
    assert second.reused is True
    assert second.key == first.key
    assert second.site_packages == first.site_packages
    assert second.build_seconds == 0.0
    assert elapsed < 0.5


def test_module_importable_in_worker(app: Path, tmp_path: Path) -> None:
    info = ensure_env(app / "requirements.txt", cache_dir=tmp_path / "cache")
    out = _import_in_subprocess(info.site_packages, "swtestpkg")
    assert out.startswith("wheel swtestpkg ")
    assert str(info.site_packages) in out


def test_prepend_site_packages_honours_pth_files(tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    make_wheel(
        root,
        "swpthpkg",
        extra={
            "swpthpkg_extra.pth": "swpthpkg_extra_dir\n",
            "swpthpkg_extra_dir/swpth_side.py": "WHO = 'via pth'\n",
        },
    )
    (root / "requirements.txt").write_text("./swpthpkg-0.1.0-py3-none-any.whl\n")
    info = ensure_env(root / "requirements.txt", cache_dir=tmp_path / "cache")
    code = (
        "import sys\n"
        "from stepwell.engine.envs import prepend_site_packages\n"
        f"prepend_site_packages({str(info.site_packages)!r})\n"
        f"assert sys.path[0] == {str(info.site_packages)!r}, sys.path[:3]\n"
        "import swpth_side, swpthpkg\n"
        "print(swpth_side.WHO)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "via pth"


def test_changed_requirements_give_new_key(app: Path, tmp_path: Path) -> None:
    req = app / "requirements.txt"
    key_before = env_key(req)
    req.write_text(req.read_text() + "# a comment changes the bytes\n")
    assert env_key(req) != key_before
    assert env_key(req) == env_key(req)


def test_changed_local_package_gives_new_key(tmp_path: Path) -> None:
    """Same requirements text, different local wheel: not the same environment."""
    keys = []
    for version_text in ("one", "two"):
        root = tmp_path / version_text
        root.mkdir()
        make_wheel(root, "swtestpkg", extra={"swtestpkg/data.txt": version_text})
        (root / "requirements.txt").write_text("./swtestpkg-0.1.0-py3-none-any.whl\n")
        keys.append(env_key(root / "requirements.txt"))
    assert keys[0] != keys[1]
    # The same content in another folder shares the key.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in (tmp_path / "one").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert env_key(copy / "requirements.txt") == keys[0]


def test_bad_requirement_raises_env_error(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    req = root / "requirements.txt"
    req.write_text("./missingpkg-0.1.0-py3-none-any.whl\n")
    cache = tmp_path / "cache"
    with pytest.raises(EnvError) as excinfo:
        ensure_env(req, cache_dir=cache)
    message = str(excinfo.value)
    print(f"\nEnvError: {message}")
    assert str(req.resolve()) in message
    assert "\n" not in message
    assert "missingpkg" in message
    # Nothing half-built is left behind, and fixing the file then works.
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    make_wheel(root, "swtestpkg")
    req.write_text("./swtestpkg-0.1.0-py3-none-any.whl\n")
    assert ensure_env(req, cache_dir=cache).reused is False


def test_unknown_package_offline_raises_env_error(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("stepwell-no-such-package-xyz==1.0\n")
    with pytest.raises(EnvError, match="requirements.txt") as excinfo:
        ensure_env(req, cache_dir=tmp_path / "cache")
    print(f"\nEnvError: {excinfo.value}")
    assert "stepwell-no-such-package-xyz" in str(excinfo.value)


def test_missing_requirements_file(tmp_path: Path) -> None:
    with pytest.raises(EnvError, match="nope.txt"):
        ensure_env(tmp_path / "nope.txt", cache_dir=tmp_path / "cache")
    with pytest.raises(EnvError, match="nope.txt"):
        env_for_app(tmp_path, "nope.txt", cache_dir=tmp_path / "cache")


def test_missing_uv_is_a_clear_error(
    app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(envs.shutil, "which", lambda name: None)
    monkeypatch.setattr(envs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EnvError, match="pip install uv"):
        ensure_env(app / "requirements.txt", cache_dir=tmp_path / "cache")


def test_concurrent_threads_build_once(app: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    results: list[EnvInfo] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        try:
            results.append(ensure_env(app / "requirements.txt", cache_dir=cache))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r.reused for r in results) == [False, True, True, True]
    assert len({r.site_packages for r in results}) == 1
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [results[0].key]


def test_concurrent_processes_build_once(app: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from stepwell.engine.envs import ensure_env\n"
        "info = ensure_env(Path(sys.argv[1]), cache_dir=Path(sys.argv[2]))\n"
        "print(json.dumps({'key': info.key, 'reused': info.reused, 'sp': str(info.site_packages)}))\n"
    )
    args = [sys.executable, "-c", code, str(app / "requirements.txt"), str(cache)]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out))
    assert sorted(o["reused"] for o in outputs) == [False, True, True]
    assert len({o["sp"] for o in outputs}) == 1
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [outputs[0]["key"]]
    assert "wheel swtestpkg" in _import_in_subprocess(Path(outputs[0]["sp"]), "swtestpkg")


def test_stale_partial_build_is_replaced(app: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    key = env_key(app / "requirements.txt")
    (cache / f"{key}.tmp-99999999").mkdir(parents=True)  # a builder that died
    (cache / key).mkdir()  # published without marker: never complete
    info = ensure_env(app / "requirements.txt", cache_dir=cache)
    assert info.reused is False
    assert not (cache / f"{key}.tmp-99999999").exists()
    assert (cache / key / envs.COMPLETE_MARKER).is_file()


def test_env_for_app(app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_for_app(app, None) is None
    assert env_for_app(app, "") is None
    monkeypatch.setenv("STEPWELL_CACHE_DIR", str(tmp_path / "from-env"))
    assert envs.default_cache_dir() == tmp_path / "from-env"
    info = env_for_app(app, "requirements.txt")
    assert info is not None and info.reused is False
    assert info.site_packages.is_relative_to(tmp_path / "from-env")
    again = env_for_app(app, "requirements.txt")
    assert again is not None and again.reused is True and again.key == info.key


def test_default_cache_dir_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEPWELL_CACHE_DIR", raising=False)
    assert envs.default_cache_dir() == Path.home() / ".cache" / "stepwell" / "envs"


def test_key_follows_includes_and_editables(tmp_path: Path) -> None:
    root = tmp_path / "app"
    (root / "localpkg").mkdir(parents=True)
    (root / "localpkg" / "mod.py").write_text("X = 1\n")
    (root / "base.txt").write_text("somepkg==1.0\n")
    req = root / "requirements.txt"
    req.write_text("-r base.txt\n-e ./localpkg  # editable\nother @ file:./localpkg\n")
    key = env_key(req)
    (root / "base.txt").write_text("somepkg==2.0\n")
    assert env_key(req) != key
    key = env_key(req)
    (root / "localpkg" / "mod.py").write_text("X = 2\n")
    assert env_key(req) != key
    key = env_key(req)
    (root / "localpkg" / "__pycache__").mkdir()
    (root / "localpkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(os.urandom(8))
    assert env_key(req) == key


def test_action_calls_run_in_the_app_environment_and_log_it(
    app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stepwell.app import load_app
    from stepwell.engine.action_executor import ActionExecutor
    from stepwell.store import open_store

    monkeypatch.setenv("STEPWELL_CACHE_DIR", str(tmp_path / "cache"))
    (app / "stepwell.yml").write_text(
        "requirements_file: requirements.txt\n"
        "actions:\n"
        "  - name: who\n"
        "    steps:\n"
        "      - {name: w, code: 'import swtestpkg; return swtestpkg.WHO'}\n"
    )
    os.system(f"chmod -R a+rX {tmp_path}")
    spec = load_app(app)
    store = open_store(None, spec.root)
    executor = ActionExecutor(spec, store, warm=0)
    try:
        results = [executor.invoke("who", {}, {"id": "t", "roles": []}) for _ in range(2)]
    finally:
        executor.close()
    try:
        assert [r.data for r in results] == ["wheel swtestpkg"] * 2, [r.error for r in results]
        notes = [[line.message for line in store.get_logs(r.run_id)] for r in results]
    finally:
        store.close()
    assert notes[0][0].startswith("[stepwell] environment ") and " for requirements.txt: built in " in notes[0][0]
    assert notes[1][0].endswith("for requirements.txt: reused")
