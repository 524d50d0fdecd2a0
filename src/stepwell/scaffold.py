"""`stepwell init`: a small working app to start from."""

from __future__ import annotations

from pathlib import Path

_NODE_APP = {
    "stepwell.yml": """\
title: My app
tables:
  - name: events
  - name: event_counts
steps:
  - name: ingest
    node: ingest.py
    parameters: {count: 10}
  - name: count_events
    node: count_events.py
    trigger: upstream
""",
    "ingest.py": """\
from datetime import datetime, timezone

from patterns import Parameter, State, Table

events = Table("events", "w")
state = State()
count = Parameter("count", type=int, default=10)

first = state.get_value("next", 0)
events.append([{"n": first + i, "at": datetime.now(timezone.utc)} for i in range(count)])
state.set_value("next", first + count)
""",
    "count_events.py": """\
from patterns import Table

events = Table("events")
counts = Table("event_counts", "w")

seen = 0
for event in events.as_stream().consume_records():
    seen += 1
counts.append({"new_events": seen})
print(f"{seen} new events")
""",
}

_ACTION_APP = {
    "stepwell.yml": """\
title: My actions
actions:
  - name: greet
    params: {greeting: Hello}
    steps:
      - name: load
        python: load_user.py
        variables: {name: "{{ params.name }}"}
      - name: shape
        code: |
          print("shaping", data)
          return {**data, "message": f"{params['greeting']}, {data['name']}!", "by": user["id"]}
""",
    "load_user.py": """\
# The body of a function: `data`, `error`, `params`, `user` and the step's
# variables (here `name`) are there; what it returns is the step's result.
return {"name": name or "world"}
""",
}

_PROCESSOR_APP = {
    "stepwell.yml": """\
title: My processors
tables:
  - name: readings
  - name: scored
steps:
  - name: measure
    node: measure.py
  - name: score
    processor: score.py
    mode: row                 # the statement sees one input row at a time
    input: readings
    output: scored
    output_schema: {level: str, score: float}
""",
    "measure.py": """\
from patterns import State, Table

state = State()
first = state.get_value("next", 0)
Table("readings", "w").append([{"sensor": f"s{i % 3}", "value": (first + i) * 7 % 50} for i in range(10)])
state.set_value("next", first + 10)
""",
    "score.py": """\
# An Integray-style statement: the body of an async function over INPUT_DATA.
# Each returned object extends the input row; returning [] filters the row out.
row = INPUT_DATA[0]
if row["value"] < 5:
    return []
level = "high" if row["value"] >= 30 else "normal"
log.info(f"{row['sensor']}: {level}")
return [{"level": level, "score": round(row["value"] / 50, 2)}]
""",
}

_CONNECTOR_APP = {
    "stepwell.yml": """\
title: My connector
steps:
  - name: files
    connector: files_connector.py   # context, list_objects, read_bytes
    parser: csv                     # each file's bytes are parsed as CSV
    output: file_rows               # one row per CSV line, plus its file in `_partition`
  - name: totals
    sql: totals.sql
    output: totals
""",
    "files_connector.py": """\
\"\"\"Each CSV file under ./data is a partition; a refresh reads only new or changed files.\"\"\"

from pathlib import Path


def context(credentials):
    return {"root": Path(__file__).parent / "data"}


def list_objects(context, metadata):
    for path in sorted(context["root"].glob("*.csv")):
        stat = path.stat()
        yield {"name": path.name, "fingerprint": f"{stat.st_size}:{stat.st_mtime_ns}",
               "is_prefix": False}


def read_bytes(context, metadata):
    yield (context["root"] / metadata["name"]).read_bytes()
""",
    "data/sales.csv": "region,amount\nnorth,120\nsouth,80\nnorth,45\n",
    "totals.sql": "SELECT region, sum(CAST(amount AS DOUBLE)) AS total FROM file_rows GROUP BY region ORDER BY region\n",
}

_PLUGIN_APP = {
    "stepwell.yml": """\
title: My plugin
plugins: [plugins/greeter]        # eKuiper portable plugins, installed when the server starts
streams: [streams/names.json]
rules: [rules/greet.json]         # rules run under `stepwell serve`
tables:
  - name: names
steps:
  - name: add_names
    node: add_names.py
""",
    "add_names.py": """\
from patterns import Table

Table("names", "w").append([{"name": n} for n in ("ada", "grace", "linus")])
""",
    "streams/names.json": """\
{"sql": "CREATE STREAM names () WITH (TYPE=\\"table\\", DATASOURCE=\\"names\\")"}
""",
    "rules/greet.json": """\
{
  "id": "greet",
  "sql": "SELECT name, shout(name) AS greeting FROM names",
  "actions": [{"table": {"name": "greetings"}}, {"log": {}}]
}
""",
    "plugins/greeter/greeter.json": """\
{"version": "v0.1.0", "language": "python", "executable": "greeter.py",
 "sources": [], "sinks": [], "functions": ["shout"]}
""",
    "plugins/greeter/functions/shout.json": """\
{"about": {"description": {"en_US": "upper-cases a value and adds an exclamation mark"}},
 "functions": [{"name": "shout"}]}
""",
    "plugins/greeter/greeter.py": """\
\"\"\"An eKuiper portable plugin (Python SDK) with one function, shout().\"\"\"

from typing import Any

from ekuiper import Context, Function, PluginConfig, plugin


class Shout(Function):
    def validate(self, args: list[Any]) -> str:
        return "" if len(args) == 1 else "shout() takes one argument"

    def exec(self, args: list[Any], ctx: Context) -> Any:
        return None if args[0] is None else f"{str(args[0]).upper()}!"

    def is_aggregate(self) -> bool:
        return False


if __name__ == "__main__":
    plugin.start(PluginConfig("greeter", {}, {}, {"shout": lambda: Shout()}))
""",
}

STYLES = {
    "node": _NODE_APP,
    "processor": _PROCESSOR_APP,
    "connector": _CONNECTOR_APP,
    "action": _ACTION_APP,
    "plugin": _PLUGIN_APP,
}


def next_command(style: str, app: str) -> str:
    """What to try first with a new app of ``style``."""
    if style == "plugin":  # its rule runs under the server
        return f"stepwell run {app} && stepwell serve {app}"
    if style == "action":
        return f"stepwell action {app} greet --params '{{\"name\": \"ada\"}}'"
    return f"stepwell run {app}"


def scaffold(directory: Path, style: str = "node") -> list[str]:
    """Write the files of a starter app; refuses to overwrite an existing app."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of: {', '.join(STYLES)}")
    directory = Path(directory)
    # never overwrite: a file of the starter app, or another app file, already there
    taken = [name for name in (*STYLES[style], "graph.yml") if (directory / name).exists()]
    if taken:
        raise FileExistsError(
            f"{directory} already has {', '.join(taken)}; choose an empty folder "
            "(stepwell init writes nothing over existing files)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in STYLES[style].items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return list(STYLES[style])
