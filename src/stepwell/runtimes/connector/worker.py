"""Worker-side entry points of a connector run.

``list_entry`` loads the connector file, calls ``context`` and walks
``list_objects``; it sends the leaves to the host in batches (``partitions``),
then what the host needs to know about the connector (``listed``: its read
function and the schema from ``infer_schema``), then ``done``.

``read_entry`` loads the connector, calls ``context`` once, then asks the host
for partitions (``next_partition``) until there are none left. For each one it
streams the rows as Arrow batches (``write``, not answered) and ends it with
``partition_done`` (the host commits it) or, when the read function raised,
``partition_failed``.

The credentials in the ``start`` frame are taken out of it before any user
code runs and handed to ``context`` only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from stepwell.runtimes.connector.contract import (
    ConnectorError,
    ConnectorFunctions,
    call_infer_schema,
    find_functions,
    to_arrow_schema,
    walk_listing,
)
from stepwell.runtimes.connector.readers import LocalSpark, read_partition
from stepwell.sandbox.client import HostLink, capture_descriptor_output
from stepwell.sandbox.protocol import pack
from stepwell.sandbox.worker import error_summary, user_traceback

LIST_ENTRY = "stepwell.runtimes.connector.worker:list_entry"
READ_ENTRY = "stepwell.runtimes.connector.worker:read_entry"
#: Leaves sent to the host per ``partitions`` request.
LEAF_BATCH = 2000


def _load(start: dict[str, Any]) -> ConnectorFunctions:
    from stepwell.runtimes.node.shipped_code import use_shipped_code
    from stepwell.runtimes.node.worker import _mount_app, run_module

    app_root = Path(start["app_root"])
    use_shipped_code(start.get("code"), start["app_root"])
    _mount_app(app_root)
    module = run_module(app_root, start["file"])
    return find_functions(vars(module), start["file"])


def _flush_output() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


def _send_leaves(
    link: HostLink, leaves: list[dict[str, Any]], parents: list[str | None],
    prefixes: list[dict[str, Any]],
) -> None:  # fmt: skip
    """Hand a batch of the listing to the host: leaves (their metadata as the user
    yielded it), the prefix each was listed under, and the prefixes met meanwhile."""
    try:
        pack({"leaves": leaves})
    except (TypeError, ValueError, OverflowError):
        for leaf in leaves:
            try:
                pack(leaf)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ConnectorError(
                    f"object {leaf.get('name')!r}: its metadata cannot be handed to the read "
                    f"function ({exc}); use strings, numbers, booleans, None, lists, dicts, "
                    "dates and datetimes"
                ) from None
        raise
    link.call("partitions", leaves=leaves, parents=parents, prefixes=prefixes)


def list_entry(link: HostLink, start: dict[str, Any]) -> None:
    """List the connector's partitions and hand them to the host."""
    capture_descriptor_output(link)
    credentials = start.pop("credentials", None)
    functions = _load(start)
    if functions.read_name == "read_bytes" and not start.get("parser"):
        raise ConnectorError(
            f"connector {start['file']} reads with read_bytes: set the step's `parser:` to "
            "csv, jsonl or parquet"
        )
    context = functions.context(credentials)
    del credentials
    batch: list[dict[str, Any]] = []
    parents: list[str | None] = []
    prefixes: list[dict[str, Any]] = []
    count = 0
    # prefixes whose subtree the host has read in full at these fingerprints
    skip = start.get("skip_prefixes") or {}
    for item in walk_listing(functions.list_objects, context, skip):
        if item.kind == "leaf":
            batch.append(item.obj)
            parents.append(item.parent)
            count += 1
        else:
            prefixes.append({
                "name": item.obj["name"], "fingerprint": item.obj.get("fingerprint"),
                "parent": item.parent, "skipped": item.kind == "skipped",
            })  # fmt: skip
        if len(batch) + len(prefixes) >= LEAF_BATCH:
            _send_leaves(link, batch, parents, prefixes)
            batch, parents, prefixes = [], [], []
    if batch or prefixes:
        _send_leaves(link, batch, parents, prefixes)
    body = b""
    spark = LocalSpark()
    try:
        if functions.infer_schema is not None:
            schema = to_arrow_schema(call_infer_schema(functions.infer_schema, context, spark))
            body = schema.serialize().to_pybytes()
    finally:
        spark.stop()
    _flush_output()
    link.call("listed", body, read_function=functions.read_name, leaves=count)
    link.notify("done", status="ok")


def read_entry(link: HostLink, start: dict[str, Any]) -> None:
    """Read the partitions the host hands out, one after the other."""
    import pyarrow as pa

    capture_descriptor_output(link)
    credentials = start.pop("credentials", None)
    functions = _load(start)
    context = functions.context(credentials)
    del credentials
    schema_bytes = start.get("schema")
    schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes)) if schema_bytes else None
    app_root = start.get("app_root")
    spark = LocalSpark()
    try:
        while True:
            reply, _ = link.call("next_partition")
            metadata = reply.get("partition")
            if metadata is None:
                break
            name = metadata["name"]
            rows = 0
            try:
                for piece in read_partition(
                    functions.read_name,
                    functions.read,
                    context,
                    metadata,
                    parser=start.get("parser"),
                    schema=schema,
                    spark=spark,
                ):
                    if piece.num_rows:
                        link.notify("write", piece, partition=name)
                        rows += piece.num_rows
            except Exception as exc:  # the partition failed; the host decides what next
                _flush_output()
                link.call(
                    "partition_failed",
                    partition=name,
                    error=error_summary(exc, app_root),
                    traceback=user_traceback(exc, app_root),
                )
                continue
            _flush_output()
            link.call("partition_done", partition=name, rows=rows)
    finally:
        spark.stop()
    _flush_output()
    link.notify("done", status="ok")
