"""The Spark backfill reads, checks and writes on the executors, as the Polars engine would."""

import math
import shutil
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from fraudflow.cli.main import app
from fraudflow.config import SimulationConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import read_feature_table

pytest.importorskip("pyspark")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime"),
]


def _features(*args: str) -> tuple[int, str]:
    small = ["--spark-master", "local[2]", "--spark-conf", "spark.sql.shuffle.partitions=4"]
    result = CliRunner().invoke(app, ["features", *args, *small])
    return result.exit_code, " ".join(result.output.split())


def _same_values(ours: pl.DataFrame, theirs: pl.DataFrame) -> None:
    assert ours.schema == theirs.schema
    assert ours["transaction_id"].to_list() == theirs["transaction_id"].to_list()  # same order
    for name in ours.columns:
        for a, b in zip(ours[name].to_list(), theirs[name].to_list(), strict=True):
            if a is None or (isinstance(a, float) and math.isnan(a)):
                assert b is None or math.isnan(b), name
            elif isinstance(a, float):
                assert b == pytest.approx(a, rel=1e-9, abs=1e-6), name
            else:
                assert a == b, name


def test_shards_written_by_the_executors_equal_the_polars_shards(tmp_path: Path) -> None:
    log = simulate(SimulationConfig(n_customers=60, n_terminals=120, n_days=30, seed=5))
    folder = tmp_path / "log"
    folder.mkdir()
    third = log.height // 3
    # Three files, one of them CSV (timestamps as text): read and unified as Polars does.
    log.slice(0, third).write_parquet(folder / "a.parquet")
    log.slice(third, third).with_columns(
        pl.col("timestamp").dt.strftime("%Y-%m-%d %H:%M:%S%.f")
    ).write_csv(folder / "b.csv")
    log.slice(2 * third).write_parquet(folder / "c.parquet")
    outputs = {}
    for engine in ("polars", "spark"):
        out = tmp_path / engine
        code, text = _features(
            "--input", str(tmp_path / "log" / "*"), "--out", str(out), "--engine", engine,
            "--shard-days", "7",
        )  # fmt: skip
        assert code == 0, text
        outputs[engine] = sorted(p.name for p in out.iterdir())
    assert outputs["spark"] == outputs["polars"]
    assert len(outputs["spark"]) == 5  # 30 days in weeks: 4 full, 1 partial
    for name in outputs["spark"]:
        ours = read_feature_table(tmp_path / "polars" / name)
        theirs = read_feature_table(tmp_path / "spark" / name)
        assert theirs.meta == ours.meta
        _same_values(ours.frame, theirs.frame)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_an_id_repeated_across_files_is_the_polars_message_and_exit_2(tmp_path: Path) -> None:
    log = simulate(SimulationConfig(n_customers=10, n_terminals=10, n_days=4, seed=1))
    folder = tmp_path / "log"
    folder.mkdir()
    log.write_parquet(folder / "a.parquet")
    log.slice(3, 2).write_parquet(folder / "b.parquet")  # rows 4 and 5 of a, again
    messages = {}
    for engine in ("polars", "spark"):
        out = tmp_path / f"{engine}.parquet"
        code, text = _features("--input", str(folder), "--out", str(out), "--engine", engine)
        assert code == 2, text
        assert not out.exists()
        messages[engine] = text
    first_id = log["transaction_id"][3]
    expected = (
        "`transaction_id` must be unique, however: 2 values appear more than once "
        f"(first: transaction_id={first_id!r} at rows 4, {log.height + 1})"
    )
    assert expected in messages["polars"]
    assert expected in messages["spark"]


def test_a_bad_file_among_several_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    log = simulate(SimulationConfig(n_customers=10, n_terminals=10, n_days=4, seed=2))
    folder = tmp_path / "log"
    folder.mkdir()
    log.write_parquet(folder / "a.parquet")
    bad = log.slice(0, 5).with_columns(
        pl.col("transaction_id") + 10**9, pl.Series("amount", [1.0, -5.0, 2.0, 3.0, 4.0])
    )
    bad.write_parquet(folder / "b.parquet")
    expected = (
        f"{folder / 'b.parquet'}: `amount` must be >= 0, however: 1 row has amount < 0 "
        "(first: row 2, amount=-5.0)"
    )
    for engine in ("polars", "spark"):
        out = tmp_path / engine
        code, text = _features(
            "--input", str(folder), "--out", str(out), "--engine", engine, "--shard-days", "1"
        )
        assert code == 2, text
        assert expected in text, engine
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


def test_one_output_file_is_streamed_from_ordered_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fraudflow.features import spark_backfill

    log = simulate(SimulationConfig(n_customers=40, n_terminals=80, n_days=20, seed=6))
    log.write_parquet(tmp_path / "log.parquet")
    # Parts of a few thousand rows: the file is the concatenation of several range partitions.
    monkeypatch.setattr(spark_backfill, "_PART_ROWS", log.height // 5 + 1)
    for engine in ("polars", "spark"):
        code, text = _features(
            "--input", str(tmp_path / "log.parquet"), "--out", str(tmp_path / f"{engine}.parquet"),
            "--engine", engine,
        )  # fmt: skip
        assert code == 0, text
    ours = read_feature_table(tmp_path / "polars.parquet")
    theirs = read_feature_table(tmp_path / "spark.parquet")
    assert theirs.meta == ours.meta
    _same_values(ours.frame, theirs.frame)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
