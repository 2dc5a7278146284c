"""The Spark engine against the Polars engine: the same spec, the same values."""

import math
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from fraudflow.cli.main import app
from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import (
    FeatureSpec,
    build_features,
    default_spec,
    parse_spec,
    read_feature_table,
)
from tests.helpers.random_specs import random_log, random_spec

pyspark = pytest.importorskip("pyspark")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime"),
]


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    from pyspark.sql import SparkSession

    # As ``spark_session`` does: the backfill's executor tasks import fraudflow, and the CLI
    # test reuses this running context, whose workers are this interpreter only if set here.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("fraudflow-tests")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def _on_spark(spark: object, log: pl.DataFrame, spec: FeatureSpec) -> pl.DataFrame:
    from fraudflow.features.spark import ROW, build_features_spark

    table = log.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.Int64)).to_arrow()
    frame = spark.createDataFrame(table)  # type: ignore[attr-defined]
    return pl.from_arrow(build_features_spark(frame, spec).toArrow())  # type: ignore[return-value]


def _assert_same(ours: pl.DataFrame, theirs: pl.DataFrame, spec: FeatureSpec) -> None:
    assert ours.columns == theirs.columns
    assert ours["transaction_id"].to_list() == theirs["transaction_id"].to_list()  # same order
    stds = {a.feature_name(w) for a in spec.aggregates if a.fn == "std" for w in a.windows}
    for name in spec.feature_names:
        for row, (a, b) in enumerate(
            zip(ours[name].to_list(), theirs[name].to_list(), strict=True)
        ):
            where = f"{name}, row {row}: polars {a}, spark {b}"
            if a is None or (isinstance(a, float) and math.isnan(a)):
                assert b is None or math.isnan(b), where
                continue
            # std from sums of squares: rounding of about sqrt(eps) of the values' scale.
            assert b == pytest.approx(a, rel=1e-9, abs=1e-6 if name in stds else 1e-12), where


def test_the_default_spec_on_simulated_data(spark: object) -> None:
    log = simulate(SimulationConfig(n_customers=150, n_terminals=300, n_days=40, seed=3))
    spec = default_spec(FeatureConfig())
    _assert_same(build_features(log, spec), _on_spark(spark, log, spec), spec)


def test_the_v2_block_on_simulated_data(spark: object) -> None:
    """count_above and the other v2 functions over amounts in cents, as the simulator's."""
    log = simulate(SimulationConfig(n_customers=100, n_terminals=200, n_days=40, seed=5))
    spec = default_spec(FeatureConfig(), v2=True)
    ours = build_features(log, spec)
    assert ours["customer__count_above_typical__7d"].max() > 0  # the case is exercised
    _assert_same(ours, _on_spark(spark, log, spec), spec)


@pytest.mark.parametrize("seed", range(8))
def test_random_specs_give_the_polars_values(spark: object, seed: int) -> None:
    rng = random.Random(seed)
    log, spec = random_log(rng, 80), parse_spec(random_spec(rng))
    _assert_same(build_features(log, spec), _on_spark(spark, log, spec), spec)


def test_features_command_on_spark_writes_what_polars_writes(tmp_path: Path) -> None:
    log = simulate(SimulationConfig(n_customers=80, n_terminals=160, n_days=30, seed=4))
    folder = tmp_path / "log"
    folder.mkdir()
    half = log.height // 2
    log.slice(0, half).write_parquet(folder / "part-0.parquet")  # a folder of two files
    log.slice(half).write_parquet(folder / "part-1.parquet")
    outputs = {}
    for engine in ("polars", "spark"):
        out = tmp_path / f"{engine}.parquet"
        args = ["features", "--input", str(folder), "--out", str(out), "--engine", engine,
                "--spark-master", "local[2]"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        outputs[engine] = read_feature_table(out)
    polars_table, spark_table = outputs["polars"], outputs["spark"]
    assert spark_table.meta == polars_table.meta
    assert spark_table.frame.schema == polars_table.frame.schema
    spec = default_spec(FeatureConfig())
    _assert_same(polars_table.frame, spark_table.frame, spec)


def test_a_bad_spark_set_up_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "log.parquet"
    simulate(SimulationConfig(n_customers=5, n_terminals=5, n_days=2, seed=0)).write_parquet(log)
    base = [
        "features",
        "--input",
        str(log),
        "--out",
        str(tmp_path / "f.parquet"),
        "--engine",
        "spark",
    ]
    unreachable = CliRunner().invoke(app, [*base, "--spark-master", "spark://127.0.0.1:9"])
    assert unreachable.exit_code == 2
    assert "cannot reach the Spark master spark://127.0.0.1:9" in " ".join(
        unreachable.output.split()
    )
    monkeypatch.setenv("PATH", str(tmp_path))  # no java there
    monkeypatch.delenv("JAVA_HOME", raising=False)
    no_java = CliRunner().invoke(app, [*base, "--spark-master", "local[2]"])
    assert no_java.exit_code == 2
    assert "the Spark engine needs a Java runtime (17 or newer)" in " ".join(no_java.output.split())
    assert not (tmp_path / "f.parquet").exists()
