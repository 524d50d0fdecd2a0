"""App files: load ``stepwell.yml`` or a Patterns ``graph.yml`` into typed models.

>>> from stepwell.app import load_app
>>> app = load_app("examples/quickstart")          # doctest: +SKIP
>>> [step.name for step in app.upstream_order()]   # doctest: +SKIP
"""

from stepwell.app.loader import (
    APP_FILE_NAMES,
    SqlTables,
    load_app,
    scan_node_tables,
    scan_sql_tables,
)
from stepwell.app.models import (
    LOGICAL_TYPES,
    ActionSpec,
    AppError,
    AppFile,
    AppSpec,
    CommonModelSchema,
    Limits,
    SchemaField,
    SchemaSpec,
    StepKind,
    StepSpec,
    TableSpec,
    WebhookSpec,
    logical_type,
    parse_duration,
    parse_memory,
)
from stepwell.app.secrets import SecretError, find_secret_refs, lookup, resolve

__all__ = [
    "APP_FILE_NAMES",
    "LOGICAL_TYPES",
    "ActionSpec",
    "AppError",
    "AppFile",
    "AppSpec",
    "CommonModelSchema",
    "Limits",
    "SchemaField",
    "SchemaSpec",
    "SecretError",
    "SqlTables",
    "StepKind",
    "StepSpec",
    "TableSpec",
    "WebhookSpec",
    "find_secret_refs",
    "load_app",
    "logical_type",
    "lookup",
    "parse_duration",
    "parse_memory",
    "resolve",
    "scan_node_tables",
    "scan_sql_tables",
]
