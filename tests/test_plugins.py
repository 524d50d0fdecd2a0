"""eKuiper portable plugins: install, host protocol, private /tmp, crashes, SQL steps.

The plugin under test (tests/plugins/swtest) is written with the real
``ekuiper`` SDK from PyPI and runs unchanged; each check mirrors what the SDK
documents (and eKuiper does) for sources, sinks with requireAck and functions.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import pytest
from plugin_helpers import CTX, PLUGIN_SRC, append_rows, copy_plugin, make_app, sink_lines, wait_for
from typer.testing import CliRunner

from stepwell.cli import app as cli_app
from stepwell.runtimes.plugin import (
    PluginError,
    PluginInstallError,
    PluginManager,
    install_plugin,
    list_plugins,
    remove_plugin,
)
from stepwell.runtimes.plugin.channels import FunctionCallError, SinkRefused, meta
from stepwell.runtimes.plugin.manifest import ManifestError, parse_manifest
from stepwell.runtimes.plugin.process import namespaces_available, plugin_write_paths

# (the test plugin's file sink writes to tmp_path)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("sinks_write_to_tmp_path")]


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return make_app(tmp_path / "app")


@pytest.fixture
def manager(app_dir: Path):
    install_plugin(app_dir, PLUGIN_SRC)
    mgr = PluginManager(app_dir, processes=2)
    yield mgr
    mgr.stop_all()


# -- install ---------------------------------------------------------------------------------


def test_install_list_remove(app_dir: Path) -> None:
    plugin = install_plugin(app_dir, PLUGIN_SRC)
    assert plugin.name == "swtest" and plugin.version == "v0.1.0"
    assert plugin.sources == ["counter"] and plugin.sinks == ["collect"]
    assert "revstr" in plugin.functions
    assert plugin.env_key and Path(plugin.command[0]).exists()  # cached uv environment
    assert (app_dir / ".stepwell" / "plugins" / "swtest" / "swtest.py").is_file()
    assert [p.name for p in list_plugins(app_dir)] == ["swtest"]
    again = install_plugin(app_dir, PLUGIN_SRC)  # unchanged content: kept as is
    assert again.installed_at == plugin.installed_at and again.env_key == plugin.env_key
    remove_plugin(app_dir, "swtest")
    assert list_plugins(app_dir) == []
    with pytest.raises(PluginInstallError, match="not installed"):
        remove_plugin(app_dir, "swtest")


def test_install_from_zip(app_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "swtest.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in PLUGIN_SRC.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                zf.write(path, path.relative_to(PLUGIN_SRC).as_posix())
    plugin = install_plugin(app_dir, archive)
    assert plugin.name == "swtest"
    assert (Path(plugin.folder) / "sources" / "counter.yaml").is_file()
    assert plugin.source_config("counter", "fast") == {"count": 5, "interval": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("language"), "field `language` is required"),
        (lambda m: m.update(language="java"), "field `language` must be \"python\" or \"go\""),
        (lambda m: m.pop("executable"), "field `executable` is required"),
        (lambda m: m.update(executable="missing.py"), "field `executable` names 'missing.py'"),
        (lambda m: m.update(sources=[], sinks=[], functions=[]), "declares no symbol"),
        (lambda m: m.update(functions=["ok", "bad-name"]), "field `functions`"),
        (lambda m: m.update(name="other"), "field `name` is 'other'"),
        (lambda m: m.update(virtualEnvType="pipenv"), "field `virtualEnvType` must be \"conda\""),
        (lambda m: m.update(virtualEnvType="conda"), "field `env`"),
        (lambda m: m.update(sources="counter"), "field `sources`"),
    ],
)
def test_bad_manifests_name_the_field(app_dir: Path, tmp_path: Path, change, message: str) -> None:
    folder = copy_plugin(tmp_path / "src", change)
    with pytest.raises(PluginInstallError) as info:
        install_plugin(app_dir, folder)
    assert message in str(info.value)
    assert "swtest.json" in str(info.value)


def test_manifest_errors_without_files() -> None:
    with pytest.raises(ManifestError, match="must be a JSON object"):
        parse_manifest([1], "p", "p.json")
    with pytest.raises(ManifestError, match="plugin name 'bad-name'"):
        parse_manifest({}, "bad-name", "x.json")


def test_missing_or_invalid_manifest_file(app_dir: Path, tmp_path: Path) -> None:
    folder = copy_plugin(tmp_path / "src")
    (folder / "swtest.json").write_text("{not json")
    with pytest.raises(PluginInstallError, match="not valid JSON"):
        install_plugin(app_dir, folder)
    (folder / "swtest.json").rename(folder / "other.json")
    with pytest.raises(PluginInstallError, match=r"no manifest swtest\.json \(found other\.json\)"):
        install_plugin(app_dir, folder)


def test_conda_without_conda_falls_back_to_uv(app_dir: Path, tmp_path: Path) -> None:
    folder = copy_plugin(tmp_path / "src", lambda m: m.update(virtualEnvType="conda", env="myenv"))
    plugin = install_plugin(app_dir, folder)
    if plugin.conda_env:  # conda exists here: it is honoured
        assert plugin.command[:3][1:] == ["run", "-n"]
        return
    assert plugin.env_key and any("conda is not installed" in w for w in plugin.warnings)


def test_symbol_conflict_between_plugins(app_dir: Path, tmp_path: Path) -> None:
    install_plugin(app_dir, PLUGIN_SRC)
    other = copy_plugin(tmp_path / "src", name="other")
    with pytest.raises(PluginInstallError, match="source 'counter' is already served by installed plugin 'swtest'"):
        install_plugin(app_dir, other)


def test_install_script_runs_and_failures_are_reported(app_dir: Path, tmp_path: Path) -> None:
    folder = copy_plugin(tmp_path / "src")
    (folder / "install.sh").write_text('echo "installed with $(command -v python)" > marker.txt\n')
    plugin = install_plugin(app_dir, folder)
    assert str(Path(plugin.command[0]).parent) in (Path(plugin.folder) / "marker.txt").read_text()
    (folder / "install.sh").write_text("echo boom >&2; exit 4\n")
    with pytest.raises(PluginInstallError, match="install.sh exited with status 4: boom"):
        install_plugin(app_dir, folder, force=True)


# -- functions -------------------------------------------------------------------------------


def test_function_validate_exec_is_aggregate(manager: PluginManager) -> None:
    rev = manager.function_pool("revstr")
    assert rev.validate([{"Name": "col1", "StreamName": "demo"}]) is None
    assert rev.validate([1, 2]) == "revstr takes exactly 1 argument"
    assert rev.is_aggregate() is False
    assert manager.function_pool("spread").is_aggregate() is True
    assert rev.exec(["hello"], CTX) == "olleh"
    assert rev.exec_many([["ab"], [None], ["xyz"]], CTX) == ["ba", None, "zyx"]
    assert manager.function_pool("scale").exec([3, 4], CTX) == 12
    assert manager.function_pool("spread").exec([[1, 9, 4]], CTX) == 8
    # the error names the function and its plugin (when one symbol name is shadowed)
    with pytest.raises(FunctionCallError, match=r"^function 'scale' \(plugin 'swtest'\) failed: "
                                                r"TypeError"):
        manager.function_pool("scale").exec(["a", "b"], CTX)
    # raw protocol answers, as documented for the SDK
    channel = rev.channels[0]
    assert json.loads(channel.call(b'{"func": "Exec", "arg": []}')) == {"state": False, "result": "invalid arg"}
    assert json.loads(channel.call(b'{"func": "Nope", "arg": []}')) == {"state": False, "result": "invalid func Nope"}


def test_plugin_processes_get_none_of_the_hosts_secrets(manager: PluginManager, monkeypatch) -> None:
    """A plugin process's environment is the sandbox's (PATH, locale, HOME=/tmp):
    it inherited the host's, with the store's URL (and its password) and secrets."""
    monkeypatch.setenv("STEPWELL_STORE", "postgresql://stepwell:pw-123@db/stepwell")
    monkeypatch.setenv("STEPWELL_SECRET_TOKEN", "s3cret-value")
    seen = manager.function_pool("whoami").exec([0], CTX)
    assert "STEPWELL_STORE" not in seen["env"] and "STEPWELL_SECRET_TOKEN" not in seen["env"]
    assert "PATH" in seen["env"] and seen["home"] == "/tmp"


@pytest.mark.skipif(not namespaces_available(), reason="needs user/mount namespaces")
def test_plugin_processes_run_in_the_run_sandbox(manager: PluginManager, app_dir: Path,
                                                 tmp_path: Path, monkeypatch) -> None:  # fmt: skip
    """A plugin process runs as a run does: as the sandbox user (when the host is
    root), without capabilities, under seccomp, and the app's .stepwell shows it
    only the plugins (it read the store, the secrets and the token); it writes
    only to its /tmp and the folders of STEPWELL_PLUGIN_WRITE_PATHS; and its /proc
    shows no host process (their command lines may hold the store's URL)."""
    (app_dir / ".stepwell" / "secrets.toml").write_text('key = "s3cret"\n')
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    monkeypatch.setenv("STEPWELL_PLUGIN_WRITE_PATHS", str(out))
    who = manager.function_pool("whoami")
    tries = [str(app_dir / "planted.py"), str(out / "sink.txt"), "/tmp/scratch"]
    seen = who.exec([0, *tries], CTX)
    assert seen["app_state"] == ["plugins"], seen["app_state"]
    assert seen["wrote"][tries[0]] in ("Read-only file system", "Permission denied"), seen["wrote"]
    assert seen["wrote"][tries[1]] == seen["wrote"][tries[2]] == "ok", seen["wrote"]
    assert not (app_dir / "planted.py").exists() and (out / "sink.txt").read_text() == "planted"
    # PID 1 of a PID namespace of its own, where it sees no other process; the host
    # sees it as the child of the launcher it started
    assert seen["pid"] == 1 and seen["processes"] == [1], seen["processes"]
    launcher = who.channels[0].process.pid
    (pid,) = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["CapEff"].strip() == "0000000000000000" and fields["Seccomp"].strip() == "2"
    if os.geteuid() == 0:
        assert fields["Uid"].split()[0] == "65534", fields["Uid"]
    assert manager.function_pool("revstr").exec(["abc"], CTX) == "cba"


def test_write_paths_that_are_not_folders_are_named(tmp_path: Path, monkeypatch, caplog) -> None:
    """A write path that does not exist is left out, and the warning says which."""
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("STEPWELL_PLUGIN_WRITE_PATHS",
                       f"{tmp_path}::{tmp_path / 'missing'}:{tmp_path / 'a-file'}")  # fmt: skip
    with caplog.at_level("WARNING", logger="stepwell.plugin"):
        assert plugin_write_paths() == [os.path.realpath(tmp_path)]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and f"{tmp_path / 'missing'}, which is not a folder" in warned[0]


def test_function_context_reaches_plugin(manager: PluginManager) -> None:
    who = manager.function_pool("whoami")
    ctx = json.dumps({"ruleId": "ruleX", "opId": "op", "instanceId": 0, "funcId": 3})
    assert who.exec([0], ctx)["rule"] == "ruleX"


@pytest.mark.skipif(not namespaces_available(), reason="needs user/mount namespaces")
def test_private_tmp_and_parallel_processes(manager: PluginManager) -> None:
    who = manager.function_pool("whoami", processes=2)
    assert who.size == 2
    folders = {ch.process.folder for ch in who.channels}
    assert len(folders) == 2 and all(f.startswith("/tmp/swp-") for f in folders)
    # several calls of 0.2 s each: two processes serve them in parallel
    import time

    started = time.monotonic()
    results = who.exec_many([[0.2]] * 4, CTX)
    elapsed = time.monotonic() - started
    assert len({r["process"] for r in results}) == 2
    assert elapsed < 0.75, elapsed  # one process would need 0.8 s
    # each process sees only its own sockets under /tmp; the host's real /tmp has none of them
    files = manager.function_pool("tmpfiles").exec([], CTX)
    assert "plugin_swtest.ipc" in files and "func_tmpfiles.ipc" in files
    assert not os.path.exists("/tmp/plugin_swtest.ipc")


@pytest.mark.skipif(not namespaces_available(), reason="needs user/mount namespaces")
def test_two_apps_same_plugin_do_not_collide(tmp_path: Path) -> None:
    managers = []
    try:
        for name in ("a", "b"):
            root = make_app(tmp_path / name)
            install_plugin(root, PLUGIN_SRC)
            managers.append(PluginManager(root, processes=1))
        processes = {m.function_pool("whoami").exec([0], CTX)["process"] for m in managers}
        assert len(processes) == 2
    finally:
        for m in managers:
            m.stop_all()


def test_crash_is_detected_and_plugin_restarted(manager: PluginManager) -> None:
    boom = manager.function_pool("boom", processes=1)
    proc = boom.channels[0].process
    first_pid = proc.pid
    assert boom.exec([False], CTX) == "[false]"
    with pytest.raises(PluginError):
        boom.exec([True], CTX)  # kills the plugin mid-call (and again on the one retry)
    wait_for(lambda: proc.alive() and proc.pid != first_pid and proc._ready.is_set())
    assert proc.restarts >= 1 and proc.last_exit == 3
    assert boom.exec([False], CTX) == "[false]"  # the function symbol was replayed


def test_source_replayed_after_crash(manager: PluginManager) -> None:
    got: list[dict] = []
    errors: list[str] = []
    source = manager.source("counter", meta("rule1", "demo"), {"count": 3, "interval": 1},
                            "topicA", lambda m, _meta: got.append(m), errors.append)
    wait_for(lambda: len(got) == 3)
    assert got[0]["topic"] == "topicA"  # datasource reaches configure()
    proc = source.process
    proc.kill()
    wait_for(lambda: len(got) == 6, timeout=15)  # restarted, start replayed, counter emits again
    assert [m["id"] for m in got] == [0, 1, 2, 0, 1, 2]
    source.stop()


def test_source_errors_are_reported(manager: PluginManager) -> None:
    errors: list[str] = []
    source = manager.source("counter", meta("rule2", "demo"), {"count": 1, "interval": 0,
                            "error_at_end": True}, "t", lambda m, _meta: None, errors.append)
    wait_for(lambda: errors == ["counter finished"])
    source.stop()


def test_sink_require_ack_and_stop(manager: PluginManager, tmp_path: Path) -> None:
    out = tmp_path / "sink.txt"
    sink = manager.sink("collect", meta("rule1", "collect_0"), {"requireAck": True, "path": str(out)})
    sink.send(b'{"a":1}')
    with pytest.raises(SinkRefused, match="refused: bad row refused"):
        sink.send(b'{"a":"bad"}')
    sink.send(b'[{"a":1},{"a":2}]')
    sink.stop()
    wait_for(lambda: Path(str(out) + ".closed").exists())
    assert sink_lines(out) == [{"a": 1}, {"a": "bad"}, [{"a": 1}, {"a": 2}]]
    assert "rule1 collect_0" in Path(str(out) + ".opened").read_text()


def test_sink_without_ack_is_drained(manager: PluginManager, tmp_path: Path) -> None:
    # the test sink acks every message; a host that never read acks would stall it after ~300
    out = tmp_path / "many.txt"
    sink = manager.sink("collect", meta("rule3", "collect_0"), {"path": str(out)})
    for i in range(600):
        sink.send(json.dumps({"i": i}).encode())
    wait_for(lambda: len(sink_lines(out)) == 600)
    sink.stop()


def test_unknown_symbols_are_errors(manager: PluginManager) -> None:
    with pytest.raises(PluginInstallError, match="no installed plugin provides a sink named 'nope'"):
        manager.sink("nope", meta("r", "o"), {})
    proc = manager.process("swtest")
    with pytest.raises(PluginError, match="KeyError"):
        proc.command("start", {"symbolName": "nosuch", "meta": meta("r", "o"), "pluginType": "sink"})


# -- plugin functions in sql: steps -------------------------------------------------------------


def test_plugin_function_in_sql_step(tmp_path: Path) -> None:
    from apputil import run_app

    from stepwell.store import open_store

    root = make_app(tmp_path / "app", extra="tables: [{name: words}]\nsteps:\n"
                    "  - name: reversed\n    sql: rev.sql\n    output: reversed_words\n")
    (root / "rev.sql").write_text(
        "SELECT w, revstr(w) AS r, scale(n, 3) AS n3 FROM words ORDER BY n"
    )
    install_plugin(root, PLUGIN_SRC)
    store = open_store(None, root)
    append_rows(store, "words", [{"w": "abc", "n": 1}, {"w": "hello", "n": 2}])
    store.close()
    runs = run_app(root)
    assert [r.status for r in runs] == ["succeeded"], runs[0].error
    store = open_store(None, root)
    try:
        rows = store.query("SELECT w, r, n3 FROM reversed_words ORDER BY n3").to_pylist()
    finally:
        store.close()
    assert rows == [{"w": "abc", "r": "cba", "n3": 3}, {"w": "hello", "r": "olleh", "n3": 6}]


def test_a_sql_step_calling_a_slow_function_ends_at_its_time_limit(tmp_path: Path) -> None:
    from apputil import run_app

    from stepwell.store import open_store

    root = make_app(tmp_path / "app", extra="tables: [{name: words}]\nsteps:\n"
                    "  - name: slow\n    sql: slow.sql\n    output: slow_out\n    timeout: 1s\n")
    (root / "slow.sql").write_text("SELECT w, whoami(n) AS who FROM words")
    install_plugin(root, PLUGIN_SRC)
    store = open_store(None, root)
    # whoami(30) sleeps 30 s; with two rows the calls are made on the function pool's
    # threads, not on the one running the query
    append_rows(store, "words", [{"w": "abc", "n": 30}, {"w": "def", "n": 30}])
    store.close()
    began = time.monotonic()
    (run,) = run_app(root)
    assert time.monotonic() - began < 20  # it used to wait for the call to end
    assert run.status == "timed_out"
    assert run.error.startswith("the step exceeded its time limit (timeout 1s): ")
    assert "whoami" in run.error


# -- CLI -------------------------------------------------------------------------------------------


def test_plugin_cli(app_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli_app, ["plugin", "install", str(app_dir), str(PLUGIN_SRC)])
    assert result.exit_code == 0, result.output
    assert "installed plugin swtest v0.1.0" in result.output
    result = runner.invoke(cli_app, ["plugin", "list", str(app_dir), "--json"])
    assert json.loads(result.output)[0]["functions"][:2] == ["revstr", "scale"]
    bad = copy_plugin(tmp_path / "bad", lambda m: m.pop("executable"))
    result = runner.invoke(cli_app, ["plugin", "install", str(app_dir), str(bad)])
    assert result.exit_code != 0 and "field `executable` is required" in str(result.exception)
    result = runner.invoke(cli_app, ["plugin", "remove", str(app_dir), "swtest"])
    assert result.exit_code == 0 and "removed plugin swtest" in result.output
    result = runner.invoke(cli_app, ["plugin", "list", str(app_dir)])
    assert "no plugins installed" in result.output


def test_a_plugin_whose_code_uses_another_name_says_so(app_dir: Path, tmp_path: Path) -> None:
    folder = copy_plugin(tmp_path / "src")
    code = folder / "swtest.py"
    code.write_text(code.read_text().replace('PluginConfig(\n        "swtest",', 'PluginConfig(\n        "otherplug",'))
    assert '"otherplug"' in code.read_text()
    # install starts it once (as eKuiper 2 does), so the misnaming is reported there
    with pytest.raises(PluginInstallError, match=r"plugin 'swtest' was not installed \(it is started "
                       r"once to check it, as eKuiper does\): plugin 'swtest' \(pid \d+\) will "
                       r"never handshake: its code calls PluginConfig\('otherplug', \.\.\.\)"):
        install_plugin(app_dir, folder)
    assert list_plugins(app_dir) == [] and not (app_dir / ".stepwell" / "plugins" / ".swtest.installing").exists()
    install_plugin(app_dir, folder, check=False)  # installed unchecked: found at first use
    mgr = PluginManager(app_dir, processes=1)
    try:
        with pytest.raises(PluginError, match=r"its code calls PluginConfig\('otherplug', \.\.\.\) "
                                              r"but the plugin is named 'swtest'"):
            mgr.function_pool("revstr")
    finally:
        mgr.stop_all()


def test_a_validate_that_returns_none_is_explained(manager: PluginManager) -> None:
    problem = manager.function_pool("noval").validate([])
    assert problem == ("validation failed: its validate() returned None; return '' to accept "
                       "the arguments, or the reason to refuse them")


def test_a_reply_that_is_not_an_object_names_the_function() -> None:
    from stepwell.runtimes.plugin.channels import decode_reply

    with pytest.raises(FunctionCallError, match=r"function 'gl' sent an invalid reply b'\[1, 2\]'"):
        decode_reply(b"[1, 2]", "gl")


def test_a_plugin_that_never_handshakes_shows_its_output_and_a_hint(
    app_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stepwell.runtimes.plugin import process

    folder = copy_plugin(tmp_path / "src")
    (folder / "swtest.py").write_text(
        "import time\nprint('silent plugin: I will never handshake')\ntime.sleep(3600)\n")
    install_plugin(app_dir, folder, check=False)
    monkeypatch.setattr(process, "HANDSHAKE_TIMEOUT", 2.0)
    mgr = PluginManager(app_dir, processes=1)
    try:
        with pytest.raises(PluginError) as caught:
            mgr.function_pool("revstr")
    finally:
        mgr.stop_all()
    message = str(caught.value)
    assert message.startswith("plugin 'swtest' (pid ")
    assert ("sent no handshake in 2s and was killed; its output: silent plugin: I will never "
            "handshake. Its main program must start the ekuiper SDK, "
            "`plugin.start(PluginConfig('swtest', ...))`") in message
    assert "STEPWELL_PLUGIN_INIT_TIMEOUT" in message


def test_install_starts_the_plugin_once_and_describe_shows_it(app_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    # a manifest listing a function its code does not provide is refused at install
    lacking = copy_plugin(tmp_path / "lacking", lambda m: m["functions"].append("nosuchfn"))
    result = runner.invoke(cli_app, ["plugin", "install", str(app_dir), str(lacking)])
    assert result.exit_code != 0
    assert ("plugin 'swtest' was not installed (it is started once to check it, as eKuiper "
            "does): plugin 'swtest' lists function 'nosuchfn' in swtest.json but its process did "
            "not start it") in str(result.exception)
    assert "add it to the functions of PluginConfig('swtest', ...)" in str(result.exception)
    assert list_plugins(app_dir) == []
    # a working one: installed, its process stopped after the check
    result = runner.invoke(cli_app, ["plugin", "install", str(app_dir), str(PLUGIN_SRC)])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert _plugin_processes(app_dir) == []
    assert list_plugins(app_dir)[0].aggregate_functions == ["spread"]
    result = runner.invoke(cli_app, ["plugin", "describe", str(app_dir), "swtest"])
    assert result.exit_code == 0, result.output + str(result.exception)
    lines = result.output.splitlines()
    assert lines[0].startswith("swtest v0.1.0 [python, swtest.py, env ")
    assert "  source counter: profiles: crashonce, crashy, default, fast, flood" in lines
    assert "  sink collect" in lines
    assert "  function revstr: reverse a string (stepwell test plugin); not an aggregate" in lines
    assert "  function spread: aggregate" in lines
    described = json.loads(runner.invoke(cli_app, ["plugin", "describe", str(app_dir), "swtest",
                                                   "--json"]).output)
    assert described["functions"][0] == "revstr" and described["symbols"][0] == {
        "kind": "source", "name": "counter", "profiles": ["crashonce", "crashy", "default", "fast", "flood"]}
    result = runner.invoke(cli_app, ["plugin", "describe", str(app_dir), "nope"])
    assert result.exit_code != 0 and "plugin 'nope' is not installed" in str(result.exception)


def _plugin_processes(app_dir: Path) -> list[int]:
    """Pids of running processes whose command line names a file of ``app_dir``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(app_dir).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


class _SlowChannel:
    """A stand-in for a plugin process's function channel: each call takes 50 ms."""

    def __init__(self) -> None:
        self.calls = 0

    def call(self, request: bytes, deadline: float | None = None, timeout: float | None = None) -> bytes:
        self.calls += 1
        time.sleep(0.05)
        return b'{"state": true, "result": 1}'

    def close(self) -> None:
        pass


def test_closing_a_function_pool_ends_the_calls_in_flight() -> None:
    """A pool closed while a batch was being served (its plugin stopped by `plugin remove
    --force`): the caller gets an error at once instead of waiting for ever."""
    import threading

    from stepwell.runtimes.plugin.functions import FunctionPool

    channels = [_SlowChannel(), _SlowChannel()]
    pool = FunctionPool("slow", channels)  # type: ignore[arg-type]
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["replies"] = pool.call_raw([b"{}"] * 100)
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.2)
    pool.close()
    caller.join(5)
    assert not caller.is_alive(), "the call still waits"
    assert "function 'slow' is no longer served" in str(outcome["error"])
    assert sum(c.calls for c in channels) < 20  # (the calls in progress end, no more start)
    with pytest.raises(Exception, match="function 'slow' is no longer served"):
        pool.call_raw([b"{}"] * 3)  # (it waited for ever: no thread serves a closed pool)


def test_lone_function_calls_take_turns_over_the_pools_processes() -> None:
    """A batch of one event is called without a hand-off: all such calls went to the
    pool's first process while the others idled (several rules at a low rate)."""
    from stepwell.runtimes.plugin.functions import FunctionPool

    channels = [_SlowChannel(), _SlowChannel()]
    pool = FunctionPool("slow", channels)  # type: ignore[arg-type]
    try:
        for _ in range(4):
            pool.call_raw([b"{}"])
        assert [c.calls for c in channels] == [2, 2]
    finally:
        pool.close()
