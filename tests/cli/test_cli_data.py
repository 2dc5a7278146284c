"""`fraudflow generate` and `fraudflow features` through Typer's CliRunner.

Each failure must exit with code 2, print the library's message and leave no file behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner, Result

from fraudflow.cli.main import app
from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import FEATURE_VERSION, feature_names, read_feature_table
from tests.data.test_ingest import BAD_CSV_CASES, HEADER, ROWS, with_cells, write_csv

SMALL = ["--customers", "100", "--terminals", "200", "--days", "40"]


def invoke(*args: str | Path) -> Result:
    # A wide console keeps Rich from wrapping the messages we match.
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def assert_fails(result: Result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in one_line(result.stderr)
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "log.parquet"
    result = invoke("generate", "--out", path, *SMALL, "--seed", "3")
    assert result.exit_code == 0, result.output
    return path


# --- generate -----------------------------------------------------------------------------------


def test_generate_writes_parquet_and_reports_counts(generated: Path) -> None:
    frame = pl.read_parquet(generated)
    assert frame.height > 0
    assert frame.columns[:6] == HEADER.split(",")[:6]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_generate_same_seed_same_file_other_seed_other_file(tmp_path: Path, suffix: str) -> None:
    paths = {name: tmp_path / f"{name}{suffix}" for name in ("a", "b", "c")}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        result = invoke("generate", "--out", paths[name], *SMALL, "--seed", seed)
        assert result.exit_code == 0, result.output
        assert f"-> {paths[name]}" in one_line(result.stderr)
    read = pl.read_csv if suffix == ".csv" else pl.read_parquet
    a, b, c = (read(paths[name]) for name in ("a", "b", "c"))
    assert a.equals(b)
    assert not a.equals(c)
    if suffix == ".csv":
        assert paths["a"].read_bytes() == paths["b"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a{suffix}", f"b{suffix}", f"c{suffix}"]


def test_generate_refuses_unknown_suffix(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("generate", "--out", out / "log.txt", *SMALL)
    assert_fails(result, f"output file must end in .parquet or .csv, however got {out / 'log.txt'}")
    assert list(out.iterdir()) == []


# --- features -----------------------------------------------------------------------------------


def test_features_writes_feature_table_with_metadata(generated: Path, tmp_path: Path) -> None:
    out = tmp_path / "features.parquet"
    result = invoke("features", "--input", generated, "--out", out, "--label-delay-days", "3")
    assert result.exit_code == 0, result.output
    table = read_feature_table(out)
    n_rows = pl.read_parquet(generated).height
    assert table.frame.height == n_rows
    assert table.meta["feature_version"] == FEATURE_VERSION
    assert table.label_delay_days == 3
    names = feature_names(FeatureConfig())
    assert table.feature_names == names
    assert set(names) <= set(table.frame.columns)
    assert f"{n_rows:,} rows" in one_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.parquet"]


def test_features_on_csv_with_handbook_names(tmp_path: Path) -> None:
    header = "TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_FRAUD"
    rows = [row.rsplit(",", 1)[0] for row in ROWS]
    log = write_csv(tmp_path / "handbook.csv", rows, header)
    mapping = (
        "timestamp=TX_DATETIME,customer_id=CUSTOMER_ID,terminal_id=TERMINAL_ID,"
        "amount=TX_AMOUNT,is_fraud=TX_FRAUD,transaction_id=TRANSACTION_ID"
    )
    out = tmp_path / "f.parquet"
    result = invoke("features", "--input", log, "--out", out, "--map", mapping)
    assert result.exit_code == 0, result.output
    frame = read_feature_table(out).frame
    assert frame["transaction_id"].to_list() == [1, 2, 3, 4]
    assert frame["amount"].to_list() == [10.5, 20.0, 5.25, 99.99]


@pytest.mark.parametrize(("changes", "message"), BAD_CSV_CASES)
def test_features_on_bad_csv_fails_cleanly(
    tmp_path: Path, changes: dict[tuple[int, str], str], message: str
) -> None:
    log = write_csv(tmp_path / "log.csv", with_cells(changes))
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("features", "--input", log, "--out", out / "f.parquet")
    assert_fails(result, message)
    assert list(out.iterdir()) == []


def test_features_missing_column(tmp_path: Path) -> None:
    header = "transaction_id,timestamp,customer_id,terminal,amount"
    log = write_csv(tmp_path / "log.csv", ["1,2026-01-01,c1,t1,5.0"], header)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("features", "--input", log, "--out", out / "f.parquet")
    assert_fails(
        result,
        "missing required column(s): `terminal_id`; found columns: transaction_id, timestamp, "
        "customer_id, terminal, amount (use --map canonical=source to map names)",
    )
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--input", "{tmp}/missing.csv", "--out", "{tmp}/out/f.parquet"],
            "input file {tmp}/missing.csv does not exist",
        ),
        (
            ["--input", "{tmp}/log.csv", "--out", "{tmp}/out/f.csv"],
            "--out must be a .parquet file, however got {tmp}/out/f.csv",
        ),
        (
            ["--input", "{tmp}/log.csv", "--out", "{tmp}/out/f.parquet", "--map", "amount"],
            "--map expects canonical=source pairs, however got 'amount'",
        ),
        (
            ["--input", "{tmp}/log.csv", "--out", "{tmp}/out/f.parquet", "--map", "cost=amount"],
            "--map names unknown canonical column 'cost'; expected one of: transaction_id, "
            "timestamp, customer_id, terminal_id, amount, is_fraud",
        ),
        (
            ["--input", "{tmp}/log.csv", "--out", "{tmp}/out/f.parquet", "--map", "amount=cost"],
            "--map amount=cost: column `cost` is not in the file; found columns: "
            "transaction_id, timestamp, customer_id, terminal_id, amount, is_fraud, channel",
        ),
    ],
    ids=["missing-input", "out-not-parquet", "map-malformed", "map-unknown", "map-no-source"],
)
def test_features_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    write_csv(tmp_path / "log.csv", ROWS)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("features", *(a.format(tmp=tmp_path) for a in args))
    assert_fails(result, message.format(tmp=tmp_path))
    assert list(out.iterdir()) == []


def test_failed_features_leaves_existing_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "f.parquet"
    out.write_bytes(b"previous")
    log = write_csv(tmp_path / "log.csv", with_cells({(2, "amount"): "-1"}))
    result = invoke("features", "--input", log, "--out", out)
    assert result.exit_code == 2
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.parquet", "log.csv"]


def test_error_message_quoting_markup_like_input_is_printed_verbatim(tmp_path: Path) -> None:
    log = write_csv(tmp_path / "log.csv", with_cells({(2, "amount"): "[/x]"}))
    result = invoke("features", "--input", log, "--out", tmp_path / "f.parquet")
    assert_fails(
        result,
        "`amount` must be a number, however: 1 row is not a number (first: row 2, amount='[/x]')",
    )


def test_a_log_too_large_for_the_memory_is_refused_before_the_work(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    simulate(SimulationConfig(n_customers=20, n_terminals=20, n_days=10, seed=0)).write_parquet(log)
    out = tmp_path / "f.parquet"
    args = ["features", "--input", str(log), "--out", str(out), "--memory-limit"]
    refused = CliRunner().invoke(app, [*args, "100MiB"])
    assert refused.exit_code == 2
    text = " ".join(refused.output.split())
    assert "with the Polars engine, however 0.10 GiB is the limit: use --engine spark" in text
    assert not out.exists()
    assert CliRunner().invoke(app, [*args, "4GiB"]).exit_code == 0
    assert out.exists()
    bad = CliRunner().invoke(app, [*args, "lots"])
    assert bad.exit_code == 2
    assert "a memory size must look like 16GiB or 512MiB, however got 'lots'" in bad.output
