"""Reading raw transaction logs: dtypes, timestamp formats, column mapping, exact error messages.

``BAD_CSV_CASES`` is shared with the CLI tests, which check that `fraudflow features` reports
the same messages.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from fraudflow.data.ingest import parse_column_map, read_transactions, validate_transactions
from fraudflow.errors import ConfigError, DataError, SchemaError

HEADER = "transaction_id,timestamp,customer_id,terminal_id,amount,is_fraud,channel"
ROWS = [
    "1,2026-01-01 10:00:00,c1,t1,10.5,0,web",
    "2,2026-01-01 11:00:00,c2,t2,20,1,pos",
    "3,2026-01-02 09:30:00,c1,t2,5.25,0,pos",
    "4,2026-01-03 12:00:00,c3,t1,99.99,0,web",
]
COLUMNS = HEADER.split(",")


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def with_cells(changes: dict[tuple[int, str], str]) -> list[str]:
    """``ROWS`` with some cells replaced; keys are (row number from 1, column name)."""
    table = [row.split(",") for row in ROWS]
    for (row, column), value in changes.items():
        table[row - 1][COLUMNS.index(column)] = value
    return [",".join(cells) for cells in table]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# Each case: the cells changed in ROWS, and the exact message.
BAD_CSV_CASES = [
    pytest.param(
        {(2, "timestamp"): "2026-02-30 10:00:00"},
        "`timestamp` must be an ISO 8601 datetime, however: 1 row cannot be parsed "
        "(first: row 2, timestamp='2026-02-30 10:00:00')",
        id="unparsable-timestamp",
    ),
    pytest.param(
        {(3, "timestamp"): "", (4, "timestamp"): "  "},
        "`timestamp` must not be empty, however: 2 rows are empty (first: row 3)",
        id="empty-timestamp",
    ),
    pytest.param(
        {(3, "amount"): "-5", (4, "amount"): "-0.5"},
        "`amount` must be >= 0, however: 2 rows have amount < 0 (first: row 3, amount=-5.0)",
        id="negative-amount",
    ),
    pytest.param(
        {(2, "amount"): "NaN"},
        "`amount` must be a finite number >= 0, however: 1 row is NaN (first: row 2, amount=nan)",
        id="nan-amount",
    ),
    pytest.param(
        {(4, "amount"): "inf"},
        "`amount` must be a finite number >= 0, however: 1 row is infinite "
        "(first: row 4, amount=inf)",
        id="infinite-amount",
    ),
    pytest.param(
        {(2, "amount"): '"12,50"', (3, "amount"): "abc"},
        "`amount` must be a number, however: 2 rows are not numbers (first: row 2, amount='12,50')",
        id="non-numeric-amount",
    ),
    pytest.param(
        {(1, "amount"): ""},
        "`amount` must not be empty, however: 1 row is empty (first: row 1)",
        id="empty-amount",
    ),
    pytest.param(
        {(3, "is_fraud"): "2"},
        "`is_fraud` must be 0 or 1, however: 1 row has another value or is empty "
        "(first: row 3, is_fraud='2')",
        id="label-2",
    ),
    pytest.param(
        {(2, "is_fraud"): "yes", (4, "is_fraud"): ""},
        "`is_fraud` must be 0 or 1, however: 2 rows have another value or are empty "
        "(first: row 2, is_fraud='yes')",
        id="label-yes",
    ),
    pytest.param(
        {(4, "transaction_id"): "2"},
        "`transaction_id` must be unique, however: 1 value appears more than once "
        "(first: transaction_id=2 at rows 2, 4)",
        id="duplicate-id",
    ),
    pytest.param(
        {(2, "customer_id"): '""'},
        "`customer_id` must not be empty, however: 1 row is empty (first: row 2)",
        id="empty-id",
    ),
]


# --- happy path ---------------------------------------------------------------------------------


def test_csv_gets_canonical_dtypes_and_keeps_extra_columns(tmp_path: Path) -> None:
    header = "channel,amount,terminal_id,customer_id,timestamp,transaction_id,is_fraud"
    rows = ["web,10.5,7,c1,2026-01-01 10:00:00,100,0", "pos,20,8,c2,2026-01-01 11:00:00,101,1"]
    df = read_transactions(write_csv(tmp_path / "log.csv", rows, header))
    assert dict(df.schema) == {
        "transaction_id": pl.Int64,
        "timestamp": pl.Datetime("us", "UTC"),
        "customer_id": pl.String,
        "terminal_id": pl.Int64,
        "amount": pl.Float64,
        "is_fraud": pl.Int8,
        "channel": pl.String,
    }
    assert df.rows() == [
        (100, utc(2026, 1, 1, 10), "c1", 7, 10.5, 0, "web"),
        (101, utc(2026, 1, 1, 11), "c2", 8, 20.0, 1, "pos"),
    ]


def test_parquet_gets_canonical_dtypes_and_keeps_extra_columns(tmp_path: Path) -> None:
    raw = pl.DataFrame(
        {
            "merchant": ["m1", "m2"],
            "transaction_id": pl.Series(["a", "b"]),
            "timestamp": pl.Series([datetime(2026, 1, 1, 10), datetime(2026, 1, 1, 11)]),
            "customer_id": pl.Series([1, 2], dtype=pl.Int32),
            "terminal_id": pl.Series(["t1", "t2"]),
            "amount": pl.Series([3, 4], dtype=pl.Int64),
            "is_fraud": pl.Series([True, False]),
        }
    )
    raw.write_parquet(tmp_path / "log.parquet")
    df = read_transactions(tmp_path / "log.parquet")
    assert dict(df.schema) == {
        "transaction_id": pl.String,
        "timestamp": pl.Datetime("us", "UTC"),
        "customer_id": pl.Int64,
        "terminal_id": pl.String,
        "amount": pl.Float64,
        "is_fraud": pl.Int8,
        "merchant": pl.String,
    }
    assert df.rows() == [
        ("a", utc(2026, 1, 1, 10), 1, "t1", 3.0, 1, "m1"),
        ("b", utc(2026, 1, 1, 11), 2, "t2", 4.0, 0, "m2"),
    ]


def test_label_is_optional_and_file_order_is_kept(tmp_path: Path) -> None:
    header = "transaction_id,timestamp,customer_id,terminal_id,amount"
    rows = ["9,2026-01-02,1,1,1", "3,2026-01-01,1,1,2"]
    df = read_transactions(write_csv(tmp_path / "log.csv", rows, header))
    assert df.columns == header.split(",")
    assert df["transaction_id"].to_list() == [9, 3]


def test_zero_padded_ids_stay_text(tmp_path: Path) -> None:
    # "007" and "7" are different cards; reading them as integers would merge them.
    rows = ["1,2026-01-01,007,1,1,0,web", "2,2026-01-01,7,1,1,0,web"]
    df = read_transactions(write_csv(tmp_path / "log.csv", rows))
    assert df["customer_id"].to_list() == ["007", "7"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01 10:00:00", utc(2026, 1, 1, 10)),
        ("2026-01-01T10:00:00", utc(2026, 1, 1, 10)),
        ("2026-01-01 10:00:00.123456", utc(2026, 1, 1, 10, 0, 0, 123456)),
        ("2026-01-01T10:00:00.5", utc(2026, 1, 1, 10, 0, 0, 500000)),
        ("2026-01-01T10:00:00Z", utc(2026, 1, 1, 10)),
        ("2026-01-01T01:30:00+02:00", utc(2025, 12, 31, 23, 30)),
        ("2026-01-01 10:00:00.25-05:00", utc(2026, 1, 1, 15, 0, 0, 250000)),
        ("2026-01-01T04:28:03.000000+0000", utc(2026, 1, 1, 4, 28, 3)),
        ("2026-01-01", utc(2026, 1, 1)),
    ],
)
def test_text_timestamps_become_utc(tmp_path: Path, text: str, expected: datetime) -> None:
    path = write_csv(tmp_path / "log.csv", with_cells({(1, "timestamp"): text}))
    df = read_transactions(path)
    assert df["timestamp"][0] == expected
    assert df["timestamp"].dtype == pl.Datetime("us", "UTC")


def test_parquet_naive_timestamps_are_taken_as_utc(tmp_path: Path) -> None:
    raw = _parquet_frame(
        pl.Series([datetime(2026, 3, 1, 12, 0, 0, 123456)], dtype=pl.Datetime("ns"))
    )
    raw.write_parquet(tmp_path / "log.parquet")
    ts = read_transactions(tmp_path / "log.parquet")["timestamp"]
    assert ts.dtype == pl.Datetime("us", "UTC")
    assert ts.to_list() == [utc(2026, 3, 1, 12, 0, 0, 123456)]


def test_parquet_timestamps_in_another_zone_are_converted_to_utc(tmp_path: Path) -> None:
    local = pl.Series([datetime(2026, 7, 1, 12), datetime(2026, 1, 1, 0, 30)])
    raw = _parquet_frame(local.dt.replace_time_zone("Europe/Paris"))
    raw.write_parquet(tmp_path / "log.parquet")
    ts = read_transactions(tmp_path / "log.parquet")["timestamp"]
    assert ts.dtype == pl.Datetime("us", "UTC")
    # Paris is UTC+2 in summer, UTC+1 in winter.
    assert ts.to_list() == [utc(2026, 7, 1, 10), utc(2025, 12, 31, 23, 30)]


def _parquet_frame(timestamp: pl.Series) -> pl.DataFrame:
    n = len(timestamp)
    return pl.DataFrame(
        {
            "transaction_id": list(range(n)),
            "timestamp": timestamp,
            "customer_id": [1] * n,
            "terminal_id": [1] * n,
            "amount": [1.0] * n,
        }
    )


# --- column mapping -----------------------------------------------------------------------------

HANDBOOK_MAP = (
    "timestamp=TX_DATETIME,customer_id=CUSTOMER_ID,terminal_id=TERMINAL_ID,"
    "amount=TX_AMOUNT,is_fraud=TX_FRAUD,transaction_id=TRANSACTION_ID"
)
HANDBOOK_HEADER = (
    "TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_TIME_SECONDS,TX_FRAUD"
)


def test_handbook_names_are_mapped(tmp_path: Path) -> None:
    rows = [
        "0,2018-04-01 00:00:31,596,3156,57.16,31,0",
        "1,2018-04-01 00:02:10,4961,3412,81.51,130,1",
    ]
    path = write_csv(tmp_path / "handbook.csv", rows, HANDBOOK_HEADER)
    df = read_transactions(path, column_map=parse_column_map(HANDBOOK_MAP))
    assert df.columns == [
        "transaction_id",
        "timestamp",
        "customer_id",
        "terminal_id",
        "amount",
        "is_fraud",
        "TX_TIME_SECONDS",
    ]
    assert df.rows() == [
        (0, utc(2018, 4, 1, 0, 0, 31), 596, 3156, 57.16, 0, 31),
        (1, utc(2018, 4, 1, 0, 2, 10), 4961, 3412, 81.51, 1, 130),
    ]


def test_parse_column_map_reads_pairs_and_spaces() -> None:
    assert parse_column_map(" amount = TX_AMOUNT , timestamp=when ") == {
        "amount": "TX_AMOUNT",
        "timestamp": "when",
    }
    assert parse_column_map(None) == {}
    assert parse_column_map("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "amount=TX_AMOUNT,time=TX_DATETIME",
            "--map names unknown canonical column 'time'; expected one of: transaction_id, "
            "timestamp, customer_id, terminal_id, amount, is_fraud",
        ),
        ("amount", "--map expects canonical=source pairs, however got 'amount'"),
        ("amount=", "--map expects canonical=source pairs, however got 'amount='"),
        ("=TX_AMOUNT", "--map expects canonical=source pairs, however got '=TX_AMOUNT'"),
        ("amount=TX_AMOUNT,", "--map expects canonical=source pairs, however got ''"),
    ],
)
def test_bad_column_map_is_a_config_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_column_map(text)
    assert str(info.value) == message


def test_mapping_a_missing_source_column_names_it(tmp_path: Path) -> None:
    rows = ["0,2018-04-01 00:00:31,596,3156,57.16,31,0"]
    path = write_csv(tmp_path / "handbook.csv", rows, HANDBOOK_HEADER)
    with pytest.raises(SchemaError) as info:
        read_transactions(path, column_map={"amount": "AMOUNT"})
    assert str(info.value) == (
        "--map amount=AMOUNT: column `AMOUNT` is not in the file; found columns: "
        "TRANSACTION_ID, TX_DATETIME, CUSTOMER_ID, TERMINAL_ID, TX_AMOUNT, TX_TIME_SECONDS, "
        "TX_FRAUD"
    )


def test_mapping_onto_an_existing_canonical_column_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", ROWS)
    with pytest.raises(SchemaError) as info:
        read_transactions(path, column_map={"customer_id": "channel"})
    assert str(info.value) == "--map customer_id=channel: the file already has `customer_id`"


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), BAD_CSV_CASES)
def test_bad_csv_names_column_rule_and_first_row(
    tmp_path: Path, changes: dict[tuple[int, str], str], message: str
) -> None:
    path = write_csv(tmp_path / "log.csv", with_cells(changes))
    with pytest.raises(DataError) as info:
        read_transactions(path)
    assert str(info.value) == message


def test_missing_column_lists_missing_and_found(tmp_path: Path) -> None:
    header = "transaction_id,timestamp,customer_id,amount_eur,is_fraud"
    path = write_csv(tmp_path / "log.csv", ["1,2026-01-01,c1,5.0,0"], header)
    with pytest.raises(SchemaError) as info:
        read_transactions(path)
    assert str(info.value) == (
        "missing required column(s): `terminal_id`, `amount`; found columns: transaction_id, "
        "timestamp, customer_id, amount_eur, is_fraud (use --map canonical=source to map names)"
    )


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (
            [1.0, float("nan")],
            "`amount` must be a finite number >= 0, however: 1 row is NaN "
            "(first: row 2, amount=nan)",
        ),
        (
            [float("-inf"), 1.0],
            "`amount` must be a finite number >= 0, however: 1 row is infinite "
            "(first: row 1, amount=-inf)",
        ),
        (
            [1.0, None],
            "`amount` must not be empty, however: 1 row is empty (first: row 2)",
        ),
    ],
    ids=["nan", "infinite", "empty"],
)
def test_bad_parquet_amounts(tmp_path: Path, amount: list[float | None], message: str) -> None:
    raw = _parquet_frame(pl.Series([datetime(2026, 1, 1)] * 2)).with_columns(
        amount=pl.Series(amount, dtype=pl.Float64)
    )
    raw.write_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError) as info:
        read_transactions(tmp_path / "log.parquet")
    assert str(info.value) == message


def test_parquet_label_outside_0_1(tmp_path: Path) -> None:
    raw = _parquet_frame(pl.Series([datetime(2026, 1, 1)] * 3)).with_columns(
        is_fraud=pl.Series([0, 1, 2])
    )
    raw.write_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError) as info:
        read_transactions(tmp_path / "log.parquet")
    assert str(info.value) == (
        "`is_fraud` must be 0 or 1, however: 1 row has another value or is empty "
        "(first: row 3, is_fraud=2)"
    )


def test_fractional_float_id(tmp_path: Path) -> None:
    raw = _parquet_frame(pl.Series([datetime(2026, 1, 1)] * 2)).with_columns(
        terminal_id=pl.Series([1.0, 2.5])
    )
    with pytest.raises(DataError) as info:
        validate_transactions(raw)
    assert str(info.value) == (
        "`terminal_id` must be an integer or text id, however: 1 row is fractional "
        "(first: row 2, terminal_id=2.5)"
    )


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_transactions(tmp_path / "nope.csv")
    assert str(info.value) == f"input file {tmp_path / 'nope.csv'} does not exist"
    (tmp_path / "log.txt").write_text(HEADER + "\n")
    with pytest.raises(DataError) as info:
        read_transactions(tmp_path / "log.txt")
    assert str(info.value) == (
        f"input file must end in .csv or .parquet, however got {tmp_path / 'log.txt'}"
    )
