"""Compacted audit shards: a closed shard's decisions and labels as Parquet (zstd).

``fraudflow.serve.audit`` decides when a shard is compacted and converts its SQLite tables;
this module is the file format, written and read. Shard N of the log ``audit.db`` (N = 0 is
``audit.db`` itself) becomes:

    audit.N.parquet          one row per recorded decision, sorted by transaction_id, in row
                             groups of ``ROW_GROUP_ROWS`` with min/max statistics: a lookup
                             reads the footer once (cached), then one row group's ids and
                             responses
    audit.N.labels.parquet   the shard's labels table, row for row
    audit.N.shadow.parquet   the shard's challenger verdicts recorded after their decisions
                             (``ShadowRecord``: one row each, in recording order); only when
                             it holds any

The decisions file's columns: ``transaction_id``, every field the shard's groups recorded (the
JSON lists of ``decision_groups.fields``, whatever their names: a field whose values are
objects, such as ``extra``, is kept as JSON text and named in the metadata), ``group_seq``
and ``position`` (where the decision was in the shard: its recording order), ``features``
(the packed float64 values, as the shard held them) and ``response`` (the exact body sent).
The metadata key ``fraudflow.audit`` holds a JSON object: ``format``, ``json_fields``,
``feature_sets`` (model version -> feature names), ``decisions``, ``labels``,
``max_group_seq``, ``max_label_seq``, ``shadow_verdicts`` (how many; absent in files
written before shadow verdicts were recorded apart) and ``source`` (the SQLite file's path
and inode: the review console's history follower keeps its cursor under them).

Atomic by renames: the labels file (and the shadow file) is written (temporary file, fsync,
rename) before the decisions file, and the decisions file is the commit point. Readers take a
shard's SQLite file while it exists and its Parquet files only once it is gone, so a
compaction stopped at any step leaves every decision readable exactly once.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fraudflow.errors import ConfigError
from fraudflow.files import atomic_path

__all__ = [
    "FORMAT_VERSION",
    "ROW_GROUP_ROWS",
    "CompactedShard",
    "compacted_paths",
    "open_compacted",
    "shadow_path",
    "write_compacted",
]

FORMAT_VERSION = 1
_META_KEY = b"fraudflow.audit"
# Small row groups keep a lookup's read (one group's responses, decompressed) short; each
# group adds its statistics to the footer, a small cost per decision (benchmarks/state_scale.py
# measures both).
ROW_GROUP_ROWS = 1024
# Written once per shard and kept for years, so above zstd's default (3) for smaller files;
# higher levels cost much more CPU in the service's background for little less size
# (decompression speed does not depend on it). Measured by benchmarks/state_scale.py.
_ZSTD_LEVEL = 6
_NOT_FIELDS = ("group_seq", "position", "features", "response")


def compacted_paths(log: Path, number: int) -> tuple[Path, Path]:
    """Shard ``number``'s compacted decisions and labels files, for the log named ``log``."""
    return (
        log.with_name(f"{log.stem}.{number}.parquet"),
        log.with_name(f"{log.stem}.{number}.labels.parquet"),
    )


def shadow_path(decisions_path: Path) -> Path:
    """The compacted shadow verdicts file beside a compacted decisions file."""
    return decisions_path.with_name(
        decisions_path.name.removesuffix(".parquet") + ".shadow.parquet"
    )


def write_compacted(
    decisions: Iterable[pa.Table],
    labels: pa.Table,
    *,
    schema: pa.Schema,
    metadata: Mapping[str, Any],
    paths: tuple[Path, Path],
    step: Callable[[str], None],
    shadow: pa.Table | None = None,
) -> None:
    """Write a shard's labels, its shadow verdicts (if any), then its decisions
    (``decisions``: tables of ``schema``, each sorted by transaction_id and each after the one
    before), each atomically. ``step`` is called after each rename (a test stops there)."""
    decisions_path, labels_path = paths
    with atomic_path(labels_path) as tmp:
        pq.write_table(labels, tmp, compression="zstd", compression_level=_ZSTD_LEVEL)
    step("labels-renamed")
    if shadow is not None and shadow.num_rows:
        with atomic_path(shadow_path(decisions_path)) as tmp:
            pq.write_table(shadow, tmp, compression="zstd", compression_level=_ZSTD_LEVEL)
        step("shadow-renamed")
    raw = {_META_KEY: orjson.dumps({"format": FORMAT_VERSION, **metadata})}
    with (
        atomic_path(decisions_path) as tmp,
        pq.ParquetWriter(
            tmp, schema.with_metadata(raw), compression="zstd", compression_level=_ZSTD_LEVEL
        ) as writer,
    ):
        for table in decisions:
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    step("decisions-renamed")


def open_compacted(decisions_path: Path) -> CompactedShard:
    """The compacted shard at ``decisions_path``, its footer read once per file version."""
    try:
        stat = os.stat(decisions_path)
    except FileNotFoundError:
        raise ConfigError(f"compacted audit shard {decisions_path} does not exist") from None
    return _open_cached(str(decisions_path), stat.st_ino, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _open_cached(path: str, inode: int, mtime_ns: int) -> CompactedShard:
    return CompactedShard(Path(path))


class CompactedShard:
    """One compacted shard, read: lookups by transaction_id, its decisions and its labels."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.labels_path = path.with_name(path.name.removesuffix(".parquet") + ".labels.parquet")
        self._lock = threading.Lock()  # one reader of the file at a time
        with _readable(path):
            self._file = pq.ParquetFile(path)
            raw = (self._file.schema_arrow.metadata or {}).get(_META_KEY)
            if raw is None:
                raise ValueError("it has no fraudflow.audit metadata")
            self.metadata: dict[str, Any] = orjson.loads(raw)
            self._bounds = _id_bounds(self._file)
        self._check_labels()

    def lookup(self, transaction_id: str) -> bytes | None:
        """The response recorded for ``transaction_id``, or None."""
        lows, highs = self._bounds
        group = bisect.bisect_left(highs, transaction_id)
        if group == len(highs) or lows[group] > transaction_id:
            return None
        with self._lock, _readable(self.path):  # one small read: no thread pool
            ids = self._file.read_row_group(group, ["transaction_id"], use_threads=False)[0]
            at = pc.index(ids, transaction_id).as_py()
            if at < 0:
                return None
            responses = self._file.read_row_group(group, ["response"], use_threads=False)[0]
        return bytes(responses[at].as_py())

    def rows(self) -> int:
        """How many decisions the shard holds."""
        return int(self._file.metadata.num_rows)

    def decisions(self) -> pa.Table:
        """Every decision, in the shard's recording order."""
        with self._lock, _readable(self.path):
            table = self._file.read()
        return table.sort_by([("group_seq", "ascending"), ("position", "ascending")])

    def labels(self) -> pa.Table:
        self._check_labels()
        with _readable(self.labels_path):
            return pq.read_table(self.labels_path)

    def shadow(self) -> pa.Table | None:
        """The shadow verdicts recorded in the shard after their decisions; None: none."""
        if not self.metadata.get("shadow_verdicts"):
            return None
        path = shadow_path(self.path)
        if not path.is_file():  # written before the decisions file: lost since
            raise ConfigError(
                f"compacted audit shard {self.path} is incomplete: {path} is missing; "
                "restore it from a backup"
            )
        with _readable(path):
            return pq.read_table(path)

    def _check_labels(self) -> None:
        if not self.labels_path.is_file():  # written before the decisions file: lost since
            raise ConfigError(
                f"compacted audit shard {self.path} is incomplete: {self.labels_path} is "
                "missing; restore it from a backup"
            )

    def fields(self) -> list[str]:
        """The recorded decision fields (transaction_id among them): not the order, not the
        two blobs."""
        return [n for n in self._file.schema_arrow.names if n not in _NOT_FIELDS]


def _id_bounds(file: pq.ParquetFile) -> tuple[list[str], list[str]]:
    """Each row group's smallest and largest transaction_id (they are sorted across groups)."""
    column = file.schema_arrow.get_field_index("transaction_id")
    lows, highs = [], []
    for group in range(file.metadata.num_row_groups):
        stats = file.metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            raise ValueError(f"row group {group} has no transaction_id statistics")
        lows.append(str(stats.min))
        highs.append(str(stats.max))
    return lows, highs


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turns a damaged or truncated file into a one-line ConfigError naming it."""
    try:
        yield
    except ConfigError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ConfigError(
            f"compacted audit shard {path} cannot be read: {exc}; restore it from a backup "
            "(its SQLite shard was dropped once it had been written)"
        ) from None
