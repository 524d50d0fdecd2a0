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

STYLES = {"node": _NODE_APP, "action": _ACTION_APP}


def scaffold(directory: Path, style: str = "node") -> list[str]:
    """Write the files of a starter app; refuses to overwrite an existing app."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of: {', '.join(STYLES)}")
    directory = Path(directory)
    if (directory / "stepwell.yml").exists():
        raise FileExistsError(f"{directory / 'stepwell.yml'} already exists; choose an empty folder")
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in STYLES[style].items():
        (directory / name).write_text(text)
    return list(STYLES[style])
