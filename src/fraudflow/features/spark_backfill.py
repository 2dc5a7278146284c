"""The Spark backfill: a transaction log read, validated, featured and written by executors.

``run_on_spark`` (``fraudflow.features.spark``) takes a log the driver already holds; a bank's
history is too large for that. ``backfill_on_spark`` keeps the rows off the driver:

1. check: one task per input file reads and validates it with the library's own rules
   (``fraudflow.data.ingest``: the messages are the Polars engine's, which name the file when
   there are several). The driver learns each file's row count, dtypes and earliest
   timestamp, never its rows. The dtypes are unified as the Polars engine unifies
   them (a relaxed concatenation: an id column that is text in one file is text in all).
2. features: each task reads its file again into Arrow batches (``mapInArrow``), numbered
   with their global input position (files in name order, rows in file order: the arrival
   order of the tie rule). Spark checks that ``transaction_id`` is unique across files, with
   the Polars engine's message, and computes the spec (``features_with_row``).
3. write: with ``shard_days``, the executor holding a shard writes it, with the same name,
   rows, order, dtypes and metadata as ``write_feature_shards``, into a temporary folder that
   the driver renames into place once every shard is written; a failure leaves nothing. A
   single output file is one machine's by definition, but the rows never pass through the
   driver whole: executors write them as range-ordered parts into a temporary folder, and the
   driver appends the parts to the file one at a time (``_write_one``).

Executors must see the input and output paths (a shared file system, as on Kubernetes with a
shared volume) and have fraudflow installed (the container image does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from fraudflow.config import FeatureConfig
from fraudflow.data.ingest import input_files, read_named_file, read_transactions
from fraudflow.data.schema import TIMESTAMP, TRANSACTION_ID
from fraudflow.errors import ConfigError, DataError, FraudflowError
from fraudflow.features.batch import check_categorical, check_input
from fraudflow.features.spark import ROW, features_with_row, spark_session
from fraudflow.features.spec import FeatureSpec
from fraudflow.features.table import write_feature_parts, write_feature_table

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["Backfill", "backfill_on_spark"]

_DAY_US = 86_400 * 1_000_000
_SHARD = "__shard"
_T = "__t_us"
# Rows per part of a single-file output (``_write_one``): an executor holds one part.
_PART_ROWS = 500_000


@dataclass(frozen=True)
class Backfill:
    """What a Spark backfill wrote: rows, files, and the input it read."""

    rows: int
    files: tuple[Path, ...]
    inputs: int


@dataclass(frozen=True)
class _Checked:
    """One input file as the check job saw it (``error`` set: it breaks a rule)."""

    index: int
    rows: int = 0
    schema: pa.Schema | None = None
    first_us: int | None = None
    error: str | None = None


def backfill_on_spark(
    input: str | Path,
    spec: FeatureSpec,
    out: Path,
    *,
    column_map: Mapping[str, str],
    shard_days: int | None,
    master: str,
    conf: Mapping[str, str] | None = None,
) -> Backfill:
    """Read ``input`` (a file, folder or glob), build ``spec``'s features, write ``out``."""
    files = input_files(input)
    cfg = FeatureConfig(label_delay_days=spec.label_delay_days)
    session = spark_session(master, conf)
    try:
        checked = _check_files(session, files, column_map)
        schema = _unified_schema(checked)
        check_input(spec, schema.names)  # before the feature job: a bad spec fails at once
        check_categorical(spec, pl.DataFrame(schema=_polars_schema(schema)).schema)
        frame = _read_files(session, files, checked, schema, column_map)
        if len(files) > 1:
            _check_unique_ids(frame)
        featured = features_with_row(frame, spec)
        dtypes = _output_dtypes(schema, spec)
        written: tuple[Path, ...]
        if shard_days is None:
            rows = sum(c.rows for c in checked)
            written = (_write_one(featured, out, cfg, spec, dtypes, rows),)
        else:
            first_us = min(c.first_us for c in checked if c.first_us is not None)
            written = _write_shards(featured, out, cfg, spec, dtypes, shard_days, first_us)
    finally:
        session.stop()
    return Backfill(rows=sum(c.rows for c in checked), files=written, inputs=len(files))


# ---------------------------------------------------------------- 1. check


def _check_files(
    session: SparkSession, files: Sequence[Path], column_map: Mapping[str, str]
) -> list[_Checked]:
    items = [(index, str(path)) for index, path in enumerate(files)]
    task = partial(_check_one, column_map=dict(column_map), named=len(files) > 1)
    checked = sorted(
        session.sparkContext.parallelize(items, len(items)).map(task).collect(),
        key=lambda c: c.index,
    )
    for c in checked:
        if c.error is not None:
            raise DataError(c.error)
    return checked


def _check_one(item: tuple[int, str], *, column_map: dict[str, str], named: bool) -> _Checked:
    """On an executor: validate one file; its problem comes back as text, not a traceback."""
    index, path = item
    read = read_named_file if named else read_transactions
    try:
        frame = read(Path(path), column_map=column_map)
    except FraudflowError as exc:
        return _Checked(index, error=str(exc))
    first = frame[TIMESTAMP].dt.epoch("us").min() if frame.height else None
    return _Checked(
        index,
        rows=frame.height,
        schema=frame.head(0).to_arrow().schema,
        first_us=None if first is None else int(first),  # type: ignore[arg-type]
    )


def _unified_schema(checked: Sequence[_Checked]) -> pa.Schema:
    """The files' dtypes as the Polars engine's relaxed concatenation makes them."""

    empties = [pl.from_arrow(_known(c.schema).empty_table()) for c in checked]
    try:
        joined = pl.concat(empties, how="vertical_relaxed")  # type: ignore[type-var]
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"the input files do not share their columns: {exc}") from None
    assert isinstance(joined, pl.DataFrame)
    return joined.to_arrow().schema


def _known(schema: pa.Schema | None) -> pa.Schema:
    assert schema is not None  # a file without a schema came back with an error
    return schema


def _polars_schema(schema: pa.Schema) -> dict[str, Any]:

    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return dict(frame.schema)


# ---------------------------------------------------------------- 2. features


def _read_files(
    session: SparkSession,
    files: Sequence[Path],
    checked: Sequence[_Checked],
    schema: pa.Schema,
    column_map: Mapping[str, str],
) -> DataFrame:
    """The whole log as a Spark frame with ``__row``, each file read by an executor."""
    import pyarrow as pa

    offsets = [0]
    for c in checked[:-1]:
        offsets.append(offsets[-1] + c.rows)
    numbered = pa.schema([pa.field(ROW, pa.int64()), *schema])
    # An empty frame of the numbered schema gives Spark's own form of it.
    spark_schema = session.createDataFrame(numbered.empty_table()).schema
    tasks = session.createDataFrame(
        [(i, str(path), offsets[i]) for i, path in enumerate(files)],
        "index INT, path STRING, offset LONG",
    ).repartition(len(files))
    read = partial(_read_batches, schema=numbered, column_map=dict(column_map))
    with _arrow_tasks():
        return tasks.mapInArrow(read, spark_schema)


@contextlib.contextmanager
def _arrow_tasks() -> Iterator[None]:
    """``mapInArrow`` checks the pandas version, which our Arrow-only tasks never use, and
    warns about pandas 3 on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="PySpark does not yet fully support pandas", category=FutureWarning
        )
        yield


def _read_batches(
    batches: Iterator[pa.RecordBatch], *, schema: pa.Schema, column_map: dict[str, str]
) -> Iterator[pa.RecordBatch]:
    """On an executor: the rows of each named file, in the unified dtypes, numbered."""
    for batch in batches:
        for path, offset in zip(
            batch.column("path").to_pylist(), batch.column("offset").to_pylist(), strict=True
        ):
            frame = read_transactions(Path(path), column_map=column_map)
            numbered = frame.with_row_index(ROW, offset=offset).with_columns(
                pl.col(ROW).cast(pl.Int64)
            )
            table = numbered.to_arrow().select(schema.names).cast(schema)
            yield from table.to_batches(max_chunksize=65_536)


def _check_unique_ids(frame: DataFrame) -> None:
    """Across files (each file checked itself): the Polars engine's message, global rows."""
    from pyspark.sql import functions as F

    repeated = (
        frame.groupBy(TRANSACTION_ID)
        .agg(F.count("*").alias("n"), F.array_sort(F.collect_list(ROW)).alias("rows"))
        .where(F.col("n") > 1)
        .cache()
    )
    try:
        n_values = repeated.count()
        if n_values == 0:
            return
        first = repeated.orderBy(F.col("rows")[0]).first()
    finally:
        repeated.unpersist()
    assert first is not None
    found = "1 value appears" if n_values == 1 else f"{n_values} values appear"
    rows = ", ".join(str(r + 1) for r in first["rows"][:5])  # rows count from 1
    raise DataError(
        f"`{TRANSACTION_ID}` must be unique, however: {found} more than once "
        f"(first: {TRANSACTION_ID}={first[TRANSACTION_ID]!r} at rows {rows})"
    )


def _output_dtypes(schema: pa.Schema, spec: FeatureSpec) -> dict[str, Any]:
    """The Polars engine's output dtypes: the input's, and Float64 for every feature."""
    dtypes = _polars_schema(schema)
    return dtypes | {name: pl.Float64 for name in spec.feature_names if name not in dtypes}


# ---------------------------------------------------------------- 3. write


def _write_one(
    featured: DataFrame,
    out: Path,
    cfg: FeatureConfig,
    spec: FeatureSpec,
    dtypes: dict[str, Any],
    rows: int,
) -> Path:
    """One output file. Collecting the table on the driver (``toArrow``) killed its JVM on
    4 million rows with the default 4 GiB: executors write range partitions of the ordered
    rows as parts instead, and the driver streams them into ``out`` in partition order."""
    from pyspark.sql import functions as F

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ordered = featured.repartitionByRange(max(1, -(-rows // _PART_ROWS)), F.col(_T), F.col(ROW))
        write = partial(_write_range_part, folder=str(tmp), dtypes=dtypes)
        with _arrow_tasks():
            ordered.sortWithinPartitions(_T, ROW).mapInArrow(write, "part LONG").collect()
        parts = sorted(tmp.glob("part-*.parquet"))  # zero-padded partition ids: range order
        written = write_feature_parts(parts, out, cfg, schema=dtypes, spec=spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if written != rows:
        raise DataError(f"the Spark job wrote {written:,} of {rows:,} rows")
    return out


def _partition_rows(batches: Iterator[pa.RecordBatch]) -> pl.DataFrame | None:
    """On an executor: the partition's rows as one frame, None when it has none."""
    frames = [pl.from_arrow(b) for b in batches if b.num_rows]
    if not frames:
        return None
    rows = pl.concat(frames)  # type: ignore[type-var]
    assert isinstance(rows, pl.DataFrame)
    return rows


def _write_range_part(
    batches: Iterator[pa.RecordBatch], *, folder: str, dtypes: dict[str, Any]
) -> Iterator[pa.RecordBatch]:
    """On an executor: this partition's rows (in order) as one part file named by its id."""
    import pyarrow as pa
    from pyspark import TaskContext

    rows = _partition_rows(batches)
    if rows is None:
        return
    context = TaskContext.get()
    assert context is not None  # mapInArrow runs its function in a task
    part = context.partitionId()
    _finished(rows, dtypes).write_parquet(Path(folder) / f"part-{part:06d}.parquet")
    yield pa.RecordBatch.from_pydict({"part": [part]})


def _finished(frame: pl.DataFrame, dtypes: dict[str, Any]) -> pl.DataFrame:
    return frame.select(pl.col(name).cast(dtype) for name, dtype in dtypes.items())


def _write_shards(
    featured: DataFrame,
    folder: Path,
    cfg: FeatureConfig,
    spec: FeatureSpec,
    dtypes: dict[str, Any],
    shard_days: int,
    first_us: int,
) -> tuple[Path, ...]:
    """``write_feature_shards`` done by the executors: shard k holds days [k*n, (k+1)*n) from
    the first transaction, files numbered by the rank of the non-empty shards."""
    from pyspark.sql import functions as F

    if shard_days < 1:
        raise ConfigError(f"--shard-days must be >= 1, however got {shard_days}")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"shard folder {folder} already exists and is not empty")
    days = (F.col(_T) - F.lit(first_us)) / F.lit(_DAY_US * shard_days)
    sharded = featured.withColumn(_SHARD, F.floor(days).cast("long")).cache()
    try:
        present = sorted(r[0] for r in sharded.select(_SHARD).distinct().collect())
        ranks = {shard: rank for rank, shard in enumerate(present)}
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            write = partial(
                _write_partition, folder=str(tmp), ranks=ranks, cfg=cfg, spec=spec, dtypes=dtypes
            )
            with _arrow_tasks():
                ordered = sharded.repartition(len(present), _SHARD)
                ordered = ordered.sortWithinPartitions(_SHARD, _T, ROW)
                parts = ordered.mapInArrow(write, "shard LONG, rows LONG").collect()
            if sorted(r["shard"] for r in parts) != present:
                raise DataError(f"the Spark job wrote {len(parts)} of {len(present)} shards")
            if folder.exists():
                folder.rmdir()
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        sharded.unpersist()
    return tuple(sorted(folder.glob("*.parquet")))


def _write_partition(
    batches: Iterator[pa.RecordBatch],
    *,
    folder: str,
    ranks: dict[int, int],
    cfg: FeatureConfig,
    spec: FeatureSpec,
    dtypes: dict[str, Any],
) -> Iterator[pa.RecordBatch]:
    """On an executor: write each shard of this partition (its rows arrive in order)."""
    import pyarrow as pa

    rows = _partition_rows(batches)
    if rows is None:
        return
    for part in rows.partition_by(_SHARD, maintain_order=True):
        shard = int(part[_SHARD][0])
        path = Path(folder) / f"part-{ranks[shard]:05d}.parquet"
        write_feature_table(_finished(part, dtypes), path, cfg, spec=spec)
        yield pa.RecordBatch.from_pydict({"shard": [shard], "rows": [part.height]})
