"""`fraudflow features` then `fraudflow train` with a spec that has a categorical column: codes
learned on the fit rows only, stored in the bundle, and the bundle scores raw values."""

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from fraudflow.artifacts import load_bundle
from fraudflow.cli.main import app
from fraudflow.config import SimulationConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import read_feature_table
from fraudflow.features.categories import UNSEEN

SPEC = """\
label_delay = "7d"

[[column]]
name = "merchant_category"
kind = "categorical"

[[column]]
name = "amount"

[[aggregate]]
name = "customer__categories"
by = ["customer_id"]
fn = "count_distinct"
of = "merchant_category"
windows = ["7d"]

[[aggregate]]
name = "category__fraud_rate"
by = ["merchant_category"]
fn = "fraud_rate"
windows = ["30d"]
"""

# A category that appears only in the last 18 days: validation, delay and test, never in fit.
LATE = "late"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("categorical")
    log = simulate(SimulationConfig(n_customers=300, n_terminals=600, n_days=60, seed=0))
    late_from = log["timestamp"].max() - timedelta(days=18)  # type: ignore[operator]
    category = (
        pl.when(pl.col("timestamp") >= late_from)
        .then(pl.lit(LATE))
        .otherwise(pl.format("mcc{}", pl.col("terminal_id").cast(pl.Int64) % 8))
    )
    log.with_columns(category.alias("merchant_category")).write_parquet(folder / "log.parquet")
    (folder / "spec.toml").write_text(SPEC)
    return folder


def _features(folder: Path, out: str, *more: str) -> Path:
    args = ["features", "--input", str(folder / "log.parquet"), "--out", str(folder / out)]
    result = CliRunner().invoke(app, [*args, "--spec", str(folder / "spec.toml"), *more])
    assert result.exit_code == 0, result.output
    return folder / out


@pytest.fixture(scope="module")
def table(log: Path) -> Path:
    return _features(log, "features.parquet")


def _train(table: Path, run: Path, model: str) -> None:
    args = ["train", "--features", str(table), "--model", model, "--out", str(run)]
    args += ["--epochs", "2", "--seed", "1", "--set", "gbdt.n_estimators=50"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("model", ["gbdt", "mlp"])
def test_train_learns_codes_on_fit_rows_and_the_bundle_scores_raw_values(
    table: Path, tmp_path: Path, model: str
) -> None:
    run = tmp_path / model
    _train(table, run, model)
    config = json.loads((run / "config.json").read_text())
    frame = read_feature_table(table).frame
    late_days = frame.filter(pl.col("merchant_category") == LATE)["timestamp"].dt.date()
    assert str(late_days.min()) >= config["periods"]["valid_start"]  # the test's premise

    bundle = load_bundle(run)
    assert bundle.codes is not None
    coded = bundle.codes.values["merchant_category"]
    assert sorted(coded) == [f"mcc{i}" for i in range(8)]  # every fit value, not "late"
    assert bundle.codes.encode("merchant_category", [LATE]).tolist() == [UNSEEN]
    assert [c.position for c in bundle.categorical] == [0]

    # The bundle alone, from raw values, reproduces the run's scores: the validation rows
    # hold fit values and the late one, the test rows only the late one.
    for name in ("validation_predictions.parquet", "predictions.parquet"):
        predictions = pl.read_parquet(run / name).select("transaction_id", "raw_score")
        rows = predictions.join(frame, on="transaction_id", how="left")
        raw = rows.select(bundle.features).rows()  # categorical values as logged (strings)
        np.testing.assert_allclose(
            bundle.predict(raw), rows["raw_score"].to_numpy(), rtol=1e-5, atol=1e-6
        )
    assert LATE in rows["merchant_category"].to_list()

    # A value never seen, a null and the late value all score as the unseen code.
    row = list(raw[0])
    variants = [[value, *row[1:]] for value in (LATE, None, "never-seen", coded[0])]
    matrix = bundle.model_matrix(variants)
    assert matrix[:, 0].tolist() == [UNSEEN, UNSEEN, UNSEEN, 1]
    scores = bundle.predict(variants)
    assert scores[0] == scores[1] == scores[2]


def test_a_folder_of_shards_trains_the_mlp_with_the_same_codes(
    log: Path, table: Path, tmp_path: Path
) -> None:
    shards = _features(log, "shards", "--shard-days", "10")
    _train(shards, tmp_path / "sharded", "mlp")
    _train(table, tmp_path / "whole", "mlp")
    sharded, whole = load_bundle(tmp_path / "sharded"), load_bundle(tmp_path / "whole")
    assert sharded.codes == whole.codes and sharded.codes is not None
    for moment in ("mean", "std"):  # over the numeric features only, both ways
        got, expected = sharded.meta["standardizer"][moment], whole.meta["standardizer"][moment]
        assert len(got) == len(whole.features) - 1
        np.testing.assert_allclose(got, expected, rtol=1e-4)
