"""Read transaction logs (CSV or Parquet), map their columns, and enforce the schema.

Every rule failure raises ``DataError`` naming the column, the rule, how many rows break it
and the first offender. Rows are numbered from 1 in file order, header excluded.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from pathlib import Path

import polars as pl

from fraudflow.data.schema import (
    AMOUNT,
    CUSTOMER_ID,
    IS_FRAUD,
    REQUIRED_COLUMNS,
    TERMINAL_ID,
    TIMESTAMP,
    TRANSACTION_ID,
)
from fraudflow.errors import ConfigError, DataError, FraudflowError, SchemaError

__all__ = [
    "input_files",
    "parse_column_map",
    "read_named_file",
    "read_transaction_files",
    "read_transactions",
    "validate_transactions",
]

_CANONICAL = (*REQUIRED_COLUMNS, IS_FRAUD)
_ROW = "__row"
_EMPTY = ("is empty", "are empty")
# Formats tried in order; naive timestamps are taken as UTC.
_NAIVE_FORMATS = ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M", "%Y-%m-%d")
_AWARE_FORMATS = ("%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z")


def parse_column_map(text: str | None) -> dict[str, str]:
    """Parse ``canonical=source,...`` into {canonical: source}."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for item in text.split(","):
        canonical, sep, source = (part.strip() for part in item.partition("="))
        if not sep or not canonical or not source:
            raise ConfigError(f"--map expects canonical=source pairs, however got {item!r}")
        if canonical not in _CANONICAL:
            raise ConfigError(
                f"--map names unknown canonical column {canonical!r}; "
                f"expected one of: {', '.join(_CANONICAL)}"
            )
        mapping[canonical] = source
    return mapping


def read_transactions(path: Path, *, column_map: Mapping[str, str] | None = None) -> pl.DataFrame:
    """Read a CSV or Parquet log into the canonical schema (file order kept)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    column_map = dict(column_map or {})
    raw = _read_raw(path, column_map)
    return validate_transactions(_rename(raw, column_map))


def input_files(spec: str | Path) -> list[Path]:
    """A file, a folder (its .csv and .parquet files) or a glob, as sorted files."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".parquet"))
        if not files:
            raise DataError(f"input folder {path} holds no .csv or .parquet files")
        return files
    if not glob.has_magic(str(spec)):
        raise DataError(f"input file {path} does not exist")
    files = sorted(Path(p) for p in glob.glob(str(spec)) if Path(p).is_file())
    if not files:
        raise DataError(f"input {spec} matches no file (expected a file, a folder or a glob)")
    return files


def read_transaction_files(
    spec: str | Path, *, column_map: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """``read_transactions`` of each input file (``input_files``), in file order, checked as
    one log (a transaction_id repeated across files is an error too)."""
    files = input_files(spec)
    if len(files) == 1:
        return read_transactions(files[0], column_map=column_map)
    frames = [read_named_file(f, column_map=column_map) for f in files]
    return validate_transactions(pl.concat(frames, how="vertical_relaxed"))


def read_named_file(path: Path, *, column_map: Mapping[str, str] | None = None) -> pl.DataFrame:
    """``read_transactions`` of one file of several: its error names the file, since row
    numbers count within it."""
    try:
        return read_transactions(path, column_map=column_map)
    except FraudflowError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def validate_transactions(df: pl.DataFrame) -> pl.DataFrame:
    """Check every schema rule; return canonical dtypes with the canonical columns first."""
    _check_columns(df)
    df = _blank_to_null(df).with_row_index(_ROW, offset=1)
    for column in (TRANSACTION_ID, CUSTOMER_ID, TERMINAL_ID):
        df = df.with_columns(_parse_id(df, column))
    df = df.with_columns(_parse_timestamp(df), _parse_amount(df))
    if IS_FRAUD in df.columns:
        df = df.with_columns(_parse_label(df))
    _check_unique_ids(df)
    extras = [c for c in df.columns if c not in _CANONICAL and c != _ROW]
    canonical = [c for c in _CANONICAL if c in df.columns]
    return df.select(*canonical, *extras)


def _read_raw(path: Path, column_map: Mapping[str, str]) -> pl.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix == ".csv":
            # Canonical columns are read as text so that each rule can name the bad rows.
            header = pl.read_csv(path, n_rows=0).columns
            sources = {column_map.get(c, c) for c in _CANONICAL}
            overrides = {c: pl.String for c in header if c in sources}
            return pl.read_csv(path, schema_overrides=overrides, infer_schema_length=10_000)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    raise DataError(f"input file must end in .csv or .parquet, however got {path}")


def _rename(df: pl.DataFrame, column_map: Mapping[str, str]) -> pl.DataFrame:
    for canonical, source in column_map.items():
        if source not in df.columns:
            raise SchemaError(
                f"--map {canonical}={source}: column `{source}` is not in the file; "
                f"found columns: {', '.join(df.columns)}"
            )
        if canonical in df.columns and canonical != source:
            raise SchemaError(f"--map {canonical}={source}: the file already has `{canonical}`")
    return df.rename({s: c for c, s in column_map.items() if s != c})


def _check_columns(df: pl.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SchemaError(
            f"missing required column(s): {', '.join(f'`{c}`' for c in missing)}; "
            f"found columns: {', '.join(df.columns)} (use --map canonical=source to map names)"
        )


def _blank_to_null(df: pl.DataFrame) -> pl.DataFrame:
    """A blank text cell ("" or only spaces) in a canonical column counts as empty."""
    text = [c for c in _CANONICAL if c in df.columns and df.schema[c] == pl.String]
    return df.with_columns(
        pl.when(pl.col(c).str.strip_chars() != "").then(pl.col(c)).alias(c) for c in text
    )


def _fail(df: pl.DataFrame, bad: pl.Series, column: str, rule: str, what: tuple[str, str]) -> None:
    """Raise a DataError describing the rows where ``bad`` is true, if any.

    ``what`` says what the bad rows show, for one row and for several: ("is empty", "are empty").
    """
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    first = df.filter(bad).row(0, named=True)
    found = f"1 row {what[0]}" if n_bad == 1 else f"{n_bad} rows {what[1]}"
    # An empty cell has no value worth showing (and `None` means nothing to a CSV's author).
    value = "" if first[column] is None else f", {column}={first[column]!r}"
    raise DataError(f"`{column}` {rule}, however: {found} (first: row {first[_ROW]}{value})")


def _parse_id(df: pl.DataFrame, column: str) -> pl.Series:
    values = df[column]
    _fail(df, values.is_null(), column, "must not be empty", _EMPTY)
    if values.dtype == pl.String:
        text = values.str.strip_chars()
        as_int = text.cast(pl.Int64, strict=False)
        # Integer only if nothing is lost: "007" and "7" are different cards.
        if as_int.null_count() == 0 and (as_int.cast(pl.String) == text).all():
            return as_int.alias(column)
        return text
    if values.dtype.is_integer():
        return values.cast(pl.Int64)
    if values.dtype.is_float():
        fractional = values != values.round(0)
        rule = "must be an integer or text id"
        _fail(df, fractional, column, rule, ("is fractional", "are fractional"))
        return values.cast(pl.Int64)
    return values.cast(pl.String)


def _parse_timestamp(df: pl.DataFrame) -> pl.Series:
    values = df[TIMESTAMP]
    _fail(df, values.is_null(), TIMESTAMP, "must not be empty", _EMPTY)
    if isinstance(values.dtype, pl.Datetime):
        if values.dtype.time_zone is None:
            values = values.dt.replace_time_zone("UTC")
        return values.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if isinstance(values.dtype, pl.Date):
        return values.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if values.dtype != pl.String:
        raise SchemaError(
            f"`{TIMESTAMP}` must be a datetime or ISO 8601 text, however it is {values.dtype}"
        )
    parsed = _parse_text_timestamps(values.str.strip_chars())
    unparsed = parsed.is_null()
    _fail(df, unparsed, TIMESTAMP, "must be an ISO 8601 datetime", ("cannot be parsed",) * 2)
    return parsed


def _parse_text_timestamps(text: pl.Series) -> pl.Series:
    utc = pl.Datetime("us", "UTC")
    candidates = [
        text.str.to_datetime(f, strict=False, time_unit="us").dt.replace_time_zone("UTC")
        for f in _NAIVE_FORMATS
    ]
    candidates += [
        text.str.to_datetime(f, strict=False, time_unit="us").dt.convert_time_zone("UTC")
        for f in _AWARE_FORMATS
    ]
    return pl.select(pl.coalesce([c.cast(utc) for c in candidates])).to_series().alias(TIMESTAMP)


def _parse_amount(df: pl.DataFrame) -> pl.Series:
    values = df[AMOUNT]
    _fail(df, values.is_null(), AMOUNT, "must not be empty", _EMPTY)
    if values.dtype == pl.String:
        as_float = values.str.strip_chars().cast(pl.Float64, strict=False)
        not_number = as_float.is_null()
        _fail(df, not_number, AMOUNT, "must be a number", ("is not a number", "are not numbers"))
        values = as_float
    elif not values.dtype.is_numeric():
        raise SchemaError(f"`{AMOUNT}` must be numeric, however it is {values.dtype}")
    values = values.cast(pl.Float64).alias(AMOUNT)
    # From here on the messages show the parsed number (amount=-5.0), not the raw text.
    df = df.with_columns(values)
    finite = "must be a finite number >= 0"
    _fail(df, values.is_nan(), AMOUNT, finite, ("is NaN", "are NaN"))
    _fail(df, values.is_infinite(), AMOUNT, finite, ("is infinite", "are infinite"))
    _fail(df, values < 0, AMOUNT, "must be >= 0", ("has amount < 0", "have amount < 0"))
    return values


def _parse_label(df: pl.DataFrame) -> pl.Series:
    values = df[IS_FRAUD]
    if values.dtype == pl.String:
        values = values.str.strip_chars().cast(pl.Float64, strict=False)
    elif values.dtype == pl.Boolean:
        values = values.cast(pl.Int8)
    elif not values.dtype.is_numeric():
        raise SchemaError(f"`{IS_FRAUD}` must be 0 or 1, however it is {values.dtype}")
    bad = values.is_null() | ~values.cast(pl.Float64).is_in([0.0, 1.0])
    what = ("has another value or is empty", "have another value or are empty")
    _fail(df, bad, IS_FRAUD, "must be 0 or 1", what)
    return values.cast(pl.Int8).alias(IS_FRAUD)


def _check_unique_ids(df: pl.DataFrame) -> None:
    dup = df[TRANSACTION_ID].is_duplicated()
    if not dup.any():
        return
    ids = df.filter(dup)
    n_values = ids[TRANSACTION_ID].n_unique()
    found = "1 value appears" if n_values == 1 else f"{n_values} values appear"
    first = ids.row(0, named=True)
    later = ids.filter(pl.col(TRANSACTION_ID) == first[TRANSACTION_ID])[_ROW].to_list()
    raise DataError(
        f"`{TRANSACTION_ID}` must be unique, however: {found} more than once "
        f"(first: {TRANSACTION_ID}={first[TRANSACTION_ID]!r} "
        f"at rows {', '.join(map(str, later[:5]))})"
    )
