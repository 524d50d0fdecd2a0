"""A plugin written with the real ekuiper SDK, used by stepwell's compatibility tests."""

import json
import os
import time
import uuid
from typing import Any

from ekuiper import Context, Function, PluginConfig, Sink, Source, plugin

#: tells this process from the others (in a PID namespace of its own each is pid 1)
PROCESS = uuid.uuid4().hex


class Counter(Source):
    """Emits ``count`` numbered events, ``interval`` ms apart, then waits for close.

    ``exit_at: n`` makes the process exit (status 7) before event ``n``; with
    ``refuse_after_crash`` it first writes ``<datasource>.crashed`` and, that file
    existing, ``configure`` refuses to start the source again."""

    def __init__(self) -> None:
        self.running = True
        self.datasource = ""
        self.conf: dict = {}

    def configure(self, datasource: str, conf: dict) -> None:
        self.datasource = datasource
        self.conf = conf
        if conf.get("refuse_after_crash") and os.path.exists(datasource + ".crashed"):
            raise ValueError(f"counter will not start again after its crash ({datasource})")

    def open(self, ctx: Context) -> None:
        count = int(self.conf.get("count", 5))
        interval = float(self.conf.get("interval", 10)) / 1000
        start = int(self.conf.get("start_ts", 1_700_000_000_000))
        step = int(self.conf.get("step", 1000))
        for i in range(count):
            if not self.running:
                return
            if i == self.conf.get("exit_at"):
                self._crash()
            event = {"id": i, "value": i * 10, "ts": start + i * step,
                     "grp": "a" if i % 2 == 0 else "b", "topic": self.datasource,
                     "pid": os.getpid()}
            ctx.emit(event, {"seq": i, "conf": self.conf.get("datasource")})
            if interval:
                time.sleep(interval)
        if self.conf.get("error_at_end"):
            ctx.emit_error("counter finished")
        while self.running:
            time.sleep(0.02)

    def _crash(self) -> None:
        if self.conf.get("refuse_after_crash"):
            with open(self.datasource + ".crashed", "a") as f:
                f.write("crashed\n")
        print(f"counter: exiting at event {self.conf['exit_at']}", flush=True)
        os._exit(7)

    def close(self, ctx: Context) -> None:
        self.running = False


class Collect(Sink):
    """Appends every payload to the file ``path``; acks each one (errors for "bad" rows).

    ``fail: {"on": "<text>", "how": "raise" | "exit", "times": n}`` makes ``collect``
    raise (the SDK then closes the sink) or the process exit, before acknowledging,
    for the first ``n`` payloads containing the text (counted in ``path.failed``)."""

    def __init__(self) -> None:
        self.path = ""
        self.hang = False
        self.fail: dict = {}

    def configure(self, conf: dict) -> None:
        self.path = conf["path"]
        self.hang = bool(conf.get("hang"))  # never acknowledge (stop tests)
        self.fail = conf.get("fail") or {}

    def _maybe_fail(self, data: bytes) -> None:
        if not self.fail or self.fail["on"].encode() not in data:
            return
        marks = self.path + ".failed"
        failed = len(open(marks).read().splitlines()) if os.path.exists(marks) else 0
        if failed >= int(self.fail.get("times", 1)):
            return
        with open(marks, "a") as f:
            f.write(data.decode() + "\n")
        if self.fail.get("how") == "exit":
            os._exit(9)
        raise RuntimeError(f"collect cannot take {data.decode()}")

    def open(self, ctx: Context) -> None:
        with open(self.path + ".opened", "a") as f:
            f.write(f"{ctx.get_rule_id()} {ctx.get_op_id()} {os.getpid()}\n")

    def collect(self, ctx: Context, data: Any) -> None:
        with open(self.path, "a") as f:
            f.write(data.decode() + "\n")
        self._maybe_fail(data)
        if self.hang:
            time.sleep(3600)
        if b'"bad"' in data:
            ctx.ack_error("bad row refused")
        else:
            ctx.ack_ok()

    def close(self, ctx: Context) -> None:
        with open(self.path + ".closed", "a") as f:
            f.write(f"{ctx.get_rule_id()}\n")


class RevStr(Function):
    def validate(self, args: list[Any]) -> str:
        return "" if len(args) == 1 else "revstr takes exactly 1 argument"

    def exec(self, args: list[Any], ctx: Context) -> Any:
        return str(args[0])[::-1] if args[0] is not None else None

    def is_aggregate(self) -> bool:
        return False


class Scale(Function):
    def validate(self, args: list[Any]) -> str:
        return "" if len(args) == 2 else "scale takes 2 arguments"

    def exec(self, args: list[Any], ctx: Context) -> Any:
        return args[0] * args[1]

    def is_aggregate(self) -> bool:
        return False


class Spread(Function):
    """Aggregate: max - min of the group's values."""

    def validate(self, args: list[Any]) -> str:
        return ""

    def exec(self, args: list[Any], ctx: Context) -> Any:
        values = [v for v in args[0] if v is not None]
        return (max(values) - min(values)) if values else None

    def is_aggregate(self) -> bool:
        return True


class WhoAmI(Function):
    def validate(self, args: list[Any]) -> str:
        return ""

    def exec(self, args: list[Any], ctx: Context) -> Any:
        if args and args[0]:
            time.sleep(float(args[0]))
        state = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
        wrote = {}
        for path in args[1:]:  # files to try to write (sandbox tests)
            try:
                with open(path, "w") as out:
                    out.write("planted")
                wrote[path] = "ok"
            except OSError as exc:
                wrote[path] = exc.strerror
        return {"pid": os.getpid(), "process": PROCESS, "rule": ctx.get_rule_id(),
                "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                "env": sorted(os.environ),
                "home": os.environ.get("HOME"), "app_state": sorted(os.listdir(state)),
                "wrote": wrote}

    def is_aggregate(self) -> bool:
        return False


class TmpFiles(Function):
    def validate(self, args: list[Any]) -> str:
        return ""

    def exec(self, args: list[Any], ctx: Context) -> Any:
        return sorted(n for n in os.listdir("/tmp") if n.endswith(".ipc"))

    def is_aggregate(self) -> bool:
        return False


class Boom(Function):
    """Kills its own process when called with true (crash tests)."""

    def validate(self, args: list[Any]) -> str:
        return ""

    def exec(self, args: list[Any], ctx: Context) -> Any:
        if args and args[0]:
            os._exit(3)
        return json.dumps(args)

    def is_aggregate(self) -> bool:
        return False


class NoVal(Function):
    """A validate() left as `pass` (returns None), as plugin authors write it."""

    def validate(self, args: list[Any]) -> str:
        pass

    def exec(self, args: list[Any], ctx: Context) -> Any:
        return 1

    def is_aggregate(self) -> bool:
        return False


if __name__ == "__main__":
    c = PluginConfig(
        "swtest",
        {"counter": lambda: Counter()},
        {"collect": lambda: Collect()},
        {"revstr": lambda: RevStr(), "scale": lambda: Scale(), "spread": lambda: Spread(),
         "whoami": lambda: WhoAmI(), "tmpfiles": lambda: TmpFiles(), "boom": lambda: Boom(),
         "noval": lambda: NoVal()},
    )
    plugin.start(c)
