"""What every `stepwell` sub-command module shares: argument types and errors."""

from __future__ import annotations

import os
from typing import Annotated

import typer

AppArg = Annotated[str, typer.Argument(help="App folder or app file (default: current dir)")]
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="STEPWELL_STORE", help="Store URL (postgresql://...)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON")]
SandboxOpt = Annotated[
    str | None,
    typer.Option(
        "--sandbox", envvar="STEPWELL_SANDBOX",
        help="default | strict (no network unless a step sets it, full isolation or no run) "
        "| none (plain subprocess, for debugging)",
    ),
]


class CliError(Exception):
    """A failure to report as one line on stderr (by ``stepwell.cli.main``)."""


def use_sandbox(mode: str | None) -> None:
    """Make ``mode`` the sandbox of every runner this command creates."""
    if mode is not None:
        from stepwell.sandbox.policy import MODE_ENV, sandbox_mode

        try:
            os.environ[MODE_ENV] = sandbox_mode(mode)
        except ValueError as exc:
            raise CliError(str(exc)) from None
