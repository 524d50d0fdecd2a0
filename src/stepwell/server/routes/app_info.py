"""The app, its steps and graph, and each step's state, positions and partitions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path

from stepwell.engine.state_admin import StateChangeError, change_state, describe_state, set_position
from stepwell.server.context import ServerContext, get_ctx
from stepwell.server.errors import ApiError
from stepwell.server.models import (
    AppModel,
    Graph,
    GraphEdge,
    GraphNode,
    PartitionList,
    PartitionModel,
    PositionModel,
    RunSummary,
    StateChange,
    StepList,
    StepModel,
    StepState,
    WebhookModel,
    jsonable,
)
from stepwell.store.base import StreamPosition

router = APIRouter(prefix="/api", tags=["app"])

StepName = Path(description="Step name", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=200)


def store_label(url: str) -> str:
    """A store URL fit to show: any password replaced by ``***``."""
    from stepwell.store.postgres import redact

    return redact(url)


def step_models(ctx: ServerContext, steps: list[Any]) -> list[StepModel]:
    """``steps`` as the API shows them, with their newest runs (one store query)."""
    latest = ctx.store.latest_runs([step.name for step in steps])
    return [step_model(ctx, step, latest.get(step.name)) for step in steps]


def step_model(ctx: ServerContext, step: Any, last: Any) -> StepModel:
    status = ctx.scheduler.status(step.name)
    return StepModel(
        name=step.name,
        kind=step.kind,
        file=step.file,
        trigger=step.trigger,
        description=step.description,
        inputs=step.input_tables(),
        outputs=step.output_tables(),
        after=step.after,
        parameters=jsonable(step.parameters or {}),
        secrets=list(step.secrets),
        running_run=status.running_run,
        queued_run=status.queued_run,
        last_run=RunSummary.of(last) if last else None,
        next_tick=status.next_tick,
    )


def graph(app: Any) -> Graph:
    """Steps, tables and webhooks as nodes; data flow as edges."""
    nodes: dict[str, GraphNode] = {}
    edges: list[GraphEdge] = []

    def node(kind: str, name: str) -> str:
        key = f"{kind}:{name}"
        nodes.setdefault(key, GraphNode(id=key, kind=kind, name=name))  # type: ignore[arg-type]
        return key

    for table in app.table_names():
        node("table", table)
    for step in app.steps:
        me = node("step", step.name)
        for table in step.input_tables():
            edges.append(GraphEdge(source=node("table", table), target=me))
        for table in step.output_tables():
            edges.append(GraphEdge(source=me, target=node("table", table)))
        if step.after:
            edges.append(GraphEdge(source=node("step", step.after), target=me))
    for hook in app.webhooks:
        edges.append(GraphEdge(source=node("webhook", hook.name), target=node("table", hook.table)))
    return Graph(nodes=list(nodes.values()), edges=edges)


def webhook_models(app: Any) -> list[WebhookModel]:
    return [
        WebhookModel(name=h.name, table=h.table, url=f"/api/webhooks/{h.name}",
                     has_token=bool(h.token), respond=h.respond)  # fmt: skip
        for h in app.webhooks
    ]


@router.get("/app", response_model=AppModel, summary="The app: steps, tables, webhooks, graph")
def get_app(ctx: ServerContext = Depends(get_ctx)) -> AppModel:
    app = ctx.app
    return AppModel(
        title=app.title,
        root=str(app.root),
        file=str(app.file),
        format=app.format,
        store=store_label(ctx.store.url),
        steps=step_models(ctx, app.steps),
        tables=app.table_names(),
        webhooks=webhook_models(app),
        graph=graph(app),
    )


@router.get("/graph", response_model=Graph, summary="The app graph (steps, tables, webhooks)")
def get_graph(ctx: ServerContext = Depends(get_ctx)) -> Graph:
    return graph(ctx.app)


@router.get("/steps", response_model=StepList, summary="Steps with their triggers and status")
def list_steps(ctx: ServerContext = Depends(get_ctx)) -> StepList:
    return StepList(steps=step_models(ctx, ctx.app.steps))


@router.get("/steps/{name}", response_model=StepModel, summary="One step")
def get_step(name: str = StepName, ctx: ServerContext = Depends(get_ctx)) -> StepModel:
    return step_models(ctx, [ctx.app.step(name)])[0]


def _state(ctx: ServerContext, name: str) -> StepState:
    return StepState.model_validate(jsonable(describe_state(ctx.store, name)))


def _idle(ctx: ServerContext, name: str) -> None:
    ctx.app.step(name)
    run_id = ctx.scheduler.running_run(name)
    if run_id is None:
        return
    # a run's end is committed a moment before the scheduler lets go of it: a client
    # that saw the run end must not be told it is still running
    record = ctx.store.get_run(run_id)
    ended = record is not None and record.status not in ("running", "queued")
    if not (ended and ctx.scheduler.wait_not_running(name, 5.0)):
        raise ApiError(
            409, f"step {name!r} is running; change its state when the run has ended "
            f"(or cancel it first)",
        )


@router.get("/steps/{name}/state", response_model=StepState,
            summary="A step's state, stream positions and checkpoint")
def get_state(name: str = StepName, ctx: ServerContext = Depends(get_ctx)) -> StepState:
    ctx.app.step(name)
    return _state(ctx, name)


@router.patch("/steps/{name}/state", response_model=StepState,
              summary="Set state values (after an optional reset), in one transaction")
def patch_state(change: StateChange, name: str = StepName,
                ctx: ServerContext = Depends(get_ctx)) -> StepState:
    _idle(ctx, name)
    try:
        change_state(ctx.store, name, reset=change.reset, assignments=[], values=change.values)
    except StateChangeError as exc:
        raise ApiError(422, str(exc)) from None
    return _state(ctx, name)


@router.delete("/steps/{name}/state", response_model=StepState,
               summary="Reset a step: clear its state and stream positions")
def reset_state(name: str = StepName, ctx: ServerContext = Depends(get_ctx)) -> StepState:
    _idle(ctx, name)
    change_state(ctx.store, name, reset=True, assignments=[])
    return _state(ctx, name)


@router.put("/steps/{name}/positions", response_model=StepState,
            summary="Set one stream position of a step")
def put_position(position: PositionModel, name: str = StepName,
                 ctx: ServerContext = Depends(get_ctx)) -> StepState:
    _idle(ctx, name)
    try:
        set_position(ctx.store, StreamPosition(
            name, position.table, tuple(position.order_by), position.table_version,
            position.value, position.last_id,
        ))  # fmt: skip
    except StateChangeError as exc:
        raise ApiError(422, str(exc)) from None
    return _state(ctx, name)


@router.get("/steps/{name}/partitions", response_model=PartitionList,
            summary="A connector step's partitions: fingerprints, rows, last status")
def get_partitions(name: str = StepName, ctx: ServerContext = Depends(get_ctx)) -> PartitionList:
    ctx.app.step(name)
    records = ctx.store.get_partitions(name)
    return PartitionList(step=name, partitions=[PartitionModel.of(r) for r in records])
