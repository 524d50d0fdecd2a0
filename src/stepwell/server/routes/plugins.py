"""eKuiper plugins and rules of the served app (``/api/plugins``, ``/api/rules``).

They act on the running server's own :class:`~stepwell.streams.rules.RuleEngine`
(created here on first use when the app had none at start-up), so a rule
created or started through the API runs in the server, and a removed plugin's
processes are stopped first. While a server runs, ``stepwell plugin ...`` and
``stepwell rule ...`` come here instead of opening the store.
"""

from __future__ import annotations

import threading
from pathlib import Path as FilePath
from typing import Any

from fastapi import APIRouter, Body, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from stepwell.runtimes.plugin import (
    PluginError,
    PluginInstallError,
    PluginManager,
    install_plugin,
    list_plugins,
    remove_plugin,
    shared_manager,
)
from stepwell.runtimes.plugin.install import describe_plugin, get_plugin
from stepwell.server.context import ServerContext, get_ctx
from stepwell.server.errors import ApiError
from stepwell.streams import RuleError, StreamError
from stepwell.streams.rules import RuleEngine, RuleNotFound, plugin_in_use

router = APIRouter(prefix="/api", tags=["plugins and rules"])

_engine_lock = threading.Lock()


class PluginInfo(BaseModel):
    """An installed plugin, as recorded at install time."""

    name: str
    folder: str
    version: str
    language: str
    executable: str
    sources: list[str]
    sinks: list[str]
    functions: list[str]
    command: list[str] = Field(description="argv prefix that runs the executable")
    env_key: str | None = None
    conda_env: str | None = None
    content_hash: str = ""
    installed_at: str = ""
    source_path: str = ""
    warnings: list[str] = Field(default_factory=list)
    aggregate_functions: list[str] | None = Field(
        None, description="Its aggregate functions, as it said when started at install "
        "(null: installed without that check)")


class SymbolInfo(BaseModel):
    """One symbol of a plugin, with what its metadata files say."""

    model_config = ConfigDict(extra="allow")

    kind: str = Field(description="source | sink | function")
    name: str
    description: str | None = None
    hint: str | None = Field(None, description="A function's usage hint")
    aggregate: bool | None = Field(None, description="Whether a function is an aggregate")
    profiles: list[str] | None = Field(None, description="A source's config profiles (CONF_KEY)")


class PluginDescription(PluginInfo):
    """An installed plugin and its symbols (eKuiper's describe plugin)."""

    symbols: list[SymbolInfo]


class PluginList(BaseModel):
    plugins: list[PluginInfo]


class PluginInstall(BaseModel):
    path: str = Field(description="Plugin folder or zip on the server's machine (eKuiper layout)")
    force: bool = Field(False, description="Reinstall even if unchanged")


class RemovedPlugin(BaseModel):
    name: str


class RuleSummary(BaseModel):
    id: str
    status: str = Field(description="running | stopped | ...")
    sql: str


class RuleList(BaseModel):
    rules: list[RuleSummary]


class RuleDefinition(BaseModel):
    """A rule as it was created (eKuiper's ``GET /rules/{id}``), and whether it is to run."""

    id: str
    sql: str
    actions: list[dict[str, Any]] = Field(description='[{"<sink>": {...props}}, ...]')
    options: dict[str, Any]
    desired: str = Field(description="running (started with the server) or stopped")
    created_at: str


class RuleCreated(BaseModel):
    id: str
    status: str = Field(description="running (started in the server) or stopped")


class RuleChanged(BaseModel):
    id: str
    status: str = Field(description="running | stopped | deleted")


class RuleStatus(BaseModel):
    """A rule's status and metrics (fields absent when the rule never ran)."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: str
    records_in: int | None = None
    records_out: int | None = None
    errors: int | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    latency_ms_last: float | None = None
    latency_ms_avg: float | None = None
    latency_ms_max: float | None = None
    batches: int | None = None
    late_events: int | None = None
    acks_ok: int | None = None
    acks_error: int | None = None
    started_at: str | None = None
    last_output_at: str | None = None
    queued: int | None = None
    plugin_crashes: int | None = Field(None, description="Exits of the rule's plugin processes "
                                       "the host did not ask for (each is also an error)")
    plugin_restarts: int | None = Field(None, description="Times those processes were started again")
    dropped: int | None = Field(None, description="Plugin-source events never processed: they came "
                                "while the rule's buffer (bufferLength) was full, or still waited "
                                "when it stopped")
    function_processes: dict[str, int] | None = None
    desired: str
    sql: str
    actions: list[str]


def rule_engine(ctx: ServerContext) -> RuleEngine:
    """The server's rule engine, created (and woken on commits) on first use."""
    with _engine_lock:
        if ctx.rules is None:
            engine = RuleEngine.for_app(ctx.app, ctx.store)
            ctx.scheduler.add_commit_observer(lambda tables: [engine.notify(t) for t in tables])
            ctx.rules = engine
        return ctx.rules


def _guard(call: Any) -> Any:
    """Run ``call``, turning rule and plugin errors into the API's error bodies."""
    try:
        return call()
    except RuleNotFound as exc:
        raise ApiError(404, str(exc)) from None
    except (RuleError, StreamError, PluginInstallError, PluginError) as exc:
        raise ApiError(422, str(exc)) from None


def _manager(ctx: ServerContext) -> PluginManager:
    return ctx.rules.manager if ctx.rules is not None else shared_manager(ctx.app.root)


def _functions_changed(ctx: ServerContext) -> None:
    if ctx.rules is not None:
        ctx.rules.__dict__.pop("_fn_cache", None)  # the engine caches function symbols


RuleId = Path(description="Rule id", max_length=200)


# -- plugins ------------------------------------------------------------------------------


@router.get("/plugins", response_model=PluginList, summary="Installed plugins and their symbols")
def get_plugins(ctx: ServerContext = Depends(get_ctx)) -> PluginList:
    return PluginList(plugins=[PluginInfo(**vars(p)) for p in list_plugins(ctx.app.root)])


@router.post("/plugins", response_model=PluginInfo, summary="Install a plugin from a path on the server")
def post_plugin(body: PluginInstall, ctx: ServerContext = Depends(get_ctx)) -> PluginInfo:
    before = {p.name: p.content_hash for p in list_plugins(ctx.app.root)}
    plugin = _guard(lambda: install_plugin(ctx.app.root, FilePath(body.path), force=body.force))
    if before.get(plugin.name, plugin.content_hash) != plugin.content_hash or body.force:
        # processes running the old code restart on the new one
        _manager(ctx).reload_plugin(plugin.name)
    _functions_changed(ctx)
    return PluginInfo(**vars(plugin))


@router.get("/plugins/{name}", response_model=PluginDescription, response_model_exclude_unset=True,
            summary="An installed plugin: its metadata and symbols")
def get_plugin_description(name: str = Path(description="Plugin name", max_length=200),
                           ctx: ServerContext = Depends(get_ctx)) -> Any:
    try:
        return describe_plugin(ctx.app.root, name)
    except PluginInstallError as exc:
        raise ApiError(404, str(exc)) from None


@router.delete("/plugins/{name}", response_model=RemovedPlugin, summary="Remove a plugin")
def delete_plugin(name: str = Path(description="Plugin name", max_length=200),
                  force: bool = Query(False, description="Remove it even if rules use it "
                                      "(those running stop, failed; they then fail to start)"),
                  ctx: ServerContext = Depends(get_ctx)) -> RemovedPlugin:
    try:
        plugin = get_plugin(ctx.app.root, name)
    except PluginInstallError as exc:
        raise ApiError(404, str(exc)) from None
    engine = _guard(lambda: rule_engine(ctx))
    users = engine.rules_using(plugin)
    if users and not force:
        raise ApiError(409, plugin_in_use(name, users))
    engine.plugin_removed(plugin, users)
    _manager(ctx).stop_plugin(name)
    removed = _guard(lambda: remove_plugin(ctx.app.root, name))
    _functions_changed(ctx)
    return RemovedPlugin(name=removed.name)


# -- rules --------------------------------------------------------------------------------


@router.get("/rules", response_model=RuleList, summary="Rules with their status")
def get_rules(ctx: ServerContext = Depends(get_ctx)) -> RuleList:
    engine = _guard(lambda: rule_engine(ctx))
    return RuleList(rules=[RuleSummary(**r) for r in engine.list()])


@router.post("/rules", response_model=RuleCreated, summary="Create a rule (started here unless "
             '`"triggered": false`)')
def post_rule(
    definition: dict[str, Any] = Body(description="The rule: {id, sql, actions, options, triggered}"),
    replace: bool = Query(False, description="Replace a rule with the same id"),
    ctx: ServerContext = Depends(get_ctx),
) -> RuleCreated:
    engine = _guard(lambda: rule_engine(ctx))
    rule = _guard(lambda: engine.create(definition, replace=replace))
    desired = engine.status(rule.id)["desired"]
    if desired == "running":
        _guard(lambda: engine.start(rule.id))
    return RuleCreated(id=rule.id, status=desired)


@router.get("/rules/{rule_id}", response_model=RuleDefinition, summary="A rule's definition")
def get_rule(rule_id: str = RuleId, ctx: ServerContext = Depends(get_ctx)) -> RuleDefinition:
    engine = _guard(lambda: rule_engine(ctx))
    return RuleDefinition(**_guard(lambda: engine.describe(rule_id)))


@router.post("/rules/{rule_id}/start", response_model=RuleChanged, summary="Start a rule in the server")
def start_rule(rule_id: str = RuleId, ctx: ServerContext = Depends(get_ctx)) -> RuleChanged:
    engine = _guard(lambda: rule_engine(ctx))
    _guard(lambda: engine.start(rule_id))
    return RuleChanged(id=rule_id, status="running")


@router.post("/rules/{rule_id}/stop", response_model=RuleChanged, summary="Stop a rule")
def stop_rule(rule_id: str = RuleId, ctx: ServerContext = Depends(get_ctx)) -> RuleChanged:
    engine = _guard(lambda: rule_engine(ctx))
    _guard(lambda: engine.stop(rule_id))
    return RuleChanged(id=rule_id, status="stopped")


@router.delete("/rules/{rule_id}", response_model=RuleChanged, summary="Delete a rule")
def delete_rule(rule_id: str = RuleId, ctx: ServerContext = Depends(get_ctx)) -> RuleChanged:
    engine = _guard(lambda: rule_engine(ctx))
    _guard(lambda: engine.delete(rule_id))
    return RuleChanged(id=rule_id, status="deleted")


@router.get("/rules/{rule_id}/status", response_model=RuleStatus, response_model_exclude_unset=True,
            summary="A rule's status and metrics (records in/out, errors, last error, latency)")
def rule_status(rule_id: str = RuleId, ctx: ServerContext = Depends(get_ctx)) -> Any:
    engine = _guard(lambda: rule_engine(ctx))
    return _guard(lambda: engine.status(rule_id))
