"""Turning what a read function returns into a stream of Arrow tables.

Runs inside the worker. ``read_bytes`` output is parsed as it arrives: CSV
and JSON lines through pyarrow's streaming readers fed from the generator (so
a partition never has to fit in memory); Parquet, which needs its footer, is
first spilled to a file in the worker's private temp dir and then read one
row group batch at a time. DataFrames (pandas, Spark) and Arrow results are
converted and cut into slices of at most :data:`MAX_CHUNK_ROWS` rows.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa

from stepwell.runtimes.connector.contract import ConnectorError

#: Largest number of rows sent to the host in one frame.
MAX_CHUNK_ROWS = 65_536
#: Bytes pyarrow's streaming CSV / JSON readers parse at a time.
BLOCK_SIZE = 1 << 19


class ChunkStream(io.RawIOBase):
    """A read-only, unseekable file over an iterable of ``bytes`` chunks; it pulls
    chunks only as the reader asks for bytes."""

    def __init__(self, chunks: Iterable[Any], what: str):
        self._chunks = iter(chunks)
        self._what = what
        self._pending = memoryview(b"")
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        for chunk in self._chunks:
            if isinstance(chunk, str):
                chunk = chunk.encode()
            elif not isinstance(chunk, bytes | bytearray | memoryview):
                raise ConnectorError(
                    f"{self._what} yielded a {type(chunk).__name__}; read_bytes must yield bytes"
                )
            if len(chunk):
                self._pending = memoryview(chunk).cast("B")
                return True
        return False

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` as far as the chunks go: a short read means the end
        (pyarrow's readers take it so)."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not len(self._pending) and not self._next_chunk():
                break
            n = min(len(view) - filled, len(self._pending))
            view[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        self.bytes_read += filled
        return filled


def slices(data: pa.Table | pa.RecordBatch) -> Iterator[pa.Table | pa.RecordBatch]:
    """``data`` cut into pieces of at most :data:`MAX_CHUNK_ROWS` rows."""
    if data.num_rows <= MAX_CHUNK_ROWS:
        yield data
        return
    for offset in range(0, data.num_rows, MAX_CHUNK_ROWS):
        yield data.slice(offset, MAX_CHUNK_ROWS)


def parse_bytes(
    chunks: Iterable[Any],
    parser: str,
    schema: pa.Schema | None,
    *,
    what: str = "read_bytes",
    tmpdir: str | None = None,
) -> Iterator[pa.RecordBatch]:
    """Parse a stream of bytes as ``csv``, ``jsonl`` or ``parquet`` into batches.

    ``schema`` (from ``infer_schema``) fixes the column types of CSV and JSON
    instead of inferring them from the first block."""
    if isinstance(chunks, bytes | bytearray | str):
        chunks = [chunks]
    stream = ChunkStream(chunks, what)
    if parser == "csv":
        yield from _parse_csv(stream, schema)
    elif parser == "jsonl":
        yield from _parse_jsonl(stream, schema)
    elif parser == "parquet":
        yield from _parse_parquet(stream, tmpdir)
    else:
        raise ConnectorError(f"unknown parser {parser!r}: use csv, jsonl or parquet")


def _parse_csv(stream: ChunkStream, schema: pa.Schema | None) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pacsv

    convert = pacsv.ConvertOptions(
        column_types={f.name: f.type for f in schema} if schema is not None else None
    )
    try:
        reader = pacsv.open_csv(
            stream, read_options=pacsv.ReadOptions(block_size=BLOCK_SIZE), convert_options=convert
        )
    except pa.ArrowInvalid as exc:
        if stream.bytes_read == 0 or "Empty CSV file" in str(exc):
            return  # nothing to parse: an empty partition
        raise
    yield from reader


def _parse_jsonl(stream: ChunkStream, schema: pa.Schema | None) -> Iterator[pa.RecordBatch]:
    import pyarrow.json as pajson

    parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
    try:
        reader = pajson.open_json(
            stream, read_options=pajson.ReadOptions(block_size=BLOCK_SIZE), parse_options=parse
        )
    except pa.ArrowInvalid as exc:
        if stream.bytes_read == 0 or "Empty JSON" in str(exc):
            return
        raise
    yield from reader


def _parse_parquet(stream: ChunkStream, tmpdir: str | None) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    fd, path = tempfile.mkstemp(prefix="partition-", suffix=".parquet", dir=tmpdir)
    try:
        with os.fdopen(fd, "wb") as out:
            while block := stream.read(BLOCK_SIZE):
                out.write(block)
        if os.path.getsize(path) == 0:
            return
        parquet = pq.ParquetFile(path)
        try:
            yield from parquet.iter_batches(batch_size=MAX_CHUNK_ROWS)
        finally:
            parquet.close()
    finally:
        os.unlink(path)


def from_pandas(result: Any, what: str) -> Iterator[pa.Table]:
    """A pandas DataFrame (or an iterable of them) as Arrow tables."""
    import pandas as pd

    if isinstance(result, pa.Table | pa.RecordBatch):
        yield from slices(result)
        return
    frames = [result] if isinstance(result, pd.DataFrame) else _iterable(result, what, "DataFrame")
    for frame in frames:
        if isinstance(frame, pa.Table | pa.RecordBatch):
            yield from slices(frame)
            continue
        if not isinstance(frame, pd.DataFrame):
            got = (f"a {type(result).__name__} of {type(frame).__name__}"
                   if frame is not result else f"a {type(frame).__name__}")  # fmt: skip
            raise ConnectorError(
                f"{what} returned {got}; return a pandas DataFrame (or yield DataFrames), "
                f"e.g. pd.DataFrame(rows) for a list of dicts"
            )
        yield from slices(_frame_to_arrow(frame, what))


def _frame_to_arrow(frame: Any, what: str) -> pa.Table:
    """``frame`` as Arrow; a column Arrow cannot type as a whole is named, with what to do."""
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        for column in frame.columns:
            try:
                pa.array(frame[column], from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as found:
                kinds = sorted({type(v).__name__ for v in frame[column] if v is not None})
                raise ConnectorError(
                    f"{what}: column {column!r} cannot be stored: it mixes "
                    f"{', '.join(kinds)} values ({str(found).splitlines()[0]}); give it one "
                    f"type, e.g. df[{str(column)!r}] = df[{str(column)!r}].astype(str)"
                ) from None
        raise ConnectorError(f"{what}: the DataFrame cannot be stored: {exc}") from None


def from_spark(result: Any, what: str) -> Iterator[pa.Table]:
    """A Spark DataFrame as Arrow tables (collected to the worker)."""
    if not (hasattr(result, "toPandas") and hasattr(result, "schema")):
        raise ConnectorError(f"{what} returned a {type(result).__name__}; return a Spark DataFrame")
    to_arrow = getattr(result, "toArrow", None)  # PySpark >= 4
    table = to_arrow() if to_arrow is not None else pa.Table.from_pandas(
        result.toPandas(), preserve_index=False
    )
    yield from slices(table)


def from_arrow(result: Any, what: str) -> Iterator[pa.Table | pa.RecordBatch]:
    """An Arrow table, record batch, batch reader or iterable of those."""
    if isinstance(result, pa.Table | pa.RecordBatch):
        yield from slices(result)
        return
    for item in _iterable(result, what, "pyarrow Table"):
        if isinstance(item, pa.Table | pa.RecordBatch):
            yield from slices(item)
        else:
            raise ConnectorError(
                f"{what} produced a {type(item).__name__}; read_arrow must return a pyarrow "
                "Table, or yield pyarrow Tables or RecordBatches"
            )


def _iterable(result: Any, what: str, expected: str) -> Iterable[Any]:
    if result is None or isinstance(result, str | bytes | Mapping):
        raise ConnectorError(f"{what} returned {type(result).__name__}; return a {expected}")
    try:
        return iter(result)
    except TypeError:
        raise ConnectorError(
            f"{what} returned a {type(result).__name__}; return a {expected}"
        ) from None


def read_partition(
    kind: str,
    read: Callable[..., Any],
    context: Any,
    metadata: dict[str, Any],
    *,
    parser: str | None,
    schema: pa.Schema | None,
    spark: Callable[[], Any],
    tmpdir: str | None = None,
) -> Iterator[pa.Table | pa.RecordBatch]:
    """Call the read function for one partition and stream its rows as Arrow."""
    what = f"{kind} (partition {metadata.get('name')!r})"
    if kind == "read_bytes":
        if parser is None:
            raise ConnectorError("read_bytes needs the step's `parser:` (csv, jsonl or parquet)")
        try:
            yield from parse_bytes(
                read(context, metadata), parser, schema, what=what, tmpdir=tmpdir
            )
        except pa.ArrowException as exc:
            raise ConnectorError(f"partition {metadata.get('name')!r}: {parser}: {exc}") from exc
    elif kind == "read_pandas_dataframe":
        yield from from_pandas(read(context, metadata), what)
    elif kind == "read_spark_dataframe":
        yield from from_spark(read(spark(), context, metadata), what)
    elif kind == "read_arrow":
        yield from from_arrow(read(context, metadata), what)
    else:
        raise ConnectorError(f"unknown read function {kind!r}")


class LocalSpark:
    """A local SparkSession made on first use and stopped at the end."""

    def __init__(self) -> None:
        self.session: Any = None

    def __call__(self) -> Any:
        if self.session is None:
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            try:
                from pyspark.sql import SparkSession
            except ImportError:
                raise ConnectorError(
                    "read_spark_dataframe needs PySpark and a Java runtime: install stepwell "
                    "with its `spark` extra (pip install 'stepwell[spark]') or list pyspark in "
                    "the app's requirements file"
                ) from None
            self.session = (
                SparkSession.builder.master("local[1]")
                .appName("stepwell-connector")
                .config("spark.ui.enabled", "false")
                .config("spark.sql.shuffle.partitions", "1")
                .config("spark.driver.host", "127.0.0.1")
                .config("spark.driver.bindAddress", "127.0.0.1")
                .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                .getOrCreate()
            )
            self.session.sparkContext.setLogLevel("ERROR")
        return self.session

    def stop(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.stop()
