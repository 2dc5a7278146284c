"""The batch engine: a feature spec (``fraudflow.features.spec``) executed with Polars.

Aggregates with the same key columns are computed together. Their rows are ordered by key,
then by arrival (timestamp order, input order within equal timestamps), and each window of a
row is a range of positions [lo, hi) in that order:

* a duration w: lo is the key's first position with time > t - w (a search), and the
  range ends with the row itself. Using the row's position for the right end, not a search on
  t, means a row sees earlier rows with the same timestamp and itself, never later ones: the
  answer an online service gives processing one event at a time;
* delayed (label delay d): [first position with time > t - d - w, first with time > t - d);
* the last N events: [max(key start, i + 1 - N), i + 1), or the N before the delayed end.

Sums over a range are differences of running sums (NumPy arrays: gathers at nearby positions
cost less there than as Polars expressions); float sums restart at each key, so a key's
values never depend, not even by rounding, on other keys' rows. ``min``/``max`` read a sparse
table of range extremes; ``count_distinct`` adds +1 over the positions whose window holds a
value's earliest occurrence (see ``_distinct``); ``time_since_last`` looks back to the key's
previous matching row, ``time_since_first`` forward from lo to the next matching row, and
``time_since_fraud`` back from hi to the latest matching fraud row.

The searches run on one sorted integer key per key block, ``block * stride + (t - t_min)``,
with ``stride`` wider than the time span plus the longest window, so a search never leaves its
block (``_search_shifted``). Blocks are processed in chunks small enough that the key fits in
63 bits (one chunk for any realistic data set).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl

from fraudflow.config import FeatureConfig
from fraudflow.data.schema import FRAUD_SCENARIO, IS_FRAUD, TIMESTAMP
from fraudflow.errors import ConfigError, DataError
from fraudflow.features.default_spec import default_spec
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
    referenced_names,
)
from fraudflow.features.spec import UNIT_SECONDS, Aggregate, FeatureSpec, Window

__all__ = ["build_features", "check_categorical", "check_input"]

_T = "__t_us"  # timestamp as integer microseconds since the epoch
_ROW = "__row"  # arrival position
_US = 1_000_000
_KEY_LIMIT = 2**62


def build_features(transactions: pl.DataFrame, spec: FeatureSpec | FeatureConfig) -> pl.DataFrame:
    """The transactions in timestamp order (arrival order within ties) with feature columns added.

    ``spec`` is a feature spec, or a ``FeatureConfig`` for the default spec. ``transactions``
    must follow the canonical schema (see ``fraudflow.data.ingest``), with any extra columns the
    spec reads, and carry ``is_fraud``, which the label-delayed features need.
    """
    spec = spec if isinstance(spec, FeatureSpec) else default_spec(spec)
    _check_rows(transactions)
    check_input(spec, transactions.columns)
    check_categorical(spec, transactions.schema)
    ordered = transactions.lazy()
    if not transactions[TIMESTAMP].is_sorted():  # logs usually arrive in time order already
        ordered = ordered.sort(TIMESTAMP, maintain_order=True)
    base = ordered.with_columns(pl.col(TIMESTAMP).dt.epoch("us").alias(_T)).collect()
    groups: dict[tuple[str, ...], list[Aggregate]] = {}
    for aggregate in spec.aggregates:
        groups.setdefault(aggregate.by, []).append(aggregate)
    delay_us = spec.label_delay_seconds * _US
    # Key groups are independent; Polars and NumPy release the GIL, so threads overlap.
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(_per_key, base, by, group, delay_us) for by, group in groups.items()]
        parts = [job.result() for job in jobs]
    out = pl.concat([base, *parts], how="horizontal").lazy()
    for derive in spec.derive_order():
        out = out.with_columns(_numeric(_polars(derive.tree)).alias(derive.name))
    kept = [name for name in spec.feature_names if name not in transactions.columns]
    return out.select(*transactions.columns, *kept).collect()


def _check_rows(transactions: pl.DataFrame) -> None:
    if IS_FRAUD not in transactions.columns:
        raise DataError(f"`{IS_FRAUD}` is required: the label-delayed features are built from it")
    if transactions.height == 0:
        raise DataError("the transaction table is empty: there is nothing to build features for")
    n_null = transactions[IS_FRAUD].null_count()
    if n_null:
        # A null would propagate through the running sums into other rows' features.
        rows = "1 row is" if n_null == 1 else f"{n_null} rows are"
        raise DataError(f"`{IS_FRAUD}` must be 0 or 1, however: {rows} empty")


def check_input(spec: FeatureSpec, columns: list[str]) -> None:
    """Every column the spec reads is in the input, and no feature shadows one."""
    present = set(columns)
    features = set(spec.defined)

    def need(column: str, entry: str) -> None:
        if column not in present:
            shown = ", ".join(columns)
            raise ConfigError(f"{entry}: column {column!r} is not in the input (columns: {shown})")

    for a in spec.aggregates:
        entry = f"aggregate {a.name!r}"
        _no_labels([*a.by, *([a.of] if a.of else []), *_names(a.where_expr)], entry)
        for column in [*a.by, *([a.of] if a.of else [])]:
            need(column, entry)
        where = a.where_expr
        for name in sorted(referenced_names(where) - set(CALENDAR)) if where else []:
            if name in features and name not in present:
                raise ConfigError(f"{entry}: `where` reads the row's columns only, not {name!r}")
            need(name, entry)
    for d in spec.derives:
        _no_labels(_names(d.tree), f"derive {d.name!r}")
        for name in sorted(referenced_names(d.tree) - features - set(CALENDAR)):
            if name not in present:
                raise ConfigError(
                    f"derive {d.name!r}: unknown name {name!r} (not a feature of the spec, a "
                    "column of the input or a calendar part)"
                )
    for c in spec.columns:
        _no_labels([c.name], f"column {c.name!r}")
        need(c.name, f"column {c.name!r}")
    shadowed = (features - {c.name for c in spec.columns}) & present
    if shadowed:
        name = sorted(shadowed)[0]
        raise ConfigError(f"feature {name!r}: name clash with a column of the input")


def check_categorical(spec: FeatureSpec, schema: Mapping[str, pl.DataType]) -> None:
    """Categorical columns hold values that are equal or not: strings, integers, booleans.
    (A float's codes would hang on its exact bits.)"""
    for column in spec.columns:
        dtype = schema[column.name]
        if column.kind == "categorical" and not _discrete(dtype):
            raise ConfigError(
                f"column {column.name!r}: a categorical column holds strings, integers or "
                f"booleans, however found {dtype}"
            )


def _discrete(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype in (pl.String, pl.Boolean, pl.Categorical, pl.Enum)


def _names(expr: Expr | None) -> list[str]:
    return [] if expr is None else sorted(referenced_names(expr))


def _no_labels(names: list[str], entry: str) -> None:
    # A row's own label, or another's before it is known, is the leak features must not have.
    if IS_FRAUD in names:
        raise ConfigError(
            f"{entry}: reads `{IS_FRAUD}`, which is known only after the label delay; use fn "
            "fraud_count or fraud_rate, whose windows wait for it"
        )
    if FRAUD_SCENARIO in names:
        # A fraud's scenario is label detail, known (if ever) with its label: evaluation only.
        raise ConfigError(
            f"{entry}: reads `{FRAUD_SCENARIO}`, which is label detail for evaluation; "
            "features must not read labels"
        )


# ---------------------------------------------------------------- expressions -> Polars


def _polars(expr: Expr) -> pl.Expr:
    """The expression over the current row (see ``fraudflow.features.expressions``)."""
    if isinstance(expr, Literal):
        return pl.lit(expr.value)
    if isinstance(expr, Name):
        return _calendar(expr.name) if expr.name in CALENDAR else pl.col(expr.name)
    if isinstance(expr, Binary):
        left, right = _numeric(_polars(expr.left)), _numeric(_polars(expr.right))
        if expr.op == "/":
            return pl.when(right != 0).then(left / right).otherwise(None)
        return {"+": left + right, "-": left - right, "*": left * right}[expr.op]
    if isinstance(expr, Compare):
        left, right = _polars(expr.left), _polars(expr.right)
        if not any(
            isinstance(side, Literal) and isinstance(side.value, str)
            for side in (expr.left, expr.right)
        ):
            left, right = _numeric(left), _numeric(right)  # booleans compare as 1.0 / 0.0
        ops: dict[str, Callable[[pl.Expr, pl.Expr], pl.Expr]] = {
            "<": pl.Expr.lt, "<=": pl.Expr.le, ">": pl.Expr.gt, ">=": pl.Expr.ge,
            "==": pl.Expr.eq, "!=": pl.Expr.ne,
        }  # fmt: skip
        return ops[expr.op](left, right)
    if isinstance(expr, Logical):
        left, right = _boolean(_polars(expr.left)), _boolean(_polars(expr.right))
        return left & right if expr.op == "and" else left | right
    if isinstance(expr, Not):
        return ~_boolean(_polars(expr.operand))
    return _call(expr)


def _call(expr: Call) -> pl.Expr:
    args = [_polars(arg) for arg in expr.args]
    if expr.function == "where":
        return pl.when(_boolean(args[0])).then(_numeric(args[1])).otherwise(_numeric(args[2]))
    values = [_numeric(arg) for arg in args]
    if expr.function == "log1p":
        return values[0].log1p()
    if expr.function == "abs":
        return values[0].abs()
    if expr.function == "min":
        return pl.min_horizontal(*values)
    if expr.function == "max":
        return pl.max_horizontal(*values)
    if expr.function == "clip":
        return values[0].clip(values[1], values[2])
    return pl.coalesce(*values)  # coalesce


def _calendar(name: str) -> pl.Expr:
    ts = pl.col(TIMESTAMP)
    return {
        "hour": ts.dt.hour().cast(pl.Float64),
        "weekday": ts.dt.weekday().cast(pl.Float64),  # 1 Monday ... 7 Sunday
        "is_weekend": ts.dt.weekday() >= 6,
        "is_night": ts.dt.hour() < NIGHT_END_HOUR,
    }[name]


def _numeric(expr: pl.Expr) -> pl.Expr:
    return expr.cast(pl.Float64)


def _boolean(expr: pl.Expr) -> pl.Expr:
    return expr.cast(pl.Boolean)


# ---------------------------------------------------------------- aggregates


@dataclass(frozen=True)
class _Job:
    """One aggregate's window: its feature name and the columns it reads in the sorted frame."""

    aggregate: Aggregate
    window: Window
    mask: str  # boolean column: the row passes `where` (and has a value)
    value: str | None  # float column of `of` (None: no value)
    every: bool  # every row passes: sums and counts need not read the mask

    @property
    def name(self) -> str:
        return self.aggregate.feature_name(self.window)


def _per_key(
    base: pl.DataFrame, by: tuple[str, ...], aggregates: list[Aggregate], delay_us: int
) -> pl.DataFrame:
    """The aggregates keyed by ``by``, in base order."""
    complete = {c for c in base.columns if base[c].null_count() == 0}
    inputs, jobs = _inputs(aggregates, complete)
    changed = pl.any_horizontal([pl.col(c).ne_missing(pl.col(c).shift(1)) for c in by])
    ordered = (
        base.lazy()
        .select(pl.int_range(pl.len(), dtype=pl.UInt32).alias(_ROW), *by, _T, *inputs)
        .sort(*by, maintain_order=True, nulls_last=True)  # stable: arrival order within a key
        .with_columns(
            (changed | (pl.int_range(pl.len()) == 0)).cum_sum().cast(pl.Int64).alias("__block")
        )
        .drop(*by)
        .collect()
        .rechunk()  # gathers on one chunk per column are the fast ones
    )
    longest = max((_reach(j, delay_us) for j in jobs), default=0)
    t_min, t_max = int(base[_T].min()), int(base[_T].max())  # type: ignore[arg-type]
    stride = t_max - t_min + longest + 1
    per_chunk = max(1, _KEY_LIMIT // stride)
    n_blocks = int(ordered["__block"][-1]) + 1
    if n_blocks <= per_chunk:  # one chunk: no copy into partitions
        frames = [ordered]
    else:
        chunks = ordered.with_columns((pl.col("__block") // per_chunk).alias("__chunk"))
        frames = chunks.partition_by("__chunk", maintain_order=True, include_key=False)
    parts = [_Chunk(frame, stride, per_chunk, t_min, delay_us).features(jobs) for frame in frames]
    return _restore_order(pl.concat(parts))


def _inputs(aggregates: list[Aggregate], complete: set[str]) -> tuple[list[pl.Expr], list[_Job]]:
    """The columns the aggregates read, computed once on the input rows, and their jobs.
    ``complete``: the input columns without a null."""
    columns: dict[str, pl.Expr] = {IS_FRAUD: pl.col(IS_FRAUD).cast(pl.Int64)}
    jobs = []
    for index, a in enumerate(aggregates):
        where = a.where_expr
        passes = pl.lit(True) if where is None else _boolean(_polars(where)).fill_null(False)
        value = None
        if a.of is not None and a.fn != "count_distinct":
            value = f"__v{index}"
            columns[value] = pl.col(a.of).cast(pl.Float64)
            passes = passes & pl.col(a.of).is_not_null()
        elif a.of is not None:
            value = f"__v{index}"
            columns[value] = pl.col(a.of)
            passes = passes & pl.col(a.of).is_not_null()
        mask = f"__m{index}"
        every = where is None and (a.of is None or a.of in complete)
        if not every or a.fn in _NUMPY:  # running sums of a complete column read no mask
            columns[mask] = passes
        jobs += [_Job(a, window, mask, value, every) for window in a.windows]
    return [expr.alias(name) for name, expr in columns.items()], jobs


def _reach(job: _Job, delay_us: int) -> int:
    """How far back, in microseconds, a search for this job may go."""
    a = job.aggregate
    typical = (a.typical.seconds or 0) * _US if a.typical is not None else 0
    return max((job.window.seconds or 0) * _US + (delay_us if a.delayed else 0), typical)


def _restore_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Back to arrival order: a gather by the inverse permutation (cheaper than a sort)."""
    row = frame[_ROW].to_numpy()
    inverse = np.empty(row.shape[0], dtype=np.int64)
    inverse[row] = np.arange(row.shape[0])
    # A gather from one chunk per column is several times faster than from many.
    return frame.drop(_ROW).rechunk()[inverse]


def _search_shifted(rows: pl.DataFrame, offset: int) -> np.ndarray:
    """``np.searchsorted(key, key - offset, side="right")`` for the sorted ``key`` of ``rows``
    (columns ``k``, the key, and ``p``, its position), as Polars' backward as-of join: the
    last row at or below each query, found by one linear merge of two sorted columns where
    NumPy runs a binary search per query. Earns its place in ``benchmarks/features.py``.
    """
    queries = pl.DataFrame({"q": rows["k"] - offset}).set_sorted("q")
    found = queries.join_asof(
        rows, left_on="q", right_on="k", strategy="backward", check_sortedness=False
    )
    return (found["p"].fill_null(-1) + 1).to_numpy()


class _Chunk:
    """Whole key blocks, sorted by (key, arrival); positions are local to the chunk."""

    def __init__(
        self, frame: pl.DataFrame, stride: int, per_chunk: int, t_min: int, delay_us: int
    ) -> None:
        self.frame = frame
        self.n = frame.height
        block = frame["__block"].to_numpy()
        self.block = block
        self.t = frame[_T].to_numpy()
        self.key = (block % per_chunk) * stride + (self.t - t_min)
        self.pos = np.arange(self.n, dtype=np.int64)
        self._rows = pl.DataFrame({"k": self.key, "p": self.pos}).set_sorted("k")
        first = np.ones(self.n, dtype=bool)
        first[1:] = block[1:] != block[:-1]
        self.start = np.maximum.accumulate(np.where(first, self.pos, 0))
        starts = np.flatnonzero(first)
        ends = np.append(starts[1:], self.n)
        self.end = np.repeat(ends, np.diff(np.append(starts, self.n)))  # (n,) block end
        self.delay_us = delay_us
        self._searched: dict[int, np.ndarray] = {}
        self._occurrences: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def block_cumsum(self, value: np.ndarray) -> np.ndarray:
        """Running sums of ``value`` restarting at each key block."""
        frame = pl.DataFrame({"v": value, "b": self.block})
        return frame.select(pl.col("v").cum_sum().over("b"))["v"].to_numpy()

    def first_value(self, name: str) -> np.ndarray:
        """Per row, the first non-null value of column ``name`` in its key block."""
        first = pl.col(name).drop_nulls().first().over("__block")
        return self.frame.select(first)[name].to_numpy()

    def after(self, offset_us: int) -> np.ndarray:
        """Per row, the block's first position with time > t - offset."""
        if offset_us not in self._searched:
            self._searched[offset_us] = _search_shifted(self._rows, offset_us)
        return self._searched[offset_us]

    def previous_occurrence(self, mask: str, value: str) -> tuple[np.ndarray, np.ndarray]:
        """The matching rows k, and per k the previous matching row of the same key block
        and value (-1: none). Computed once per (filter, value column), for every window."""
        if (mask, value) not in self._occurrences:
            k = np.flatnonzero(self.frame[mask].to_numpy())
            codes = self.frame[value].rank("dense").fill_null(0).to_numpy()[k]
            block = self.block[k]
            order = np.lexsort((k, codes, block))  # by block, then value, then position
            same = (block[order][1:] == block[order][:-1]) & (codes[order][1:] == codes[order][:-1])
            previous = np.full(k.size, -1, dtype=np.int64)
            previous[order[1:][same]] = k[order][:-1][same]
            self._occurrences[(mask, value)] = (k, previous)
        return self._occurrences[(mask, value)]

    def bounds(self, window: Window, delayed: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The window's [lo, hi) per row; hi None means the row itself (i + 1)."""
        hi = self.after(self.delay_us) if delayed else None
        if window.seconds is not None:
            lo = self.after(window.seconds * _US + (self.delay_us if delayed else 0))
        else:
            top = self.pos + 1 if hi is None else hi
            lo = np.maximum(self.start, top - int(window.events or 0))
        return lo, hi

    def search_all(self, offsets: set[int]) -> None:
        """Run the searches of ``offsets`` at once: Polars releases the GIL, so they overlap
        in threads."""
        todo = sorted(offsets - self._searched.keys())
        with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            for offset in todo:
                pool.submit(self.after, offset)

    def features(self, jobs: list[_Job]) -> pl.DataFrame:
        offsets = set()
        for job in jobs:
            delayed, reach = job.aggregate.delayed, (job.window.seconds or 0) * _US
            if delayed:
                offsets.add(self.delay_us)
            if job.window.seconds is not None:
                offsets.add(reach + (self.delay_us if delayed else 0))
            if job.aggregate.typical is not None:
                offsets.add((job.aggregate.typical.seconds or 0) * _US)
        self.search_all(offsets)
        sums = _RunningSums(self)  # each running sum once, however many windows read it
        columns = [self.frame[_ROW]]
        for job in jobs:
            lo, hi = self.bounds(job.window, job.aggregate.delayed)
            compute = _NUMPY.get(job.aggregate.fn)
            with np.errstate(divide="ignore", invalid="ignore"):  # empty windows: see fns
                values = (
                    _prefix_feature(job, sums, lo, hi)
                    if compute is None
                    else compute(self, job, lo, hi)
                )
            columns.append(pl.Series(job.name, values, nan_to_null=True))
        return pl.DataFrame(columns)

    def column(self, name: str) -> np.ndarray:
        return self.frame[name].to_numpy()


# ---------------------------------------------------------------- prefix-sum functions


class _RunningSums:
    """The running sums the features read, each computed once per chunk; a window's sum is a
    difference of two of them.

    ``exact`` sums restart at each key block, so a key's float sums never depend, not even by
    rounding, on other keys' rows; integer sums are exact either way.
    """

    def __init__(self, chunk: _Chunk) -> None:
        self.chunk = chunk
        self._sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def over(
        self,
        name: str,
        quantity: Callable[[], np.ndarray],
        lo: np.ndarray,
        hi: np.ndarray | None,
        *,
        exact: bool,
    ) -> np.ndarray:
        """Sum over [lo, hi) (hi None: up to the row itself) of ``quantity`` (``name``), as
        floats (integer quantities are summed exactly first)."""
        if name not in self._sums:
            value = quantity()
            inclusive = self.chunk.block_cumsum(value) if exact else np.cumsum(value)
            self._sums[name] = (inclusive, inclusive - value)
        inclusive, exclusive = self._sums[name]
        top = inclusive if hi is None else exclusive[hi]
        return np.subtract(top, exclusive[lo], dtype=np.float64)


def _range_count(
    job: _Job, sums: _RunningSums, lo: np.ndarray, hi: np.ndarray | None
) -> np.ndarray:
    if job.every:
        top = sums.chunk.pos + 1 if hi is None else hi
        return np.subtract(top, lo, dtype=np.float64)
    mask = lambda: sums.chunk.column(job.mask).astype(np.int64)  # noqa: E731
    return sums.over(f"{job.mask}n", mask, lo, hi, exact=False)


def _prefix_feature(
    job: _Job, sums: _RunningSums, lo: np.ndarray, hi: np.ndarray | None
) -> np.ndarray:
    a, chunk = job.aggregate, sums.chunk
    if a.fn == "count_above":
        above = lambda: _above(job, sums)  # noqa: E731
        return sums.over(f"{job.mask}a", above, lo, hi, exact=False)
    count = _range_count(job, sums, lo, hi)
    if a.fn == "count":
        return count

    def masked(values: np.ndarray, otherwise: float) -> np.ndarray:
        return _masked(job, chunk, values, otherwise)

    if a.fn in ("fraud_count", "fraud_rate"):
        fraud = lambda: masked(chunk.column(IS_FRAUD), 0)  # noqa: E731
        frauds = sums.over(f"{job.mask}f", fraud, lo, hi, exact=False)
        return frauds if a.fn == "fraud_count" else _or_default(count, frauds / count, a)
    value = lambda: masked(chunk.column(str(job.value)), 0.0)  # noqa: E731
    if a.fn in ("sum", "mean"):
        total = sums.over(f"{job.mask}v", value, lo, hi, exact=True)
        return total if a.fn == "sum" else _or_default(count, total / count, a)
    # std: population, from sums of squares about the block's first value (less cancellation).
    shifted = lambda: masked(chunk.column(str(job.value)) - chunk.first_value(str(job.value)), 0.0)  # noqa: E731
    square = lambda: np.square(shifted())  # noqa: E731
    s1 = sums.over(f"{job.mask}s", shifted, lo, hi, exact=True)
    s2 = sums.over(f"{job.mask}s2", square, lo, hi, exact=True)
    variance = (s2 - s1 * s1 / count) / count
    # Differences of running sums carry rounding of the order of eps times the squares: a
    # variance below that is zero (a window of one value, or of equal values, has std 0).
    noise = 1e-12 * s2 / count
    variance = np.where(variance > noise, variance, 0.0)
    return _or_default(count, np.sqrt(variance), a)


def _masked(job: _Job, chunk: _Chunk, values: np.ndarray, otherwise: float) -> np.ndarray:
    """``values`` on the rows that pass the aggregate's filter, ``otherwise`` elsewhere."""
    return values if job.every else np.where(chunk.column(job.mask), values, otherwise)


def _above(job: _Job, sums: _RunningSums) -> np.ndarray:
    """count_above's verdict per row (1 or 0): the row passes and its value is above k times
    the mean over the typical window before it, [first row with time > t - typical, row)."""
    a, chunk = job.aggregate, sums.chunk
    assert a.k is not None and a.typical is not None, "count_above has both (spec checks)"
    lo = chunk.after((a.typical.seconds or 0) * _US)
    count = _range_count(job, sums, lo, chunk.pos)
    values = chunk.column(str(job.value))
    masked = lambda: _masked(job, chunk, values, 0.0)  # noqa: E731  # as mean's sums
    total = sums.over(f"{job.mask}v", masked, lo, chunk.pos, exact=True)
    above = (count > 0) & (values > a.k * (total / count))
    return _masked(job, chunk, above, False).astype(np.int64)


def _or_default(count: np.ndarray, value: np.ndarray, a: Aggregate) -> np.ndarray:
    """``value`` where the window holds rows, else the aggregate's default (NaN: null)."""
    return np.where(count > 0, value, np.nan if a.default is None else a.default)


# ---------------------------------------------------------------- NumPy functions


def _extreme(chunk: _Chunk, job: _Job, lo: np.ndarray, hi: np.ndarray | None) -> np.ndarray:
    """min / max over [lo, hi) from a sparse table: level k holds extremes of 2^k positions."""
    largest = job.aggregate.fn == "max"
    mask = chunk.frame[job.mask].to_numpy()
    filler = -np.inf if largest else np.inf
    values = np.where(mask, chunk.frame[str(job.value)].fill_null(0.0).to_numpy(), filler)
    top = chunk.pos + 1 if hi is None else hi
    length = top - lo
    combine = np.maximum if largest else np.minimum
    out = np.full(chunk.n, np.nan)
    table = [values]
    level = 0
    while True:
        rows = np.flatnonzero((length >= (1 << level)) & (length < (1 << (level + 1))))
        if rows.size:
            width = 1 << level
            out[rows] = combine(table[level][lo[rows]], table[level][top[rows] - width])
        if (length >= (1 << (level + 1))).any():
            step = 1 << level
            table.append(combine(table[level][:-step], table[level][step:]))
            level += 1
        else:
            break
    inside = _window_counts(np.cumsum(mask), lo, top)
    return _fill_empty(out, inside, job.aggregate.default)


def _window_counts(cumulative: np.ndarray, lo: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Rows counted by ``cumulative`` (inclusive running count) in [lo, top)."""
    before = np.concatenate([[0], cumulative])
    return before[top] - before[lo]


def _fill_empty(values: np.ndarray, inside: np.ndarray, default: float | None) -> np.ndarray:
    empty = inside == 0
    out = values.astype(np.float64)
    out[empty] = np.nan if default is None else default
    return out


def _distinct(chunk: _Chunk, job: _Job, lo: np.ndarray, hi: np.ndarray | None) -> np.ndarray:
    """Distinct values in each window, counted where their earliest occurrence in it lies.

    A matching row k whose previous occurrence of the same value (same key) is p is the
    earliest occurrence in row i's window exactly when k is in it and p is not. For a window
    ending at the row itself that holds for a contiguous range of rows i >= k, so each k adds
    +1 to a range (a difference array, then a running sum): duration w: t_i in [t_p + w, t_k
    + w); last N: i in [p + N, k + N); delayed by d: t_i in [max(t_k + d, t_p + d + w), t_k +
    d + w).
    """
    window, delayed = job.window, job.aggregate.delayed
    k, p = chunk.previous_occurrence(job.mask, str(job.value))
    has_prev = p >= 0
    key = chunk.key
    if window.events is not None:  # last N (not delayed: refused by the spec)
        n = int(window.events)
        a = np.where(has_prev, np.maximum(k, p + n), k)
        b = np.minimum(k + n, chunk.end[k])
    else:
        w = int(window.seconds or 0) * _US
        d = chunk.delay_us if delayed else 0
        earliest = key[k] + d if delayed else key[k]
        later = np.maximum(earliest, key[np.maximum(p, 0)] + d + w)
        a = np.searchsorted(key, np.where(has_prev, later, earliest), side="left")
        a = np.maximum(a, k)
        b = np.searchsorted(key, key[k] + d + w, side="left")
    keep = a < b
    diff = np.bincount(a[keep], minlength=chunk.n + 1) - np.bincount(b[keep], minlength=chunk.n + 1)
    return np.cumsum(diff)[: chunk.n].astype(np.float64)


def _since_last(chunk: _Chunk, job: _Job, lo: np.ndarray, hi: np.ndarray | None) -> np.ndarray:
    """Time from the key's previous matching row (before the row itself) inside the window."""
    mask = chunk.frame[job.mask].to_numpy()
    latest = np.maximum.accumulate(np.where(mask, chunk.pos, -1))
    previous = np.concatenate([[-1], latest[:-1]])
    found = (previous >= chunk.start) & (previous >= lo)
    gap = (chunk.t - chunk.t[np.maximum(previous, 0)]).astype(np.float64)
    unit_us = UNIT_SECONDS[job.aggregate.unit] * _US
    return _fill_empty(gap / unit_us, found.astype(np.int64), job.aggregate.default)


def _since_first(chunk: _Chunk, job: _Job, lo: np.ndarray, hi: np.ndarray | None) -> np.ndarray:
    """Time since the window's earliest matching row, the row itself included."""
    mask = chunk.frame[job.mask].to_numpy()
    top = chunk.pos + 1 if hi is None else hi
    # Per position, the next matching position at or after it (n: none).
    following = np.minimum.accumulate(np.where(mask, chunk.pos, chunk.n)[::-1])[::-1]
    first = np.append(following, chunk.n)[lo]
    found = first < top
    gap = (chunk.t - chunk.t[np.minimum(first, chunk.n - 1)]).astype(np.float64)
    unit_us = UNIT_SECONDS[job.aggregate.unit] * _US
    return _fill_empty(gap / unit_us, found.astype(np.int64), job.aggregate.default)


def _since_fraud(chunk: _Chunk, job: _Job, lo: np.ndarray, hi: np.ndarray | None) -> np.ndarray:
    """Time since the window's latest matching row labelled fraud (a delayed window)."""
    assert hi is not None, "time_since_fraud windows are delayed (the spec says so)"
    fraud = chunk.frame[job.mask].to_numpy() & (chunk.frame[IS_FRAUD].to_numpy() == 1)
    # Per position, the latest fraud position at or before it (-1: none).
    latest = np.maximum.accumulate(np.where(fraud, chunk.pos, -1))
    last = np.concatenate([[-1], latest])[hi]  # at or before hi - 1
    found = (hi > lo) & (last >= lo)
    gap = (chunk.t - chunk.t[np.maximum(last, 0)]).astype(np.float64)
    unit_us = UNIT_SECONDS[job.aggregate.unit] * _US
    return _fill_empty(gap / unit_us, found.astype(np.int64), job.aggregate.default)


_NUMPY: dict[str, Callable[[_Chunk, _Job, np.ndarray, np.ndarray | None], np.ndarray]] = {
    "min": _extreme,
    "max": _extreme,
    "count_distinct": _distinct,
    "time_since_last": _since_last,
    "time_since_first": _since_first,
    "time_since_fraud": _since_fraud,
}
