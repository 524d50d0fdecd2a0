"""``stepwell action APP NAME [--params JSON] [--user JSON]``: run an action once.

Prints the result as JSON (``{"run_id", "action", "status", "data", "error",
"steps"}``). On failure the same JSON is printed, a one-line error goes to
stderr and the exit code is 1. While `stepwell serve` runs for the app the
call goes through its API (``POST /api/actions/NAME/run``, acting as
``--user`` with the server's token); otherwise the action runs here, in
workers started for this one call.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from stepwell.cli_common import AppArg, CliError, SandboxOpt, StoreOpt, one_line
from stepwell.cli_common import use_sandbox as _use_sandbox

#: What each option's JSON looks like, for the error messages.
_EXAMPLES = {"--params": '{"user_id": 7}', "--user": '{"id": "ann", "roles": ["admin"]}'}


def _parse(option: str, text: str | None) -> Any:
    if text is None:
        return None
    example = f"(e.g. {option} '{_EXAMPLES[option]}')"
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _failure(f"{option} is not valid JSON: {exc} {example}") from None
    if not isinstance(value, dict):
        raise _failure(f"{option} must be a JSON object, got {type(value).__name__} {example}")
    return value


def _failure(message: str) -> CliError:
    """Print the error as the result JSON; the caller raises the returned CliError."""
    print(json.dumps({"data": None, "error": message, "steps": []}, indent=2))
    return CliError(message)


def action(
    app_path: AppArg,
    name: Annotated[str, typer.Argument(help="Action name")],
    params: Annotated[str | None, typer.Option("--params", help="Params as a JSON object")] = None,
    user: Annotated[str | None, typer.Option(
        "--user", help='The caller as a JSON object, e.g. \'{"id": "ann", "roles": ["admin"]}\'')] = None,
    store: StoreOpt = None,
    sandbox: SandboxOpt = None,
) -> None:
    """Run an action and print its result as JSON (exit 1 if it failed)."""
    _use_sandbox(sandbox)
    from stepwell.app import load_app
    from stepwell.cli_backend import find_server

    given = _parse("--params", params) or {}
    caller = _parse("--user", user)
    spec = load_app(app_path)
    for warning in spec.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    known = [a.name for a in spec.actions]
    if name not in known:
        raise _failure(f"no action named {name!r} (actions of this app: {', '.join(known) or 'none declared'})")
    client = find_server(spec.root, store or spec.store)
    if client is not None:
        result = _remote(client, name, given, caller, spec)
    else:
        result = _local(spec, store, name, given, caller)
    print(json.dumps(result, indent=2))
    if result.get("error") is not None:
        error = result["error"]
        text = one_line(error if isinstance(error, str) else json.dumps(error))
        print(f"error: action {name!r} {result.get('status', 'failed')}: {text} (log: stepwell logs "
              f"{app_path} {result.get('run_id')})", file=sys.stderr)
        raise typer.Exit(1)


def _remote(client: Any, name: str, params: dict[str, Any], user: Any, spec: Any) -> dict[str, Any]:
    import httpx

    from stepwell.engine.action_executor import LOCAL_USER
    from stepwell.server.client import ApiError

    # without --user, the caller is the local user here as without a server (the
    # server's token alone would make it the app's owner)
    headers = {"X-Stepwell-Trigger": "cli",
               "X-Stepwell-User": json.dumps(LOCAL_USER if user is None else user)}
    timeout = max((a.timeout or 90.0) for a in spec.actions if a.name == name) + 30
    try:
        response = client.request("POST", f"/api/actions/{name}/run", json=params, headers=headers,
                                  timeout=httpx.Timeout(timeout))  # fmt: skip
    except ApiError as exc:
        raise _failure(str(exc)) from None
    finally:
        client.close()
    return response.json()


def _local(spec: Any, store_url: str | None, name: str, params: dict[str, Any],
           user: Any) -> dict[str, Any]:  # fmt: skip
    from stepwell.engine.action_executor import ActionExecutor, InvalidInput
    from stepwell.store import open_store

    store = open_store(store_url or spec.store, spec.root)
    try:
        executor = ActionExecutor(spec, store, warm=0)
        try:
            return executor.invoke(name, params, user, trigger="cli").to_json()
        except InvalidInput as exc:
            raise _failure(str(exc)) from None
        finally:
            executor.close()
    finally:
        store.close()
