"""The Spark engine against the Polars engine: the same spec, the same values."""

import math
import random
import shutil
from collections.abc import Iterator

import polars as pl
import pytest

from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import FeatureSpec, build_features, default_spec, parse_spec
from tests.helpers.random_specs import random_log, random_spec

pyspark = pytest.importorskip("pyspark")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime"),
]


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    from pyspark.sql import SparkSession

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


@pytest.mark.parametrize("seed", range(8))
def test_random_specs_give_the_polars_values(spark: object, seed: int) -> None:
    rng = random.Random(seed)
    log, spec = random_log(rng, 80), parse_spec(random_spec(rng))
    _assert_same(build_features(log, spec), _on_spark(spark, log, spec), spec)
