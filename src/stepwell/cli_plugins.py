"""``stepwell plugin ...`` and ``stepwell rule ...`` (DESIGN section 7a).

Plugins live in the app folder (``APP/.stepwell/plugins``); rules live in the
app store. ``rule start`` marks a rule running (``stepwell serve`` runs every
rule marked so); with ``--run-for SECONDS`` or ``--foreground`` it also runs
the rule here and prints its status when done.

While ``stepwell serve`` runs for the app (and store), every command goes
through its API (``/api/plugins``, ``/api/rules``) instead, so rules start and
stop in the server and the store is not opened here; the output is the same.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from stepwell.cli_common import AppArg, CliError, JsonOpt, StoreOpt, show_plugin_output

plugin_app = typer.Typer(no_args_is_help=True,
                         help="eKuiper portable plugins: install, list, describe, remove.")
rule_app = typer.Typer(no_args_is_help=True, help="eKuiper-style rules: create, list, start, stop, delete, status.")

RuleId = Annotated[str, typer.Argument(help="Rule id")]
#: Seconds a running server gets to install a plugin (building its environment).
INSTALL_TIMEOUT = 900.0


def _print(data: Any) -> None:
    from stepwell.runtimes.plugin.functions import json_default

    print(json.dumps(data, indent=2, default=json_default))


def _fail(exc: Exception) -> None:
    raise CliError(str(exc)) from None


def _server(app_path: str, store_url: str | None = None) -> tuple[Path, Any]:
    """The app's root, and a client for its running server (None: work locally)."""
    from stepwell.app import load_app
    from stepwell.cli_backend import find_server

    spec = load_app(app_path)
    return spec.root, find_server(spec.root, store_url or spec.store)


def _call(client: Any, method: str, path: str, *, close: bool = True, **kwargs: Any) -> Any:
    """One API request (then the client is closed unless ``close`` is false); the
    server's error message becomes the CLI's."""
    from stepwell.server.client import ApiError

    try:
        return client.request(method, path, **kwargs).json()
    except ApiError as exc:
        client.close()
        _fail(exc)
    finally:
        if close:
            client.close()


# -- plugins ------------------------------------------------------------------------------


@plugin_app.command("install")
def plugin_install(
    app_path: AppArg,
    path: Annotated[Path, typer.Argument(help="Plugin folder or zip (eKuiper layout)")],
    force: Annotated[bool, typer.Option("--force", help="Reinstall even if unchanged")] = False,
) -> None:
    """Install a plugin folder or zip into the app."""
    from stepwell.runtimes.plugin.install import InstalledPlugin, PluginInstallError, install_plugin

    root, client = _server(app_path)
    if client is not None:
        plugin = InstalledPlugin(**_call(client, "POST", "/api/plugins",
                                         json={"path": str(path.resolve()), "force": force},
                                         timeout=INSTALL_TIMEOUT))  # it may build an environment
    else:
        try:
            plugin = install_plugin(root, path, force=force)
        except PluginInstallError as exc:
            _fail(exc)
            return
    for warning in plugin.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    symbols = ", ".join(f"{kind} {name}" for kind, name in plugin.symbols())
    print(f"installed plugin {plugin.name} {plugin.version} ({symbols})")


@plugin_app.command("list")
def plugin_list(app_path: AppArg = ".", as_json: JsonOpt = False) -> None:
    """List installed plugins and their symbols."""
    from stepwell.runtimes.plugin.install import InstalledPlugin, list_plugins

    root, client = _server(app_path)
    if client is not None:
        plugins = [InstalledPlugin(**p) for p in _call(client, "GET", "/api/plugins")["plugins"]]
    else:
        plugins = list_plugins(root)
    if as_json:
        _print([asdict(p) for p in plugins])
        return
    if not plugins:
        print("no plugins installed")
    for p in plugins:
        env = f"conda env {p.conda_env}" if p.conda_env else (
            f"env {p.env_key[:12]}" if p.env_key else "no environment")
        print(f"{p.name} {p.version} [{p.language}, {env}] sources={p.sources} sinks={p.sinks} "
              f"functions={p.functions}")


@plugin_app.command("describe")
def plugin_describe(
    app_path: AppArg,
    name: Annotated[str, typer.Argument(help="Plugin name")],
    as_json: JsonOpt = False,
) -> None:
    """Show an installed plugin: its metadata and symbols (eKuiper's describe plugin)."""
    from stepwell.runtimes.plugin.install import PluginInstallError, describe_plugin

    root, client = _server(app_path)
    if client is not None:
        info = _call(client, "GET", f"/api/plugins/{name}")
    else:
        try:
            info = describe_plugin(root, name)
        except PluginInstallError as exc:
            _fail(exc)
            return
    if as_json:
        _print(info)
        return
    for line in _description_lines(info):
        print(line)


def _description_lines(info: dict[str, Any]) -> list[str]:
    """``plugin describe``'s text: the plugin, where it came from, one line per symbol."""
    env = (f"conda env {info['conda_env']}" if info.get("conda_env") else
           f"env {info['env_key'][:12]}" if info.get("env_key") else "no environment")
    lines = [f"{info['name']} {info['version']} [{info['language']}, {info['executable']}, {env}]",
             f"  installed {info.get('installed_at') or '?'} from {info.get('source_path') or '?'}"]
    for symbol in info["symbols"]:
        details = [symbol[key] for key in ("description", "hint") if symbol.get(key)]
        if "aggregate" in symbol:
            details.append("aggregate" if symbol["aggregate"] else "not an aggregate")
        if symbol.get("profiles"):
            details.append(f"profiles: {', '.join(symbol['profiles'])}")
        text = f"  {symbol['kind']} {symbol['name']}"
        lines.append(f"{text}: {'; '.join(details)}" if details else text)
    lines += [f"  warning: {warning}" for warning in info.get("warnings") or []]
    return lines


@plugin_app.command("remove")
def plugin_remove(
    app_path: AppArg,
    name: Annotated[str, typer.Argument(help="Plugin name")],
    force: Annotated[bool, typer.Option("--force", help="Remove it even if rules use it "
                                        "(they then fail to start)")] = False,
    store: StoreOpt = None,
) -> None:
    """Remove an installed plugin (refused while rules use it, unless --force)."""
    from stepwell.runtimes.plugin.install import PluginInstallError, get_plugin, remove_plugin
    from stepwell.streams.rules import plugin_in_use

    root, client = _server(app_path, store)
    if client is not None:
        removed = _call(client, "DELETE", f"/api/plugins/{name}", params={"force": force})
        print(f"removed plugin {removed['name']}")
        return
    try:
        plugin = get_plugin(root, name)
    except PluginInstallError as exc:
        _fail(exc)
        return
    with _engine(app_path, store) as engine:
        users = engine.rules_using(plugin)
    if users and not force:
        _fail(PluginInstallError(plugin_in_use(name, users)))
    removed = remove_plugin(root, name)
    for rule_id in users:
        print(f"warning: rule {rule_id} uses plugin {name}: it fails to start until the plugin "
              "is installed again", file=sys.stderr)
    print(f"removed plugin {removed.name}")


# -- rules ------------------------------------------------------------------------------------


def _engine(app_path: str, store_url: str | None):
    from contextlib import contextmanager

    @contextmanager
    def opened():
        from stepwell.cli import _opened
        from stepwell.streams.rules import RuleEngine

        with _opened(app_path, store_url) as (spec, store):
            engine = RuleEngine.for_app(spec, store)
            try:
                # the plugins and rules stepwell.yml lists exist here too, not only
                # under `stepwell serve`
                _guard(lambda: engine.register_listed(spec))
                yield engine
            finally:
                engine.stop_all()

    return opened()


def _guard(call: Any) -> Any:
    from stepwell.runtimes.plugin import PluginError, PluginInstallError
    from stepwell.streams import RuleError, StreamError

    try:
        return call()
    except (RuleError, StreamError, PluginError, PluginInstallError) as exc:
        _fail(exc)


@rule_app.command("create")
def rule_create(
    app_path: AppArg,
    file: Annotated[Path, typer.Argument(help="Rule JSON file: {id, sql, actions}")],
    replace: Annotated[bool, typer.Option("--replace", help="Replace a rule with the same id")] = False,
    store: StoreOpt = None,
) -> None:
    """Create a rule (validated against the app's streams and plugins)."""
    from stepwell.streams import RuleError
    from stepwell.streams.parser import load_rule_file

    if not file.is_file():
        _fail(RuleError(f"{file}: no such rule file"))
    _guard(lambda: load_rule_file(file))  # precise errors with the file name
    _, client = _server(app_path, store)
    if client is not None:
        created = _call(client, "POST", "/api/rules", json=json.loads(file.read_text()),
                        params={"replace": replace})
        print(f"rule {created['id']} created")
        return
    with _engine(app_path, store) as engine:
        rule = _guard(lambda: engine.create_from_file(file, replace=replace))
    print(f"rule {rule.id} created")


@rule_app.command("list")
def rule_list(app_path: AppArg = ".", as_json: JsonOpt = False, store: StoreOpt = None) -> None:
    """List rules with their status."""
    _, client = _server(app_path, store)
    if client is not None:
        rules = _call(client, "GET", "/api/rules")["rules"]
    else:  # no server: nothing runs; a rule set to run is `enabled` (it runs under serve)
        with _engine(app_path, store) as engine:
            rules = [{**r, "status": "enabled" if r["status"] == "running" else r["status"]}
                     for r in engine.list()]  # fmt: skip
    if as_json:
        _print(rules)
        return
    if not rules:
        print("no rules")
    for r in rules:
        print(f"{r['id']:20} {r['status']:10} {r['sql']}")
    if client is None and any(r["status"] == "enabled" for r in rules):
        print("(no server runs for this app: enabled rules start with `stepwell serve`)")


def _wait(run_for: float | None) -> None:
    """Sleep ``run_for`` seconds (None: until Ctrl-C)."""
    try:
        deadline = time.monotonic() + (run_for if run_for is not None else float("inf"))
        while time.monotonic() < deadline:
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
    except KeyboardInterrupt:
        pass


@rule_app.command("start")
def rule_start(
    app_path: AppArg,
    rule_id: RuleId,
    run_for: Annotated[float | None, typer.Option("--run-for", help="Also run it here for SECONDS")] = None,
    foreground: Annotated[bool, typer.Option("--foreground", help="Also run it here until Ctrl-C")] = False,
    store: StoreOpt = None,
) -> None:
    """Mark a rule running (`stepwell serve` runs it); optionally run it here."""
    run_here = foreground or run_for is not None
    _, client = _server(app_path, store)
    if client is not None:  # the rule runs in the server
        _call(client, "POST", f"/api/rules/{rule_id}/start", close=not run_here)
        if run_here:
            _wait(run_for)
            _print(_call(client, "GET", f"/api/rules/{rule_id}/status"))
            return
        print(f"rule {rule_id} marked running (it runs with `stepwell serve`)")
        return
    if run_here:
        show_plugin_output()
    with _engine(app_path, store) as engine:
        _guard(lambda: engine.start(rule_id, run_here=run_here))
        if run_here:
            _wait(run_for)
            runtime = engine.running.get(rule_id)
            status = engine.status(rule_id)
            engine.stop_all()
            status = {**status, **engine.status(rule_id)}
            if runtime is not None:  # what the run ended as: stopped, or failed
                status["status"] = runtime.status
            _print(status)
            return
    print(f"rule {rule_id} marked running (it runs with `stepwell serve`)")


@rule_app.command("stop")
def rule_stop(app_path: AppArg, rule_id: RuleId, store: StoreOpt = None) -> None:
    """Stop a rule."""
    _, client = _server(app_path, store)
    if client is not None:
        _call(client, "POST", f"/api/rules/{rule_id}/stop")
        print(f"rule {rule_id} stopped")
        return
    with _engine(app_path, store) as engine:
        _guard(lambda: engine.stop(rule_id))
    print(f"rule {rule_id} stopped")


@rule_app.command("delete")
def rule_delete(app_path: AppArg, rule_id: RuleId, store: StoreOpt = None) -> None:
    """Delete a rule."""
    _, client = _server(app_path, store)
    if client is not None:
        _call(client, "DELETE", f"/api/rules/{rule_id}")
        print(f"rule {rule_id} deleted")
        return
    with _engine(app_path, store) as engine:
        _guard(lambda: engine.delete(rule_id))
    print(f"rule {rule_id} deleted")


@rule_app.command("status")
def rule_status(app_path: AppArg, rule_id: RuleId, store: StoreOpt = None) -> None:
    """A rule's status and metrics (records in/out, errors, last error, latency)."""
    _, client = _server(app_path, store)
    if client is not None:
        _print(_call(client, "GET", f"/api/rules/{rule_id}/status"))
        return
    with _engine(app_path, store) as engine:
        status = _guard(lambda: engine.status(rule_id))
    _print(status)
