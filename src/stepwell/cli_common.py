"""What every `stepwell` sub-command module shares: argument types and errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Any

import typer

AppArg = Annotated[str, typer.Argument(help="App folder or app file")]
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


#: Control characters (C0 but tab and newline, DEL, C1) as their escapes: a step's
#: output and errors are shown on the terminal, where an escape sequence in them
#: would run (set the title or clipboard, hide or rewrite lines).
_CONTROLS = {c: repr(chr(c))[1:-1] for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (9, 10)}


def printable(text: object) -> str:
    """``text`` safe to print on a terminal: control characters are escaped."""
    return str(text).translate(_CONTROLS)


def one_line(text: object) -> str:
    """``text`` printable and on one line: a failure is one line on stderr, also when
    its message has several (a driver's hint, a SQL excerpt, a step's own error)."""
    return printable(" ".join(line.strip() for line in str(text).splitlines() if line.strip()))


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


def show_plugin_output() -> None:
    """Print what plugins write (their ``print``, their SDK logger) and what rules'
    ``log`` actions emit on stderr, as eKuiper puts both in its log; for the
    commands that run rules (``serve``, ``rule start --run-for``)."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
    handler.set_name("stepwell-plugin-output")
    for name in ("stepwell.plugin", "stepwell.rule"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == handler.get_name()]:
            logger.removeHandler(old)  # (a second command in one process, as in tests)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it per command)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass
