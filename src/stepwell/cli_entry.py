"""The ``stepwell`` console script: how every command ends on Ctrl-C and on an
output whose reader has gone (``stepwell runs | head -1``).

It imports the standard library only, so that it is in force while the command
line itself (typer, rich, the engine: most of a command's start) is still being
imported; ``stepwell.cli`` is imported inside it. Even ``signal`` is (its
enums take milliseconds): until this module's ``main`` runs, a Ctrl-C can only
end the process with Python's own traceback.
"""

import io
import os
import sys

TYPE_CHECKING = False  # (the typing module is no light import either)
if TYPE_CHECKING:
    from collections.abc import Callable

#: exit status of a command stopped by Ctrl-C: a shell's for a process SIGINT (2) killed
INTERRUPTED = 128 + 2
#: exit status of a command whose output's reader went away: a shell's for a process
#: SIGPIPE (13) killed, as git, cat or grep are in ``... | head -1``
OUTPUT_CLOSED = 128 + 13


def main() -> None:
    """Console-script entry: import the command line and run the command."""

    def command() -> int:
        from stepwell.cli import dispatch  # typer, rich, ...: most of the start

        return dispatch(sys.argv)

    run_command(command)


def run_command(command: "Callable[[], int]") -> None:
    """Run ``command`` and exit with its status. Ctrl-C at any moment says
    "aborted" (no traceback) and exits 130; output nobody reads any more is
    dropped and the command goes on (a run is not cut short by ``| head``), then
    exits 141 if it would have exited 0."""
    try:
        _prepare()
        code = command()
        _leave_quietly_on_ctrl_c()
        sys.stdout.flush()  # (here: the end of the output may meet a closed pipe too)
    except KeyboardInterrupt:
        _leave_quietly_on_ctrl_c()
        _say("aborted")
        code = INTERRUPTED
    if code == 0 and _Output.closed_seen:
        code = OUTPUT_CLOSED
    sys.exit(code)


def _prepare() -> None:
    """What the process needs before anything else is imported."""
    import signal

    # The host does no linear algebra; numpy's BLAS would start a thread per core
    # that spins for a while, taking CPU from the start-up (about 0.1 s of it).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # a shell starts its background jobs with SIGINT ignored, and Python leaves it
    # so: `kill -INT` stops every command all the same (as it does `run` and `serve`)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout = _tolerant(sys.stdout)
    sys.stderr = _tolerant(sys.stderr)


def _leave_quietly_on_ctrl_c() -> None:
    """The command is over: a Ctrl-C while its output is written out and the process
    exits leaves at once, quietly (not a KeyboardInterrupt in Python's shutdown)."""
    import signal

    signal.signal(signal.SIGINT, lambda _signum, _frame: os._exit(INTERRUPTED))


def _say(line: str) -> None:
    print(line, file=sys.stderr)


class _Output(io.FileIO):
    """Standard output or error whose writes, once its reader has gone (a closed
    pipe), go to /dev/null: a command is not stopped halfway by a reader that
    read what it wanted (``stepwell run APP | head -1`` still runs every step,
    and records them), and Python's shutdown does not print "Exception ignored"."""

    #: a write met a closed pipe (the exit status says so: ``OUTPUT_CLOSED``)
    closed_seen = False

    def write(self, data: bytes) -> int:  # type: ignore[override]
        try:
            return super().write(data)
        except BrokenPipeError:
            _Output.closed_seen = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.fileno())  # (so also for what writes to the descriptor)
            os.close(devnull)
            return len(data)


def _tolerant(stream: io.TextIOWrapper | None) -> io.TextIOWrapper | None:
    """``stream`` (sys.stdout or sys.stderr) as a text stream like it over an
    :class:`_Output` of its descriptor; as it is when it has none."""
    try:
        fd = stream.fileno()  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):  # None (descriptor closed), or no file
        return stream
    assert stream is not None
    buffered = io.BufferedWriter(_Output(fd, "w", closefd=False))
    return io.TextIOWrapper(buffered, encoding=stream.encoding, errors=stream.errors,
                            line_buffering=stream.line_buffering, write_through=stream.write_through)  # fmt: skip
