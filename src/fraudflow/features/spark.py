"""The Spark engine: a feature spec (``fraudflow.features.spec``) executed with PySpark.

The same spec, the same values as the Polars engine (``fraudflow.features.batch``), for logs
one machine cannot hold. Every aggregate is a window function over the rows of its key:

* a duration w ending at the row: the rows with time in (t - w, t) (a range frame over the
  integer microsecond time, ``rangeBetween(-(w - 1), -1)``) plus the rows of the row's own
  timestamp up to itself (a frame over (key, time) in arrival order). Split so, equal
  timestamps follow the tie rule: earlier input rows and the row itself, never later ones,
  which a plain range frame (every row of time t) would break;
* delayed (label delay d): the range frame ``rangeBetween(-(d + w - 1), -d)``, rows with time
  in (t - d - w, t - d]: no tie question, all are strictly earlier;
* the last N events: a row frame over (time, arrival) of the N rows ending at the row.

Sums, counts, means, the std (from sums of squares about the key's first value, as batch),
min / max (least / greatest of the two frames), distinct counts (the union of the two frames'
sets) and the time since the previous matching row are plain window aggregates. ``fraud_*``
read ``is_fraud`` in delayed windows only, so labels count once they are known.

Shape: the input is a Spark DataFrame with the canonical columns, any extra columns the spec
reads, and ``__row``, the input position (arrival order); the output adds the features.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fraudflow.data.schema import IS_FRAUD, TIMESTAMP
from fraudflow.errors import ConfigError
from fraudflow.features.expressions import (
    CALENDAR,
    NIGHT_END_HOUR,
    Binary,
    Call,
    Compare,
    Expr,
    Literal,
    Logical,
    Name,
    Not,
)
from fraudflow.features.spec import UNIT_SECONDS, Aggregate, FeatureSpec, Window

if TYPE_CHECKING:
    import polars as pl
    from pyspark.sql import Column, DataFrame

__all__ = [
    "ROW",
    "T_US",
    "build_features_spark",
    "features_with_row",
    "run_on_spark",
    "spark_session",
]

ROW = "__row"  # the input position: arrival order within equal timestamps
T_US = _T = "__t_us"  # the timestamp in integer microseconds
_US = 1_000_000


def build_features_spark(transactions: DataFrame, spec: FeatureSpec) -> DataFrame:
    """``transactions`` (with ``__row``) with the spec's features, in (time, arrival) order."""
    return features_with_row(transactions, spec).orderBy(_T, ROW).drop(ROW, _T)


def features_with_row(transactions: DataFrame, spec: FeatureSpec) -> DataFrame:
    """``build_features_spark`` unordered, keeping ``__row`` and ``__t_us`` (the order's keys)
    for a caller that orders within partitions only (``fraudflow.features.spark_backfill``)."""
    from pyspark.sql import functions as F

    columns = [c for c in transactions.columns if c != ROW]
    frame = transactions.withColumn(_T, F.unix_micros(F.col(TIMESTAMP)))
    inputs: dict[str, Column] = {}
    for index, a in enumerate(spec.aggregates):
        inputs |= _inputs(index, a)
    frame = frame.select("*", *[expr.alias(name) for name, expr in inputs.items()])
    delay_us = spec.label_delay_seconds * _US
    above = {
        f"__a{index}": _above(index, a, delay_us)
        for index, a in enumerate(spec.aggregates)
        if a.fn == "count_above"
    }
    frame = frame.select("*", *[expr.alias(name) for name, expr in above.items()])
    features: dict[str, Column] = {}
    joined = []
    for index, a in enumerate(spec.aggregates):
        for window in a.windows:
            if a.delayed and window.events is not None:
                joined.append((index, a, window))
            else:
                frames = _Frames(a, window, delay_us)
                features[a.feature_name(window)] = _feature(index, a, frames)
    frame = frame.select("*", *[expr.alias(name) for name, expr in features.items()])
    for index, a, window in joined:
        frame = frame.join(_delayed_last(frame, index, a, window, delay_us), on=ROW, how="left")
    for derive in spec.derive_order():
        frame = frame.withColumn(derive.name, _numeric(_column(derive.tree)))
    kept = [name for name in spec.feature_names if name not in columns]
    return frame.select(ROW, _T, *columns, *kept)


def _above(index: int, a: Aggregate, delay_us: int) -> Column:
    """count_above's verdict per row (1 or 0): the row passes and its value is above k times
    the mean over the rows of the typical window before it (the frames without the row)."""
    from pyspark.sql import functions as F

    assert a.k is not None and a.typical is not None, "count_above has both (spec checks)"
    mask, value = F.col(f"__m{index}"), F.col(f"__v{index}")
    before = _Frames(a, a.typical, delay_us).before
    count = _sum_frames([F.sum(mask.cast("long")).over(frame) for frame in before])
    total = _sum_frames([F.sum(F.when(mask, value).otherwise(0.0)).over(f) for f in before])
    above = mask & (count > 0) & (value > F.lit(float(a.k)) * (total / count.cast("double")))
    return F.coalesce(above, F.lit(False)).cast("long")


def _sum_frames(parts: list[Column]) -> Column:
    """The sum of the frames' sums, an empty frame's (null) as 0."""
    from functools import reduce

    from pyspark.sql import functions as F

    return reduce(lambda x, y: x + y, [F.coalesce(p, F.lit(0)) for p in parts])


def _inputs(index: int, a: Aggregate) -> dict[str, Column]:
    """The aggregate's filter, value and reference columns, on the input rows."""
    from pyspark.sql import Window as W
    from pyspark.sql import functions as F

    where = a.where_expr
    passes = F.lit(True) if where is None else F.coalesce(_boolean(_column(where)), F.lit(False))
    out: dict[str, Column] = {}
    if a.of is not None:
        passes = passes & F.col(a.of).isNotNull()
        value = F.col(a.of) if a.fn == "count_distinct" else F.col(a.of).cast("double")
        out[f"__v{index}"] = value
        if a.fn == "std":
            whole = W.partitionBy(*a.by).orderBy(_T, ROW)
            whole = whole.rowsBetween(W.unboundedPreceding, W.unboundedFollowing)
            reference = F.first(F.col(a.of).cast("double"), ignorenulls=True).over(whole)
            out[f"__r{index}"] = reference
    out[f"__m{index}"] = passes
    return out


class _Frames:
    """The window frames of one aggregate window (see the module docstring)."""

    def __init__(self, a: Aggregate, window: Window, delay_us: int) -> None:
        from pyspark.sql import Window as W

        by = list(a.by)
        if a.delayed:
            span = (window.seconds or 0) * _US
            self.parts = [
                W.partitionBy(*by).orderBy(_T).rangeBetween(-(delay_us + span - 1), -delay_us)
            ]
            self.before = self.parts
        elif window.events is not None:
            ordered = W.partitionBy(*by).orderBy(_T, ROW)
            self.parts = [ordered.rowsBetween(-(window.events - 1), 0)]
            self.before = [ordered.rowsBetween(-(window.events - 1), -1)]
        else:
            span = (window.seconds or 0) * _US
            earlier = W.partitionBy(*by).orderBy(_T).rangeBetween(-(span - 1), -1)
            ties = W.partitionBy(*by, _T).orderBy(ROW)
            self.parts = [earlier, ties.rowsBetween(W.unboundedPreceding, 0)]
            self.before = [earlier, ties.rowsBetween(W.unboundedPreceding, -1)]

    def total(self, quantity: Column) -> Column:
        from pyspark.sql import functions as F

        parts = [F.coalesce(F.sum(quantity).over(frame), F.lit(0)) for frame in self.parts]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def extreme(self, fn: str, values: Column) -> Column:
        from pyspark.sql import functions as F

        pick, combine = (F.min, F.least) if fn == "min" else (F.max, F.greatest)
        parts = [pick(values).over(frame) for frame in self.parts]
        return parts[0] if len(parts) == 1 else combine(*parts)

    def distinct(self, values: Column) -> Column:
        from pyspark.sql import functions as F

        sets = [F.collect_set(values).over(frame) for frame in self.parts]
        return F.size(sets[0] if len(sets) == 1 else F.array_union(sets[0], sets[1]))

    def latest_before(self, times: Column) -> Column:
        from pyspark.sql import functions as F

        parts = [F.max(times).over(frame) for frame in self.before]
        return parts[0] if len(parts) == 1 else F.greatest(*parts)


class _Joined:
    """Aggregates of the joined rows of a group: the delayed last-N windows, whose rows (the
    last N known ones) no frame with fixed bounds describes (see ``_delayed_last``)."""

    def total(self, quantity: Column) -> Column:
        from pyspark.sql import functions as F

        return F.coalesce(F.sum(quantity), F.lit(0))

    def extreme(self, fn: str, values: Column) -> Column:
        from pyspark.sql import functions as F

        return F.min(values) if fn == "min" else F.max(values)

    def distinct(self, values: Column) -> Column:
        from pyspark.sql import functions as F

        return F.size(F.collect_set(values))

    def latest_before(self, times: Column) -> Column:
        raise AssertionError("time_since_last windows are never delayed (the spec refuses)")


def _feature(index: int, a: Aggregate, frames: _Frames | _Joined) -> Column:
    from pyspark.sql import functions as F

    mask = F.col(f"__m{index}")
    count = frames.total(mask.cast("long")).cast("double")
    default = F.lit(a.default).cast("double")
    if a.fn == "count":
        return count
    if a.fn == "count_above":
        return frames.total(F.col(f"__a{index}")).cast("double")
    if a.fn in ("fraud_count", "fraud_rate"):
        frauds = frames.total(F.when(mask, F.col(IS_FRAUD).cast("long")).otherwise(0))
        frauds = frauds.cast("double")
        return (
            frauds
            if a.fn == "fraud_count"
            else F.when(count > 0, frauds / count).otherwise(default)
        )
    if a.fn == "time_since_last":
        latest = frames.latest_before(F.when(mask, F.col(_T)))
        gap = (F.col(_T) - latest).cast("double") / (UNIT_SECONDS[a.unit] * _US)
        return F.coalesce(gap, default)
    if a.fn in ("time_since_first", "time_since_fraud"):
        matching = mask if a.fn == "time_since_first" else mask & (F.col(IS_FRAUD) == 1)
        # The earliest matching time, or the latest fraud's, in the window.
        pick = "min" if a.fn == "time_since_first" else "max"
        when = frames.extreme(pick, F.when(matching, F.col(_T)))
        gap = (F.col(_T) - when).cast("double") / (UNIT_SECONDS[a.unit] * _US)
        return F.coalesce(gap, default)
    value = F.col(f"__v{index}")
    if a.fn == "count_distinct":
        return frames.distinct(F.when(mask, value)).cast("double")
    masked = F.when(mask, value).otherwise(0.0)
    if a.fn in ("sum", "mean"):
        total = frames.total(masked)
        return total if a.fn == "sum" else F.when(count > 0, total / count).otherwise(default)
    if a.fn in ("min", "max"):
        extreme = frames.extreme(a.fn, F.when(mask, value))
        return F.when(count > 0, extreme).otherwise(default)
    # std, population, as batch: sums of squares about the key's first value, tiny variances 0.
    shifted = F.when(mask, value - F.col(f"__r{index}")).otherwise(0.0)
    s1, s2 = frames.total(shifted), frames.total(shifted * shifted)
    variance = (s2 - s1 * s1 / count) / count
    variance = F.when(variance > 1e-12 * s2 / count, variance).otherwise(0.0)
    return F.when(count > 0, F.sqrt(variance)).otherwise(default)


def _delayed_last(
    frame: DataFrame, index: int, a: Aggregate, window: Window, delay_us: int
) -> DataFrame:
    """The feature over the last N rows of the key known at t - delay: a row's known rows are
    those numbered (p - N, p] in (time, arrival) order, p counting the rows at or before
    t - delay; joined to the row and aggregated. (ROW, feature)."""
    from functools import reduce

    from pyspark.sql import Window as W
    from pyspark.sql import functions as F

    by = list(a.by)
    known = W.partitionBy(*by).orderBy(_T).rangeBetween(W.unboundedPreceding, -delay_us)
    numbered = frame.withColumn(
        "__seq", F.row_number().over(W.partitionBy(*by).orderBy(_T, ROW))
    ).withColumn("__known", F.coalesce(F.count(F.lit(1)).over(known), F.lit(0)))
    keys = [F.col(c).alias(f"__key{i}") for i, c in enumerate(by)]
    left = numbered.select(F.col(ROW).alias("__me"), *keys, "__known")
    carried = [c for c in (f"__m{index}", f"__v{index}", f"__r{index}") if c in frame.columns]
    right = numbered.select(*by, "__seq", IS_FRAUD, *carried)
    n = int(window.events or 0)
    matches = [left[f"__key{i}"].eqNullSafe(right[c]) for i, c in enumerate(by)]
    matches += [right["__seq"] > left["__known"] - n, right["__seq"] <= left["__known"]]
    pairs = left.join(right, on=reduce(lambda x, y: x & y, matches), how="left")
    pairs = pairs.withColumn(f"__m{index}", F.coalesce(F.col(f"__m{index}"), F.lit(False)))
    feature = _feature(index, a, _Joined()).alias(a.feature_name(window))
    return pairs.groupBy("__me").agg(feature).withColumnRenamed("__me", ROW)


# ---------------------------------------------------------------- expressions -> Spark


def _column(expr: Expr) -> Column:
    from pyspark.sql import functions as F

    if isinstance(expr, Literal):
        return F.lit(expr.value)
    if isinstance(expr, Name):
        return _calendar(expr.name) if expr.name in CALENDAR else F.col(expr.name)
    if isinstance(expr, Binary):
        left, right = _numeric(_column(expr.left)), _numeric(_column(expr.right))
        if expr.op == "/":
            return F.when(right != 0, left / right)
        return {"+": left + right, "-": left - right, "*": left * right}[expr.op]
    if isinstance(expr, Compare):
        left, right = _column(expr.left), _column(expr.right)
        strings = [
            isinstance(s, Literal) and isinstance(s.value, str) for s in (expr.left, expr.right)
        ]
        if not any(strings):
            left, right = _numeric(left), _numeric(right)
        ops = {
            "<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right,
            "==": left == right, "!=": left != right,
        }  # fmt: skip
        return ops[expr.op]
    if isinstance(expr, Logical):
        left, right = _boolean(_column(expr.left)), _boolean(_column(expr.right))
        return left & right if expr.op == "and" else left | right
    if isinstance(expr, Not):
        return ~_boolean(_column(expr.operand))
    return _call(expr)


def _call(expr: Call) -> Column:
    from pyspark.sql import functions as F

    args = [_column(arg) for arg in expr.args]
    if expr.function == "where":
        return F.when(_boolean(args[0]), _numeric(args[1])).otherwise(_numeric(args[2]))
    values = [_numeric(arg) for arg in args]
    if expr.function == "log1p":
        return F.log1p(values[0])
    if expr.function == "abs":
        return F.abs(values[0])
    if expr.function == "min":
        return F.least(*values)  # skips nulls, as Polars' min_horizontal
    if expr.function == "max":
        return F.greatest(*values)
    if expr.function == "clip":
        x, low, high = values
        return F.when(x.isNull(), None).otherwise(F.least(F.greatest(x, low), high))
    return F.coalesce(*values)


def _calendar(name: str) -> Column:
    from pyspark.sql import functions as F

    ts = F.col(TIMESTAMP)  # the session time zone is UTC (``spark_session``)
    weekday = ((F.dayofweek(ts) + 5) % 7 + 1).cast("double")  # 1 Monday ... 7 Sunday
    return {
        "hour": F.hour(ts).cast("double"),
        "weekday": weekday,
        "is_weekend": weekday >= 6,
        "is_night": F.hour(ts) < NIGHT_END_HOUR,
    }[name]


def _numeric(column: Column) -> Column:
    return column.cast("double")


def _boolean(column: Column) -> Column:
    return column.cast("boolean")


# ---------------------------------------------------------------- running it


def spark_session(master: str, conf: Mapping[str, str] | None = None) -> Any:
    """A Spark session on ``master`` (``local[*]``, ``spark://host:port``, ``k8s://...``)
    with UTC as its time zone; a set-up problem is one ``ConfigError`` line."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise ConfigError(
            "the Spark engine needs a Java runtime (17 or newer), however none is on PATH and "
            "JAVA_HOME is not set: install one (e.g. openjdk-17-jre-headless) or use "
            "--engine polars"
        )
    _check_reachable(master)
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError(
            "the Spark engine needs PySpark: pip install 'fraudflow[spark]'"
        ) from None
    builder = SparkSession.builder.master(master).appName("fraudflow-features")
    if master.startswith("local"):
        # Local executors run Python code of ours (the backfill's tasks): this interpreter,
        # whose environment has fraudflow, not whatever `python3` is first on PATH. PySpark
        # reads the variable when the context starts (the `spark.pyspark.python` setting only
        # reaches spark-submit).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    for key, value in {**_SESSION_CONFIG, **(conf or {})}.items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # py4j and Spark raise many kinds; the first line says which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot start Spark on {master}: {first}") from None
    session.sparkContext.setLogLevel("ERROR")
    return session


_SESSION_CONFIG = {
    "spark.sql.session.timeZone": "UTC",  # calendar features are UTC in every engine
    "spark.ui.enabled": "false",
    # The table is collected on the driver to be written (module docstring of run_on_spark):
    # Spark's 1 GiB defaults lose the result of a few million rows. --spark-conf overrides.
    "spark.driver.memory": "4g",
    "spark.driver.maxResultSize": "0",
}


def _check_reachable(master: str) -> None:
    """A standalone master that does not answer would make Spark retry for minutes."""
    if not master.startswith("spark://"):
        return
    for address in master.removeprefix("spark://").split(","):
        host, _, port = address.partition(":")
        try:
            with socket.create_connection((host, int(port or 7077)), timeout=5):
                return
        except (OSError, ValueError):
            continue
    raise ConfigError(f"cannot reach the Spark master {master}: nothing answers there")


def run_on_spark(
    transactions: pl.DataFrame,
    spec: FeatureSpec,
    *,
    master: str,
    conf: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """``build_features`` on Spark: the same rows, order, columns and dtypes."""
    import polars as pl

    session = spark_session(master, conf)
    try:
        numbered = transactions.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.Int64))
        frame = session.createDataFrame(numbered.to_arrow())
        out = pl.from_arrow(build_features_spark(frame, spec).toArrow())
    finally:
        session.stop()
    assert isinstance(out, pl.DataFrame)
    schema = dict(transactions.schema)
    return out.select(pl.col(name).cast(schema.get(name, pl.Float64)) for name in out.columns)
