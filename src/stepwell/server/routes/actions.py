"""Actions: list them, run one (``POST /api/actions/{name}/run``).

The router's lifespan starts the app's action executor with the server (its
pool of warm workers begins forking at once) and stops it on shutdown. The
request body is the action's params (a JSON object); the bearer token says
who the caller is (see :mod:`stepwell.server.users`). Every call is a run
(step ``action:<name>``), whose id comes back with the result; its record and
log reach the store a few milliseconds after the response.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from stepwell.engine.action_executor import (
    ActionExecutor,
    ActionNotFound,
    InvalidInput,
    ShuttingDown,
    normalize_user,
)
from stepwell.server.auth import bearer, token_matches
from stepwell.server.context import ServerContext, get_ctx
from stepwell.server.errors import ApiError
from stepwell.server.routes.tables import parse_json
from stepwell.server.users import OWNER, USERS_FILE, UserDirectory, UsersFileError

log = logging.getLogger("stepwell.server")

#: Header with which the owner (or a loopback caller) acts as another user.
USER_HEADER = "x-stepwell-user"


class ActionService:
    """The executor of a served app, plus who may call it."""

    def __init__(self, ctx: ServerContext):
        self.ctx = ctx
        self.users = UserDirectory(ctx.tokens.path.parent / USERS_FILE)
        self.executor = ActionExecutor(ctx.app, ctx.store, environ=ctx.environ, listener=ctx.hub)

    def close(self) -> None:
        self.executor.close()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the executor with the server, stop it (and its workers) at shutdown."""
    ctx: ServerContext | None = getattr(app.state, "ctx", None)
    service = None
    if ctx is not None and ctx.app.actions:
        service = await asyncio.to_thread(ActionService, ctx)
    app.state.actions = service
    if ctx is not None:
        ctx.actions = service  # (the drain at shutdown and run cancels reach it there)
    try:
        yield
    finally:
        app.state.actions = None
        if ctx is not None:
            ctx.actions = None
        if service is not None:
            await asyncio.to_thread(service.close)


router = APIRouter(prefix="/api", tags=["actions"], lifespan=lifespan)


class StepModel(BaseModel):
    name: str
    kind: str = Field(description="python | code | sql | action | loop")
    data: Any = Field(description="What the step returned (None if it failed)")
    error: Any = Field(description="Its error: text, or a list (one per item) for a loop")
    started_at: str
    duration_ms: float


class ActionRunResponse(BaseModel):
    run_id: str = Field(description="The run of this call (GET /api/runs/{run_id}, its logs)")
    action: str
    status: str = Field(description="succeeded | failed | timed_out")
    data: Any = Field(description="The last step's result")
    error: Any = Field(description="Why the action failed, or null")
    steps: list[StepModel]
    duration_ms: float


class ActionStepInfo(BaseModel):
    name: str
    kind: str
    target: str | None = Field(None, description="The file, or the action an action/loop step calls")


class ActionInfo(BaseModel):
    name: str
    description: str | None
    params: list[str] = Field(description="Names of the params with defaults")
    steps: list[ActionStepInfo]


class ActionList(BaseModel):
    actions: list[ActionInfo]


def _service(request: Request) -> ActionService:
    service = getattr(request.app.state, "actions", None)
    if service is None:
        raise ApiError(404, "this app declares no actions (add them under `actions:` in stepwell.yml)")
    return service


async def caller(request: Request, ctx: ServerContext = Depends(get_ctx)) -> dict[str, Any]:
    """The user calling: from the bearer token, else the local user on loopback.
    (Action routes check tokens themselves: user tokens are not the server's. It
    only compares strings and stats files: done on the event loop, not in a thread.)"""
    token = bearer(request.scope["headers"])
    if token is None:
        if ctx.auth_required:
            raise ApiError(401, "this server needs a token: send `Authorization: Bearer <token>` "
                                "(the server's token or a user's from .stepwell/users.toml)",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        identity, may_act_as = None, True
    elif token_matches(token, ctx.tokens.read()):
        identity, may_act_as = dict(OWNER), True
    else:
        service = getattr(request.app.state, "actions", None)
        try:
            identity = service.users.lookup(token) if service is not None else None
        except UsersFileError as exc:  # the operator's mistake: say where in the log only
            log.error("%s", exc)
            raise ApiError(503, "the server cannot check user tokens: its .stepwell/users.toml "
                                "is invalid (its log says why)", code="misconfigured") from None
        if identity is None:
            raise ApiError(401, "unknown token: use the server's token or a user's token from "
                                ".stepwell/users.toml", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        may_act_as = False
    acting = request.headers.get(USER_HEADER)
    if acting is not None:
        if not may_act_as:
            raise ApiError(403, f"only the server's token may act as another user ({USER_HEADER})")
        try:
            identity = json.loads(acting)
        except ValueError as exc:
            raise ApiError(422, f"the {USER_HEADER} header is not valid JSON: {exc}") from None
    try:
        return normalize_user(identity)
    except InvalidInput as exc:
        raise ApiError(422, str(exc)) from None


ActionName = Path(description="Action name", max_length=200)


@router.get("/actions", response_model=ActionList, summary="The app's actions")
def list_actions(request: Request, _user: dict = Depends(caller)) -> ActionList:
    service = getattr(request.app.state, "actions", None)
    actions = [] if service is None else [service.executor.action(n) for n in service.executor.names()]
    return ActionList(actions=[
        ActionInfo(name=a.name, description=a.description, params=sorted(a.params),
                   steps=[ActionStepInfo(name=s.name, kind=s.kind,
                                         target=None if s.kind in ("code",) or
                                         (s.kind == "sql" and s.sql_file is None) else s.source)
                          for s in a.steps])
        for a in actions
    ])  # fmt: skip


async def _raw_body(request: Request) -> bytes:
    return await request.body()


@router.post(
    "/actions/{name}/run",
    response_model=ActionRunResponse,
    summary="Run an action with params (the body); the token identifies the caller",
    responses={200: {"description": "The action ran: it succeeded, or `error` says why not"}},
    openapi_extra={"requestBody": {"description": "The action's params (a JSON object)",
                                   "content": {"application/json": {"schema": {"type": "object"}}}}},
)
def run_action(
    request: Request,
    name: str = ActionName,
    body: bytes = Depends(_raw_body),
    user: dict = Depends(caller),
) -> JSONResponse:
    service = _service(request)
    trigger = request.headers.get("x-stepwell-trigger", "api")
    if trigger not in ("api", "cli", "ui"):
        trigger = "api"
    try:
        service.executor.action(name)
        # read as JSON whatever the content type says (`curl -d` sends a form type)
        params = parse_json(body, f"action {name!r}") if body.strip() else {}
        if not isinstance(params, dict):
            raise ApiError(422, f"action {name!r}: the body must be a JSON object of its "
                                f"params, got {type(params).__name__}")  # fmt: skip
        result = service.executor.invoke(name, params, user, trigger=trigger)
    except ActionNotFound as exc:
        raise ApiError(404, str(exc)) from None
    except InvalidInput as exc:
        raise ApiError(422, str(exc)) from None
    except ShuttingDown as exc:
        raise ApiError(503, str(exc)) from None
    return JSONResponse(result.to_json())
