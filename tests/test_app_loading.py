"""Tests for app-file loading: stepwell.yml, Patterns graph.yml, errors, order, secrets, schemas."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from stepwell.app import (
    AppError,
    Limits,
    SecretError,
    find_secret_refs,
    load_app,
    logical_type,
    lookup,
    parse_duration,
    parse_memory,
    resolve,
    scan_node_tables,
    scan_sql_tables,
)

# --------------------------------------------------------------------------- helpers


def write_app(root: Path, files: dict[str, str]) -> Path:
    """Create ``files`` (path -> text, dedented) under ``root`` and return ``root``."""
    for relative, text in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root


def load_error(path: Path) -> AppError:
    with pytest.raises(AppError) as info:
        load_app(path)
    message = str(info.value)
    assert "\n" not in message
    return info.value


def app_with(tmp_path: Path, app_yaml: str, **extra_files: str) -> Path:
    files = {"stepwell.yml": app_yaml, "a.py": "", "b.py": "", "score.py": "return []\n"}
    files.update(
        {name.replace("__", "/").replace("_dot_", "."): t for name, t in extra_files.items()}
    )
    return write_app(tmp_path, files)


# --------------------------------------------------------------------------- a full stepwell.yml

FULL_APP = """
title: Shop analytics
requirements_file: requirements.txt
store: duckdb
defaults: {timeout: 10m, memory: 1GiB, network: true}
tables:
  - name: messages
  - name: enriched
    unique_on: [id]
  - name: orders
    schema: Order
schemas:
  - schema_file: schemas/Order.yml
steps:
  - name: enrich
    node: enrich.py
    inputs: {messages: messages}
    outputs: {enriched: enriched}
    parameters: {ingestion_count: 100, api_key: "${{ secrets.example_key }}"}
    trigger: upstream
    timeout: 30s
    memory: 512MiB
    network: false
  - name: total
    sql: total.sql
    output: totals
  - name: score
    processor: score.py
    mode: bulk
    input: enriched
    output: scored
    output_schema: {id: int, score: float, amount: 'Decimal(10,2)'}
    checkpoint_column: id
    allowed_imports: [json, xml.etree]
  - name: files
    connector: files_connector.py
    credentials: "${{ secrets.bucket }}"
    parser: csv
    parallelism: 4
    output: raw_files
    trigger: "*/15 * * * *"
    cpu: 1m
    processes: 8
  - name: rescore
    processor: rescore.py
    after: score
    output: rescored
    output_schema: {id: int}
webhooks:
  - name: ingest
    table: messages
actions:
  - name: enrich_user
    steps:
      - name: load
        python: load_user.py
        variables: {uid: "{{ params.user_id }}", token: "${{ secrets.api_token }}"}
      - name: shape
        code: "return {**data, 'seen': True}"
        allow_failure: false
plugins: [plugins/pysam]
streams: [streams/demo.json]
rules: [rules/rule1.json]
"""

ORDER_SCHEMA = """
name: Order
description: One order
unique_on: [id]
field_roles:
  created_ordering: created_at
immutable: true
fields:
  id:
    type: Integer
  customer:
    type: Text
    description: who ordered
  total:
    type: Decimal(12,2)
  paid:
    type: Boolean
  created_at:
    type: DateTime
  day:
    type: Date
  ratio:
    type: Float
  details:
    type: Json
  plain_decimal: Decimal
  note: string
"""


@pytest.fixture
def full_app(tmp_path: Path) -> Path:
    write_app(
        tmp_path,
        {
            "stepwell.yml": FULL_APP,
            "requirements.txt": "requests\n",
            "enrich.py": "from patterns import Table\n",
            "total.sql": "select count(*) as n from enriched join messages using (id)\n",
            "score.py": "return INPUT_DATA\n",
            "rescore.py": "return INPUT_DATA\n",
            "files_connector.py": "def context(credentials):\n    return {}\n",
            "load_user.py": "return params\n",
            "schemas/Order.yml": ORDER_SCHEMA,
            "plugins/pysam/pysam.json": "{}",
            "streams/demo.json": "{}",
            "rules/rule1.json": "{}",
        },
    )
    return tmp_path


def test_full_stepwell_app(full_app: Path) -> None:
    app = load_app(full_app)
    assert app.format == "stepwell"
    assert app.root == full_app.resolve()
    assert app.file == (full_app / "stepwell.yml").resolve()
    assert app.title == "Shop analytics"
    assert app.store == "duckdb"
    assert app.requirements_path == full_app.resolve() / "requirements.txt"
    assert app.defaults == Limits(timeout=600.0, memory=1024**3, network=True)
    assert app.warnings == []

    assert [t.name for t in app.tables] == ["messages", "enriched", "orders"]
    assert app.tables[1].unique_on == ["id"]
    assert app.tables[2].schema_name == "Order"

    assert [(s.name, s.kind, s.file) for s in app.steps] == [
        ("enrich", "node", "enrich.py"),
        ("total", "sql", "total.sql"),
        ("score", "processor", "score.py"),
        ("files", "connector", "files_connector.py"),
        ("rescore", "processor", "rescore.py"),
    ]
    enrich = app.step("enrich")
    assert enrich.parameters == {"ingestion_count": 100, "api_key": "${{ secrets.example_key }}"}
    assert enrich.secrets == ["example_key"]
    assert enrich.trigger == "upstream"
    assert enrich.effective_limits(app.defaults) == Limits(
        timeout=30.0, memory=512 * 1024**2, network=False
    )

    total = app.step("total")
    assert total.trigger == "manual"
    assert total.sql_tables == ["enriched", "messages"]
    assert total.input_tables() == ["enriched", "messages"]
    assert total.output_tables() == ["totals"]

    score = app.step("score")
    assert score.mode == "bulk"
    assert score.output_schema == {"id": "int", "score": "float", "amount": "decimal(10,2)"}
    assert score.checkpoint_column == "id"
    assert score.allowed_imports == ["json", "xml.etree"]
    assert app.step("rescore").mode == "row"  # the processor default
    assert app.step("rescore").after == "score"

    files = app.step("files")
    assert files.credentials == "${{ secrets.bucket }}"
    assert files.secrets == ["bucket"]
    assert files.parser == "csv"
    assert files.parallelism == 4
    assert files.trigger == "*/15 * * * *"
    assert files.effective_limits(app.defaults) == Limits(
        timeout=600.0, memory=1024**3, cpu=60.0, processes=8, network=True
    )

    assert [(w.name, w.table) for w in app.webhooks] == [("ingest", "messages")]
    action = app.actions[0]
    assert action.name == "enrich_user"
    assert [s.name for s in action.steps] == ["load", "shape"]
    assert action.secrets == ["api_token"]
    assert app.plugins == ["plugins/pysam"]
    assert app.streams == ["streams/demo.json"]
    assert app.rules == ["rules/rule1.json"]

    assert app.table_names() == [
        "messages",
        "enriched",
        "orders",
        "totals",
        "scored",
        "raw_files",
        "rescored",
    ]
    assert [s.name for s in app.upstream_order()] == [
        "enrich",
        "total",
        "score",
        "files",
        "rescore",
    ]

    schema = app.common_schema("Order")
    assert schema.unique_on == ["id"]
    assert schema.field_roles == {"created_ordering": "created_at"}
    assert schema.immutable is True
    assert schema.fields["customer"].description == "who ordered"
    assert schema.logical_types == {
        "id": "int",
        "customer": "str",
        "total": "decimal(12,2)",
        "paid": "bool",
        "created_at": "datetime",
        "day": "date",
        "ratio": "float",
        "details": "json",
        "plain_decimal": "decimal(18,3)",
        "note": "str",
    }
    assert app.schemas[0].definition is schema


def test_app_file_path_and_folder_lookup(full_app: Path, tmp_path: Path) -> None:
    by_file = load_app(full_app / "stepwell.yml")
    by_str = load_app(str(full_app))
    assert [s.name for s in by_file.steps] == [s.name for s in by_str.steps]

    other = write_app(
        tmp_path / "other",
        {"my-app.yaml": "title: x\nsteps:\n  - name: a\n    node: a.py\n", "a.py": ""},
    )
    app = load_app(other / "my-app.yaml")
    assert app.format == "stepwell"
    assert app.step("a").kind == "node"


def test_stepwell_yml_is_preferred_over_graph_yml(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        {
            "stepwell.yml": "title: from stepwell\n",
            "graph.yml": "title: from graph\nfunctions: []\n",
        },
    )
    assert load_app(tmp_path).title == "from stepwell"
    assert load_app(tmp_path / "graph.yml").format == "patterns"


def test_missing_app_folder_and_file(tmp_path: Path) -> None:
    error = load_error(tmp_path)
    assert str(error).startswith(f"{tmp_path}: no stepwell.yml or graph.yml in this folder (")
    error = load_error(tmp_path / "nope.yml")
    assert str(error) == f"{tmp_path / 'nope.yml'}: no such app folder or file (check the path)"


@pytest.mark.parametrize(("name", "content"), [
    ("n.py", b"from patterns import Table\nTable('t').read()\n"),
    ("data.csv", b"id,name\n1,a\n"),
    ("data.parquet", b"PAR1\x00\xff"),
])
def test_a_code_or_data_file_passed_as_the_app_is_named_as_not_an_app_file(
    tmp_path: Path, name: str, content: bytes
) -> None:
    """`stepwell run app/n.py` or `stepwell load data.csv TABLE APP` reported the
    file's YAML syntax ('expected <document start>') or 'must be a mapping'."""
    (tmp_path / name).write_bytes(content)
    assert str(load_error(tmp_path / name)) == (
        f"{tmp_path / name}: not an app file (an app file is YAML with keys such as `steps:`)"
        " (pass the app folder (the one holding stepwell.yml) or the app file, and check the"
        " order of the arguments (`stepwell COMMAND --help`))"
    )


def test_empty_app_file_is_an_empty_app(tmp_path: Path) -> None:
    write_app(tmp_path, {"stepwell.yml": "# nothing yet\n"})
    app = load_app(tmp_path)
    assert app.steps == [] and app.tables == [] and app.upstream_order() == []


def test_table_shorthand_and_null_lists(tmp_path: Path) -> None:
    write_app(tmp_path, {"stepwell.yml": "tables: [a, b]\nsteps:\nwebhooks:\n"})
    app = load_app(tmp_path)
    assert [t.name for t in app.tables] == ["a", "b"]
    assert app.steps == []


# --------------------------------------------------------------------------- Patterns graph.yml

GRAPH = """
title: Lead scoring
slug: lead-scoring
description_file: readme.md
version: 1.2.0
tags: [sales]
icon_url: https://example.invalid/icon.svg
exposes:
  outputs: [scores]
dashboards:
  - id: d1
    title: board
storages:
  - database: Default_ro
requirements_file: requirements.txt
schemas:
  - schema_file: schemas/Lead.yml
colour: blue
functions:
  - webhook: incoming_leads
    id: aaaa1111
    title: Incoming leads
    display: {x: 0, y: 0}
  - node_file: enrich/enrich_leads.py
    id: bbbb2222
    title: Enrich
    description_file: enrich.md
    inputs:
      leads: incoming_leads
    outputs:
      enriched: enriched_leads
    parameter_values:
      api_key: ${{ enrich_api_key }}
      crm: ${{ connection.crm }}
      batch: 50
    display: {x: 1, y: 0}
    icon_url: https://example.invalid/x.svg
    timeout: 2m
    flavour: spicy
  - node_file: score.sql
    id: cccc3333
    outputs:
      output_table: scores
  - node_file: fetch_rates.py
    id: dddd4444
    trigger: 0 * * * *
    outputs:
      rates: rates
  - uses: patterns/slack-notify@v3
    id: eeee5555
stores:
  - table: incoming_leads
    id: s1
    display: {x: 0, y: 1}
  - table: enriched_leads
    id: s2
    schema: Lead
  - stream: rates
    id: s3
    storage: Default_ro
    colour: red
  - table: scores
    id: s4
"""

LEAD_SCHEMA = """
name: Lead
fields:
  id: {type: Text}
  score: {type: Float}
"""

SCORE_SQL = """
-- Type '{{' to use Tables and Parameters
with recent as (
    select * from {{ Table("enriched_leads") }} where ts > {{ Parameter("since", "datetime") }}
)
select r.id, r.score * x.rate as score
from recent as r
join {{ Table("rates") }} as x on true
"""


def test_patterns_graph(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        {
            "graph.yml": GRAPH,
            "requirements.txt": "",
            "enrich/enrich_leads.py": "",
            "score.sql": SCORE_SQL,
            "fetch_rates.py": "",
            "schemas/Lead.yml": LEAD_SCHEMA,
        },
    )
    app = load_app(tmp_path)
    graph = tmp_path / "graph.yml"
    assert app.format == "patterns"
    assert app.title == "Lead scoring"
    assert app.requirements_file == "requirements.txt"
    assert [(w.name, w.table) for w in app.webhooks] == [("incoming_leads", "incoming_leads")]
    assert [(t.name, t.schema_name) for t in app.tables] == [
        ("incoming_leads", None),
        ("enriched_leads", "Lead"),
        ("rates", None),
        ("scores", None),
    ]
    assert [(s.name, s.kind, s.file) for s in app.steps] == [
        ("enrich_enrich_leads", "node", "enrich/enrich_leads.py"),
        ("score", "sql", "score.sql"),
        ("fetch_rates", "node", "fetch_rates.py"),
    ]
    enrich = app.step("enrich_enrich_leads")
    assert enrich.inputs == {"leads": "incoming_leads"}
    assert enrich.outputs == {"enriched": "enriched_leads"}
    assert enrich.parameters == {
        "api_key": "${{ enrich_api_key }}",
        "crm": "${{ connection.crm }}",
        "batch": 50,
    }
    assert enrich.secrets == ["connection.crm", "enrich_api_key"]
    assert enrich.timeout == 120.0
    # Patterns runs a function when its inputs change, unless it has a schedule.
    assert enrich.trigger == "upstream"
    score = app.step("score")
    assert score.sql_tables == ["enriched_leads", "rates"]
    assert score.trigger == "upstream"
    assert score.outputs == {"output_table": "scores"}
    assert app.step("fetch_rates").trigger == "0 * * * *"

    assert app.warnings == [
        f"{graph}:17: colour: unknown key 'colour' ignored (neither a graph.yml nor a stepwell key)",
        f"{graph}:38: functions[1].flavour: unknown key 'flavour' ignored"
        " (neither a graph.yml nor a stepwell key)",
        f"{graph}:48: functions[4].uses: component node 'patterns/slack-notify@v3'"
        " is not supported by stepwell and is skipped",
        f"{graph}:60: stores[2].colour: unknown key 'colour' ignored"
        " (neither a graph.yml nor a stepwell key)",
    ]
    assert [s.name for s in app.upstream_order()] == ["enrich_enrich_leads", "fetch_rates", "score"]
    assert app.common_schema("Lead").logical_types == {"id": "str", "score": "float"}


def test_patterns_graph_any_file_name_with_functions(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        {
            "pipeline.yml": "functions:\n  - node_file: a.py\n    schedule: '@daily'\n",
            "a.py": "",
        },
    )
    app = load_app(tmp_path / "pipeline.yml")
    assert app.format == "patterns"
    assert app.step("a").trigger == "@daily"


def test_patterns_graph_honours_stepwell_top_level_keys(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        {
            "graph.yml": """
                defaults: {timeout: 1h}
                functions:
                  - node_file: a.py
                webhooks:
                  - name: hook
                    table: events
            """,
            "a.py": "",
        },
    )
    app = load_app(tmp_path)
    assert app.defaults.timeout == 3600.0
    assert [w.name for w in app.webhooks] == ["hook"]
    assert app.step("a").trigger == "manual"
    assert app.warnings == []


def test_patterns_nested_graph_is_an_error(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        {
            "graph.yml": "functions:\n  - node_file: a.py\n  - node_file: sub/graph.yml\n",
            "a.py": "",
        },
    )
    error = load_error(tmp_path)
    assert str(error).startswith(
        f"{tmp_path / 'graph.yml'}:3: functions[1].node_file: nested graphs are not supported"
    )


def test_patterns_chart_nodes_and_docs_are_skipped_and_the_graph_runs(tmp_path: Path) -> None:
    """Patterns templates put chart nodes (a .json Vega spec over `chart_input`) and
    canvas notes (`docs:`) in graph.yml: nothing to run, so not a reason to refuse it."""
    from apputil import rows, run_app

    app_dir = tmp_path / "app"  # (the sandbox user cannot enter tmp_path itself)
    app_dir.mkdir()
    write_app(
        app_dir,
        {
            "graph.yml": """
                title: Charts
                docs:
                  - id: note1
                    markdown_file: note.md
                functions:
                  - node_file: make.py
                    id: mk000001
                  - chart_input: numbers
                    id: ch000001
                    node_file: numbers_chart.json
                    title: Numbers
                stores:
                  - table: numbers
            """,
            "note.md": "# notes\n",
            "numbers_chart.json": '{"mark": "bar"}',
            "make.py": "from patterns import Table\nTable('numbers', 'w').append({'n': 1})\n",
        },
    )
    app = load_app(app_dir)
    assert [s.name for s in app.steps] == ["make"]
    assert app.warnings == []
    (run,) = run_app(app_dir)
    assert run.status == "succeeded", run.error
    assert [r["n"] for r in rows(app_dir, "numbers")] == [1]


def test_patterns_missing_node_file(tmp_path: Path) -> None:
    write_app(tmp_path, {"graph.yml": "title: t\nfunctions:\n  - id: x\n    node_file: gone.py\n"})
    error = load_error(tmp_path)
    assert str(error) == (
        f"{tmp_path / 'graph.yml'}:4: functions[0].node_file: node file 'gone.py' not found"
        f" (create {tmp_path.resolve() / 'gone.py'} or fix the path)"
    )


def test_patterns_duplicate_step_names(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        {
            "graph.yml": "functions:\n  - node_file: a_b.py\n  - node_file: a/b.py\n",
            "a_b.py": "",
            "a/b.py": "",
        },
    )
    error = load_error(tmp_path)
    assert str(error).startswith(
        f"{tmp_path / 'graph.yml'}:3: functions[1].node_file: duplicate step name 'a_b'"
        " (first at functions[0].node_file, line 2) (rename one of the node files"
    )


def test_patterns_bad_trigger_points_at_the_function(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        {"graph.yml": "functions:\n  - node_file: a.py\n    trigger: every day\n", "a.py": ""},
    )
    error = load_error(tmp_path)
    assert str(error).startswith(
        f"{tmp_path / 'graph.yml'}:3: functions[0].trigger: bad trigger 'every day'"
    )


def test_patterns_parameter_error_uses_graph_key_names(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        {
            "graph.yml": "functions:\n  - node_file: a.py\n    parameter_values: [1, 2]\n",
            "a.py": "",
        },
    )
    error = load_error(tmp_path)
    assert str(error) == (
        f"{tmp_path / 'graph.yml'}:3: functions[0].parameter_values: bad value [1, 2]:"
        " expected a mapping (write `key: value` pairs)"
    )


def test_patterns_unknown_store_schema_warns(tmp_path: Path) -> None:
    write_app(tmp_path, {"graph.yml": "stores:\n  - table: t\n    schema: Nope\n"})
    app = load_app(tmp_path)
    assert len(app.warnings) == 1
    assert app.warnings[0].startswith(
        f"{tmp_path / 'graph.yml'}:3: stores[0].schema: unknown schema"
    )


# --------------------------------------------------------------------------- error messages


def test_malformed_yaml(tmp_path: Path) -> None:
    write_app(tmp_path, {"stepwell.yml": "title: x\nsteps:\n  - name: a\n   node: a.py\n"})
    error = load_error(tmp_path)
    assert str(error).startswith(f"{tmp_path / 'stepwell.yml'}:4: invalid YAML: ")
    assert str(error).endswith("(fix the YAML syntax at line 4, column 4)")


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    name: b\n")
    error = load_error(tmp_path)
    assert str(error) == (
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].name: duplicate key 'name' (first on line 2)"
        " (remove one of them)"
    )


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    write_app(tmp_path, {"stepwell.yml": "- a\n- b\n"})
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:1: the app file must be a mapping of keys"
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    app_with(tmp_path, "title: x\nstepz:\n  - name: a\n")
    error = load_error(tmp_path)
    assert str(error).startswith(
        f"{tmp_path / 'stepwell.yml'}:2: stepz: unknown key 'stepz' (did you mean 'steps'? allowed keys: "
    )


def test_unknown_step_key(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    paramters: {x: 1}\n")
    error = load_error(tmp_path)
    assert str(error).startswith(
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].paramters: unknown key 'paramters'"
        " (did you mean 'parameters'? allowed keys: node, sql, processor, connector, name,"
    )


def test_secrets_are_never_read_from_the_app_file(tmp_path: Path) -> None:
    app_with(tmp_path, "secrets:\n  api_key: abc\n")
    error = load_error(tmp_path)
    assert str(error).startswith(
        f"{tmp_path / 'stepwell.yml'}:1: secrets: unknown key 'secrets' (secrets are never read"
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("3 parsecs", "bad duration '3 parsecs'"),
        ("-5", "bad duration -5: it must be more than zero"),
        ("0s", "bad duration '0s': it must be more than zero"),
        ("true", "bad duration True"),
        # these loaded, and the run failed: 'timestamp out of range for platform time_t'
        ("99999999999999999999", "bad duration 99999999999999999999: it must be at most 100 years"),
        (".inf", "bad duration inf: it must be at most 100 years"),
        (".nan", "bad duration nan: it must be more than zero"),
    ],
)
def test_bad_duration(tmp_path: Path, value: str, problem: str) -> None:
    app_with(tmp_path, f"steps:\n  - name: a\n    node: a.py\n    timeout: {value}\n")
    error = load_error(tmp_path)
    assert str(error) == (
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].timeout: {problem} (write seconds as a number,"
        ' or a duration such as "30s", "10m", "1h" or "1h30m")'
    )


@pytest.mark.parametrize("value", ["99999999999999999999999", "9999999999TiB", ".inf", ".nan"])
def test_a_memory_size_beyond_what_a_limit_holds(tmp_path: Path, value: str) -> None:
    """These loaded, and the run failed: 'Integer value out of range'."""
    app_with(tmp_path, f"steps:\n  - name: a\n    node: a.py\n    memory: {value}\n")
    error = str(load_error(tmp_path))
    assert error.startswith(f"{tmp_path / 'stepwell.yml'}:4: steps[0].memory: bad memory size ")
    assert ": it must be at most 1EiB (write bytes as a number" in error, error


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    app_with(tmp_path, "\n".join(lines) + "\n")  # 9**9 values once expanded
    error = load_error(tmp_path)
    assert "the file expands to more than 200,000 values" in str(error), str(error)


def test_a_decimal_type_split_by_yaml_flow_style_says_to_quote_it(tmp_path: Path) -> None:
    app_with(tmp_path, "schemas:\n  - schema_file: order.yml\n", order_dot_yml=(
        "name: Order\nfields:\n  amount: {type: Decimal(12,2)}\n"))
    error = load_error(tmp_path)
    assert "unknown field type 'Decimal(12'" in str(error)
    assert "quote it, as in {type: 'Decimal(12,2)'}" in str(error), str(error)


def test_bad_default_memory(tmp_path: Path) -> None:
    app_with(tmp_path, "title: x\ndefaults:\n  timeout: 1h\n  memory: lots\n")
    error = load_error(tmp_path)
    assert str(error) == (
        f"{tmp_path / 'stepwell.yml'}:4: defaults.memory: bad memory size 'lots' (write bytes"
        ' as a number, or a size such as "512MiB", "1GiB", "100MB" or "1G")'
    )


def test_missing_node_file(tmp_path: Path) -> None:
    app_with(
        tmp_path, "title: x\nsteps:\n  - name: a\n    node: a.py\n  - name: c\n    node: lib/c.py\n"
    )
    error = load_error(tmp_path)
    assert str(error) == (
        f"{tmp_path / 'stepwell.yml'}:6: steps[1].node: node file 'lib/c.py' not found"
        f" (create {tmp_path.resolve() / 'lib' / 'c.py'} or fix the path)"
    )


def test_a_node_file_that_is_a_folder_is_named_as_one(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: n.py\n")
    (tmp_path / "n.py").mkdir()
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:3: steps[0].node: node file 'n.py' is a folder, not a file"
        " (give the path of a file inside it, or fix the path)"
    )


def test_an_app_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "stepwell.yml").write_bytes(b"title: x\nsteps: []\ndescription: caf\xe9\n")
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:3: file is not UTF-8 text (byte 0xe9 at line 3, column 17)"
        " (save it as UTF-8)"
    )


def test_file_outside_the_app_folder(tmp_path: Path) -> None:
    app_with(tmp_path / "app", "steps:\n  - name: a\n    node: ../a.py\n")
    (tmp_path / "a.py").write_text("")
    error = load_error(tmp_path / "app")
    assert str(error).startswith(
        f"{tmp_path / 'app' / 'stepwell.yml'}:3: steps[0].node: node file '../a.py' is outside"
        " the app folder"
    )


def test_missing_requirements_and_schema_and_action_files(tmp_path: Path) -> None:
    app_with(tmp_path, "requirements_file: req.txt\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:1: requirements_file: requirements file 'req.txt' not found"
    )
    app_with(tmp_path, "schemas:\n  - schema_file: s.yml\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:2: schemas[0].schema_file: schema file 's.yml' not found"
    )
    app_with(
        tmp_path, "actions:\n  - name: x\n    steps:\n      - name: s\n        python: gone.py\n"
    )
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:5: actions[0].steps[0].python: python file 'gone.py' not found"
    )
    app_with(tmp_path, "rules:\n  - rules/r.json\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:2: rules[0]: rule file 'rules/r.json' not found"
    )


def test_duplicate_step_names(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n  - name: a\n    node: b.py\n")
    error = load_error(tmp_path)
    assert str(error) == (
        f"{tmp_path / 'stepwell.yml'}:4: steps[1].name: duplicate step name 'a'"
        " (first at steps[0].name, line 2) (give every step its own name)"
    )


def test_duplicate_table_names(tmp_path: Path) -> None:
    app_with(tmp_path, "tables:\n  - name: t\n  - name: u\n  - name: t\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:4: tables[2].name: duplicate table name 't'"
    )


def test_style_specific_field_misuse(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    mode: row\n")
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].mode: `mode` cannot be used on a node step"
        " (`mode` is accepted by processor steps only; remove it)"
    )
    app_with(
        tmp_path,
        "steps:\n  - name: a\n    processor: score.py\n    output: t\n"
        "    output_schema: {x: int}\n    parser: csv\n",
    )
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:6: steps[0].parser: `parser` cannot be used on a processor"
        " step (`parser` is accepted by connector steps only; remove it)"
    )
    app_with(tmp_path, "steps:\n  - name: a\n    connector: a.py\n    inputs: {x: y}\n")
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].inputs: `inputs` cannot be used on a connector"
        " step (`inputs` is accepted by node steps and sql steps only; remove it)"
    )


def test_step_needs_exactly_one_style_key(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    sql: b.sql\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].sql: a step has exactly one style key"
    )
    app_with(tmp_path, "steps:\n  - name: a\n    timeout: 5\n")
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:2: steps[0]: a step needs one of the keys node:, sql:,"
        " processor: or connector: (add e.g. `node: my_step.py` naming the step's code file)"
    )
    app_with(tmp_path, "steps:\n  - name: a\n    kind: node\n    file: a.py\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:3: steps[0].kind: unknown key 'kind'"
    )


def test_processor_requirements(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: p\n    processor: score.py\n    output: t\n")
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:2: steps[0].output_schema: a processor step needs"
        " a non-empty `output_schema` (add e.g. `output_schema: {id: int, score: float}`)"
    )
    app_with(tmp_path, "steps:\n  - name: p\n    processor: score.py\n    output: t\n"
                       "    output_schema: {}\n")  # fmt: skip
    assert "steps[0].output_schema: a processor step needs a non-empty `output_schema`" in str(
        load_error(tmp_path))
    app_with(tmp_path, "steps:\n  - name: p\n    processor: score.py\n    output: t\n"
                       "    output_schema: {y: decimal(12,2)}\n")  # fmt: skip
    assert "unknown type 'decimal(12' (quote it inside { }" in str(load_error(tmp_path))
    app_with(
        tmp_path,
        "steps:\n  - name: p\n    processor: score.py\n    output: t\n    output_schema: {x: int}\n"
        "    input: src\n    after: q\n",
    )
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:7: steps[0].after: `input` and `after` cannot be used together"
    )
    app_with(
        tmp_path,
        "steps:\n  - name: p\n    processor: score.py\n    output: t\n"
        "    output_schema: {x: integer, y: money}\n",
    )
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:5: steps[0].output_schema.y: unknown type 'money'"
    )
    app_with(
        tmp_path,
        "steps:\n  - name: p\n    processor: score.py\n    output: t\n"
        "    output_schema: {x: int}\n    mode: sometimes\n",
    )
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:6: steps[0].mode: bad value 'sometimes' (use 'row' or 'bulk')"
    )


def test_after_must_name_a_step(tmp_path: Path) -> None:
    app_with(
        tmp_path,
        "steps:\n  - name: p\n    processor: score.py\n    output: t\n"
        "    output_schema: {x: int}\n    after: nope\n",
    )
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:6: steps[0].after: no step named 'nope' (known steps: p)"
    )


@pytest.mark.parametrize(
    "trigger",
    ["'61 * * * *'", "'* * *'", "sometimes", "5", "'*/99 * * * *'", "'0 */24 * * *'",
     "'5-10/6 * * * *'", "'0 0 1 */12 *'", "'* * * * * */60'", "'0 0 30 2 *'"],
)
def test_bad_cron(tmp_path: Path, trigger: str) -> None:
    app_with(tmp_path, f"steps:\n  - name: a\n    node: a.py\n    trigger: {trigger}\n")
    error = load_error(tmp_path)
    assert str(error).startswith(f"{tmp_path / 'stepwell.yml'}:4: steps[0].trigger: bad trigger ")
    assert str(error).endswith('(use "manual", "upstream" or a cron string such as "*/15 * * * *")')


def test_cron_steps_name_the_field_that_never_repeats(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    trigger: '*/60 * * * *'\n")
    assert "step /60 in the minute field covers no more than its first value (0)" in str(
        load_error(tmp_path)
    )
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    trigger: '0 0 30 2 *'\n")
    assert "no date ever matches it, so it would never run" in str(load_error(tmp_path))
    for fine in ("*/59 * * * *", "0 */12 * * *", "5-10/5 * * * *", "0 0 * * mon-fri",
                 "* * * * * */10"):
        app_with(tmp_path, f"steps:\n  - name: a\n    node: a.py\n    trigger: '{fine}'\n")
        assert load_app(tmp_path).steps[0].trigger == fine


def test_bad_values_have_type_hints(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    processes: many\n")
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].processes: bad value 'many': expected a whole"
        " number (write a number such as 4)"
    )
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    processes: 0\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].processes: bad value 0: must be greater than 0"
    )
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    processes: 99999999999999999999\n")
    assert str(load_error(tmp_path)) == (  # it loaded, and runs failed: 'Integer value out of range'
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].processes: bad value 99999999999999999999: must"
        " be at most 2147483647 (use a smaller number)"
    )
    app_with(tmp_path, "store: mysql://x\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:1: store: bad store 'mysql://x'"
    )
    app_with(tmp_path, "steps:\n  - node: a.py\n")
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:2: steps[0].name: missing required key 'name' (add `name:`)"
    )
    app_with(tmp_path, "tables:\n  - name: bad-name\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:2: tables[0].name: bad table name 'bad-name'"
    )
    app_with(tmp_path, "tables:\n  - name: orders__v2\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:2: tables[0].name: bad table name 'orders__v2' (names "
        "ending in __v<number> are kept for a table's earlier versions"
    )


def test_all_errors_are_kept(tmp_path: Path) -> None:
    app_with(
        tmp_path,
        "steps:\n  - name: a\n    node: a.py\n    timeout: soon\n    memory: heaps\n    foo: 1\n",
    )
    error = load_error(tmp_path)
    assert [(e.line, e.key) for e in error.errors] == [
        (4, "steps[0].timeout"),
        (5, "steps[0].memory"),
        (6, "steps[0].foo"),
    ]
    assert error.file == str(tmp_path / "stepwell.yml")
    assert error.line == 4 and error.key == "steps[0].timeout"


def test_action_steps_need_names(tmp_path: Path) -> None:
    app_with(
        tmp_path,
        "actions:\n  - name: x\n    steps:\n      - name: s\n        code: return 1\n"
        "      - code: return 2\n",
    )
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:6: actions[0].steps[1]: an action step needs a name"
        " (add `name: <step name>` to it)"
    )


def test_table_schema_must_be_declared(tmp_path: Path) -> None:
    app_with(tmp_path, "tables:\n  - name: t\n    schema: Missing\n")
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'stepwell.yml'}:3: tables[0].schema: unknown schema 'Missing'"
    )


def test_bad_schema_file_reports_its_own_line(tmp_path: Path) -> None:
    app_with(
        tmp_path,
        "schemas:\n  - schema_file: schemas/S.yml\n",
        schemas__S_dot_yml="name: S\nfields:\n  a:\n    type: Integer\n  b:\n    type: Money\n",
    )
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'schemas' / 'S.yml'}:6: fields.b.type: unknown field type 'Money'"
        " (use Integer, Text, Float, Boolean, Date, DateTime, Decimal(p,s) or Json)"
    )
    app_with(
        tmp_path,
        "schemas:\n  - schema_file: schemas/S.yml\n",
        schemas__S_dot_yml="name: S\nunique_on: [id]\nfields:\n  a: Integer\n",
    )
    assert str(load_error(tmp_path)).startswith(
        f"{tmp_path / 'schemas' / 'S.yml'}:2: unique_on[0]: unique_on names 'id'"
    )


# --------------------------------------------------------------------------- graph order


ORDER_APP = """
steps:
  - name: report
    sql: report.sql
    output: report
  - name: clean
    node: a.py
    inputs: {raw: raw}
    outputs: {clean: clean}
  - name: load
    connector: b.py
    output: raw
  - name: post
    processor: score.py
    after: clean
    output: posted
    output_schema: {id: int}
  - name: standalone
    node: b.py
"""


def test_upstream_order(tmp_path: Path) -> None:
    app_with(tmp_path, ORDER_APP, report_dot_sql='select * from {{ Table("clean") }}\n')
    app = load_app(tmp_path)
    assert [s.name for s in app.upstream_order()] == [
        "load",
        "clean",
        "report",
        "post",
        "standalone",
    ]
    edges = app.upstream_edges()
    assert edges["report"] == ["clean"]
    assert edges["post"] == ["clean"]
    assert app.downstream("clean") == ["report", "post"]


def test_a_sql_step_may_not_replace_a_table_others_write(tmp_path: Path) -> None:
    app_with(
        tmp_path,
        """
        webhooks: [{name: hook, table: shared}]
        steps:
          - name: a
            node: a.py
          - name: c
            sql: c.sql
            output: shared
        """,
        a_dot_py='from patterns import Table\nTable("shared", "w").append({"x": 1})\n',
        c_dot_sql="select 3 as y\n",
    )
    error = load_error(tmp_path)
    assert str(error).startswith(
        f"{tmp_path / 'stepwell.yml'}:5: steps[1]: SQL step 'c' replaces all rows of table "
        "'shared' on each run, but 'a', webhook hook also write it: those rows would be lost"
    ), str(error)
    assert "output: <name>" in str(error)


def test_cycle_is_reported_with_its_steps(tmp_path: Path) -> None:
    app_with(
        tmp_path,
        """
        steps:
          - name: first
            node: a.py
            inputs: {x: t3}
            outputs: {y: t1}
          - name: other
            node: a.py
          - name: second
            node: b.py
            inputs: {x: t1}
            outputs: {y: t2}
          - name: third
            sql: third.sql
            output: t3
        """,
        third_dot_sql="select * from t2\n",
    )
    error = load_error(tmp_path)
    assert str(error).startswith(
        f"{tmp_path / 'stepwell.yml'}:2: steps[0]: steps form a cycle:"
        " first -> second -> third -> first ("
    )


def test_node_ports_default_to_the_tables_its_code_names() -> None:
    source = textwrap.dedent("""
        import patterns
        from patterns import Table
        events = Table("events")
        counts = patterns.Table("counts", mode="w")
        log = Table("log", "w")
        again = Table("log")  # read and written: an output
        mapped = Table("port")
        dynamic = Table(f"t_{1}")
        not_a_table = print("x")
    """)
    reads, writes = scan_node_tables(source, inputs={"port": "real_table"})
    assert reads == ["events", "real_table"] and writes == ["counts", "log"]
    assert scan_node_tables("def broken(:\n") == ([], [])


def test_steps_are_ordered_and_cycles_found_by_the_tables_code_names(tmp_path: Path) -> None:
    reader = "from patterns import Table\nfor r in Table('src').as_stream().consume_records():\n    Table('dst', 'w').append(r)\n"
    writer = "from patterns import Table\nTable('src', 'w').append({'n': 1})\n"
    app_with(tmp_path, """
        steps:
          - name: reader
            node: r.py
            trigger: upstream
          - name: writer
            node: w.py
        """, r_dot_py=reader, w_dot_py=writer)
    app = load_app(tmp_path)
    assert app.step("reader").input_tables() == ["src"]
    assert app.step("reader").output_tables() == ["dst"]
    assert app.upstream_edges()["reader"] == ["writer"]
    # a cycle made only in code is found too
    app_with(tmp_path, """
        steps:
          - name: one
            node: r.py
          - name: two
            node: back.py
        """, back_dot_py="from patterns import Table\nTable('dst')\nTable('src', 'w')\n")
    assert "steps form a cycle: one -> two -> one" in str(load_error(tmp_path))


def test_step_lookup_lists_known_steps(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n  - name: b\n    node: b.py\n")
    app = load_app(tmp_path)
    with pytest.raises(AppError) as info:
        app.step("c")
    assert str(info.value) == (
        f"{tmp_path / 'stepwell.yml'}:1: steps: no step named 'c' (known steps: a, b)"
    )


def test_scan_sql_tables() -> None:
    found = scan_sql_tables(
        """
        with t as (select * from {{ Table("events") }})
        select * from t join users u on u.id = t.uid
        join {{ port_a }} p on true
        where x > {{ Parameter("since") }}
        """,
        inputs={"port_a": "accounts"},
    )
    assert found.parsed
    assert found.reads == ["events", "users", "accounts"]
    assert found.writes == []
    written = scan_sql_tables('insert into {{ Table("out", "w") }} select * from src')
    assert written.reads == ["src"] and written.writes == ["out"]
    fallback = scan_sql_tables("select * from a join b on a.x === b.y ??? ")
    assert not fallback.parsed
    assert fallback.reads == ["a", "b"]


# --------------------------------------------------------------------------- value parsers


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        (45, 45.0),
        (2.5, 2.5),
        ("90", 90.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 1024**2),
        ("1GiB", 1024**3),
        ("100MB", 100 * 1000**2),
        ("1G", 1024**3),
        ("1.5 GiB", int(1.5 * 1024**3)),
        ("1024k", 1024**2),
        ("2gb", 2 * 1000**3),
        (2**30, 2**30),
        ("1048576", 1024**2),
    ],
)
def test_parse_memory(text: object, size: int) -> None:
    assert parse_memory(text) == size


def test_a_memory_limit_too_small_to_start_a_worker(tmp_path: Path) -> None:
    app_with(tmp_path, "steps:\n  - name: a\n    node: a.py\n    memory: 512\n")
    error = load_error(tmp_path)
    assert str(error).startswith(
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].memory: memory size 512 is below the 1MiB "
        'a worker needs; did you mean "512MiB"? (write bytes'
    ), str(error)


@pytest.mark.parametrize("where, text, problem", [
    ("steps[0].tmp", "steps:\n  - name: a\n    node: a.py\n    tmp: 0\n",
     'tmp size 0 is below the 1MiB /tmp holds at least'),
    ("steps[0].tmp", "steps:\n  - name: a\n    node: a.py\n    tmp: 512\n",
     'tmp size 512 is below the 1MiB /tmp holds at least; did you mean "512MiB"?'),
    ("defaults.tmp", "defaults:\n  tmp: lots\nsteps:\n  - name: a\n    node: a.py\n",
     "bad tmp size 'lots'"),
])
def test_a_bad_tmp_size_is_called_a_tmp_size(tmp_path: Path, where: str, text: str,
                                             problem: str) -> None:  # fmt: skip
    """(Not a memory size below what a worker needs: /tmp is no worker's memory.)"""
    app_with(tmp_path, text)
    error = str(load_error(tmp_path))
    assert f"{where}: {problem} (write bytes" in error, error


def test_logical_type_aliases() -> None:
    assert logical_type("Integer") == "int"
    assert logical_type("TEXT") == "str"
    assert logical_type("Decimal(12, 2)") == "decimal(12,2)"
    assert logical_type("numeric(10)") == "decimal(10,0)"
    assert logical_type("DateTime") == "datetime"
    assert logical_type("date_time") == "datetime"
    assert logical_type("JSON") == "json"
    assert logical_type("Money") is None


# --------------------------------------------------------------------------- secrets


def test_find_secret_refs() -> None:
    value = {
        "a": "${{ secrets.alpha }}",
        "b": ["Bearer ${{beta}}", {"c": "${{ connection.warehouse }}"}],
        "d": "no ${ref} here {{ nor_here }}",
        "e": 5,
    }
    assert find_secret_refs(value) == {"alpha", "beta", "connection.warehouse"}


@pytest.mark.parametrize(("app_yaml", "line", "key", "ref"), [
    ("steps:\n  - name: a\n    node: a.py\n    parameters: {k: '${{ secret.key }}'}\n",
     4, "steps[0].parameters.k", "${{ secret.key }}"),
    ("steps:\n  - name: a\n    node: a.py\n    parameters:\n      h: [x, 'Bearer ${{secrets.a b}}']\n",
     5, "steps[0].parameters.h[1]", "${{secrets.a b}}"),
    ("steps:\n  - name: c\n    connector: a.py\n    output: o\n    credentials: '${{ secrets.bucket.key }}'\n",
     5, "steps[0].credentials", "${{ secrets.bucket.key }}"),
])
def test_a_malformed_secret_reference_is_an_error(
    tmp_path: Path, app_yaml: str, line: int, key: str, ref: str
) -> None:
    """`${{ secret.key }}` (a typo) reached the step as that text, e.g. as an API key."""
    app_with(tmp_path, app_yaml)
    assert str(load_error(tmp_path)) == (
        f"{tmp_path / 'stepwell.yml'}:{line}: {key}: {ref!r} is not a secret reference (write "
        "${{ secrets.<name> }} with a name of letters, digits, '_' and '-')"
    )


def test_resolve_from_env(tmp_path: Path) -> None:
    env = {
        "STEPWELL_SECRET_EXAMPLE_KEY": "k-123",
        "STEPWELL_SECRET_CONNECTION_CRM": '{"token": "t-9"}',
    }
    params = {
        "api_key": "${{ secrets.example_key }}",
        "header": "Bearer ${{ example_key }}!",
        "crm": "${{ connection.crm }}",
        "count": 3,
    }
    assert resolve(params, tmp_path, env) == {
        "api_key": "k-123",
        "header": "Bearer k-123!",
        "crm": {"token": "t-9"},
        "count": 3,
    }


def test_resolve_from_secrets_toml_and_env_wins(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        {
            ".stepwell/secrets.toml": """
                bucket = "s3://data"
                port = 5432

                [connection.warehouse]
                host = "db.internal"
                password = "pw"
            """,
        },
    )
    value = ["${{ bucket }}", "${{ secrets.port }}", "${{ connection.warehouse }}"]
    assert resolve(value, tmp_path, {}) == [
        "s3://data",
        5432,
        {"host": "db.internal", "password": "pw"},
    ]
    assert resolve("${{ bucket }}", tmp_path, {"STEPWELL_SECRET_BUCKET": "from-env"}) == "from-env"
    assert lookup("connection.warehouse", tmp_path, {})["host"] == "db.internal"


def test_missing_secret_names_secret_step_and_where(tmp_path: Path) -> None:
    with pytest.raises(SecretError) as info:
        resolve({"k": "${{ secrets.example_key }}"}, tmp_path, {}, step="enrich")
    assert info.value.secret == "example_key"
    assert info.value.step == "enrich"
    assert str(info.value) == (
        "secret 'example_key' used by step 'enrich' is not set (set the environment variable"
        ' STEPWELL_SECRET_EXAMPLE_KEY or add example_key = "..." to'
        f" {tmp_path / '.stepwell' / 'secrets.toml'})"
    )
    with pytest.raises(SecretError, match=r"connection 'crm' used by step 's' is not set"):
        resolve("${{ connection.crm }}", tmp_path, {}, step="s")


def test_connection_cannot_be_embedded_in_text(tmp_path: Path) -> None:
    env = {"STEPWELL_SECRET_CONNECTION_CRM": '{"a": 1}'}
    with pytest.raises(SecretError, match="cannot be inserted into a longer string"):
        resolve("x ${{ connection.crm }}", tmp_path, env)
    with pytest.raises(SecretError, match="is not a JSON object"):
        resolve("${{ connection.crm }}", tmp_path, {"STEPWELL_SECRET_CONNECTION_CRM": "nope"})


def test_loaded_step_secrets_resolve(full_app: Path) -> None:
    app = load_app(full_app)
    step = app.step("enrich")
    env = {"STEPWELL_SECRET_EXAMPLE_KEY": "xyz"}
    assert resolve(step.parameters, app.root, env, step=step.name) == {
        "ingestion_count": 100,
        "api_key": "xyz",
    }


def test_a_node_reading_an_unknown_table_next_to_its_ports_is_warned(tmp_path: Path) -> None:
    (tmp_path / "proc.py").write_text(
        "from patterns import Table\nrows = Table('mesages').read()\nTable('out', 'w').append(rows)\n"
    )
    app_with(tmp_path, "tables: [{name: messages}]\nsteps:\n  - name: proc\n    node: proc.py\n"
                       "    inputs: {messages: messages}\n")
    app = load_app(tmp_path)
    assert app.warnings == [
        f"{tmp_path / 'stepwell.yml'}:4: steps[0].node: proc.py reads Table('mesages'), which is "
        "not a port of the step nor a table of the app; did you mean 'messages'? (a table filled "
        "by `stepwell load` belongs under `tables:`)"
    ]
    (tmp_path / "proc.py").write_text("from patterns import Table\nrows = Table('messages').read()\n")
    assert load_app(tmp_path).warnings == []


class _Garbage:
    """Collected with Python code in its finaliser: the GC running it in the middle
    of a parse lets another thread in."""

    def __del__(self) -> None:
        sum(range(50))


def test_node_code_is_scanned_on_many_threads_at_once() -> None:
    """CPython 3.11's AST constructor counts its depth per interpreter: threads that
    parse at the same moment failed with "SystemError: AST constructor recursion
    depth mismatch" (seen in `stepwell serve` and in a test loading apps on four
    threads). The loader's parsing takes turns (``app.pyparse``)."""
    import threading

    source = Path(__file__).read_text()
    problems: list[str] = []

    def scan() -> None:
        for _ in range(40):
            garbage = [_Garbage() for _ in range(50)]
            for item in garbage:
                item.cycle = item  # left to the GC, which may run mid-parse
            del garbage
            try:
                scan_node_tables(source, {}, {})
            except SystemError as exc:
                problems.append(str(exc))
                return

    threads = [threading.Thread(target=scan) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
