"""A run on simulated data breaks its metrics down by fraud scenario, and the scenario column,
a label, never reaches the model."""

import json
from pathlib import Path

import polars as pl
import pytest

from fraudflow.config import GBDTConfig, RunConfig, TrainConfig
from fraudflow.data.io import read_parquet_metadata, write_table
from fraudflow.data.simulator import SCENARIOS
from fraudflow.errors import ConfigError
from fraudflow.eval.scenarios import per_scenario_metrics
from fraudflow.eval.thresholds import validation_review_threshold
from fraudflow.train import train_run

# One thread: LightGBM is then bit-for-bit repeatable, which the leakage trap compares.
GBDT = RunConfig(train=TrainConfig(model="gbdt"), gbdt=GBDTConfig(n_estimators=60, num_threads=1))


@pytest.fixture(scope="module")
def run(small_features_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("scenarios") / "run"
    train_run(small_features_path, run_dir, GBDT)
    return run_dir


def test_metrics_hold_per_scenario_figures_of_the_test_predictions(run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    pred = pl.read_parquet(run / "predictions.parquet")
    threshold = validation_review_threshold(
        pl.read_parquet(run / "validation_predictions.parquet"), 100
    )
    assert metrics["review_threshold"] == threshold
    assert metrics["review_budget_cards_per_day"] == 100
    per_scenario = metrics["per_scenario"]
    assert per_scenario == per_scenario_metrics(pred, threshold)
    assert set(per_scenario) <= set(SCENARIOS) and len(per_scenario) >= 3
    counted = pred.filter(~pl.col("known_compromised") & (pl.col("is_fraud") == 1))
    assert sum(v["n_fraud"] for v in per_scenario.values()) == counted.height
    for name, values in per_scenario.items():
        scores = counted.filter(pl.col("fraud_scenario") == name)["score"]
        assert values["recall_at_review_threshold"] == (scores >= threshold).mean()
    assert "<h2>Per fraud scenario</h2>" in (run / "report.html").read_text(encoding="utf-8")


def test_fraud_scenario_is_carried_but_never_a_feature(
    small_features_path: Path, run: Path
) -> None:
    table = pl.read_parquet(small_features_path)
    assert "fraud_scenario" in table.columns
    assert "fraud_scenario" not in read_parquet_metadata(small_features_path)["features"]
    config = json.loads((run / "config.json").read_text())
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert "fraud_scenario" not in config["features"]
    assert "fraud_scenario" not in meta["features"]


def test_scrambled_scenarios_give_the_same_scores(
    small_features_path: Path, run: Path, tmp_path: Path
) -> None:
    """Leakage trap: if the model read the scenario, other names would change its scores."""
    table = pl.read_parquet(small_features_path)
    scrambled = table.with_columns(
        pl.when(pl.col("is_fraud") == 1).then(pl.lit("fraud_ring")).otherwise(pl.lit("x"))
        .alias("fraud_scenario")
    )  # fmt: skip
    path = tmp_path / "scrambled.parquet"
    write_table(scrambled, path, metadata=read_parquet_metadata(small_features_path))
    train_run(path, tmp_path / "run", GBDT)
    before = pl.read_parquet(run / "predictions.parquet")["raw_score"]
    after = pl.read_parquet(tmp_path / "run" / "predictions.parquet")["raw_score"]
    assert after.to_list() == before.to_list()


def test_a_table_listing_the_scenario_as_a_feature_is_refused(
    small_features_path: Path, tmp_path: Path
) -> None:
    meta = read_parquet_metadata(small_features_path)
    meta["features"] = [*meta["features"], "fraud_scenario"]
    path = tmp_path / "leaky.parquet"
    write_table(pl.read_parquet(small_features_path), path, metadata=meta)
    with pytest.raises(ConfigError, match=r"lists label columns as features: \['fraud_scenario'\]"):
        train_run(path, tmp_path / "run", GBDT)
    assert not (tmp_path / "run").exists()
