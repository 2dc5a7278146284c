"""A trained run scores with calibrated probabilities: validation predictions, the calibrator
in the bundle, and test scores that are the calibrated raw scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fraudflow.artifacts import load_bundle
from fraudflow.config import RunConfig, TrainConfig
from fraudflow.errors import ArtifactError
from fraudflow.eval.calibration import Calibrator, expected_calibration_error
from fraudflow.eval.metrics import roc_auc
from fraudflow.features import read_feature_table
from fraudflow.train import train_run

pytestmark = pytest.mark.slow

COLUMNS = ["transaction_id", "customer_id", "timestamp", "is_fraud", "score"]


@pytest.fixture(scope="module")
def run(features_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("calibrated") / "gbdt"
    train_run(features_path, run_dir, RunConfig(train=TrainConfig(model="gbdt")))
    return run_dir


def test_scores_are_the_calibrated_raw_scores(run: Path) -> None:
    calibrator = Calibrator.from_dict(load_bundle(run).meta["calibration"])
    # The simulated input names each fraud's scenario, which the test predictions keep.
    test_extra = ["known_compromised", "fraud_scenario"]
    for name, extra in (("predictions", test_extra), ("validation_predictions", [])):
        pred = pl.read_parquet(run / f"{name}.parquet")
        assert pred.columns == [*COLUMNS, *extra, "raw_score"], name
        raw, score = pred["raw_score"].to_numpy(), pred["score"].to_numpy()
        np.testing.assert_allclose(score, calibrator.apply(raw), rtol=1e-12, atol=0)
        # An increasing map: the ranking, hence AUC, is the raw model's.
        assert roc_auc(pred["is_fraud"], score) == roc_auc(pred["is_fraud"], raw)


def test_validation_predictions_cover_the_validation_period(run: Path, features_path: Path) -> None:
    valid = pl.read_parquet(run / "validation_predictions.parquet")
    periods = json.loads((run / "config.json").read_text())["periods"]
    days = valid["timestamp"].dt.date().cast(pl.String)
    assert days.min() == periods["valid_start"] and days.max() < periods["delay_start"]
    table = read_feature_table(features_path).frame
    day = pl.col("timestamp").dt.date().cast(pl.String)
    in_valid = table.filter((day >= periods["valid_start"]) & (day < periods["delay_start"]))
    assert valid.height == in_valid.height
    # The bundle alone reproduces both scores from the feature rows.
    bundle = load_bundle(run)
    rows = in_valid.select(bundle.features).to_numpy().astype(np.float32)
    np.testing.assert_allclose(bundle.predict(rows), valid["raw_score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        bundle.predict_calibrated(rows), valid["score"], rtol=1e-5, atol=1e-6
    )


def test_metrics_report_calibration_error(run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    pred = pl.read_parquet(run / "predictions.parquet").filter(~pl.col("known_compromised"))
    y = pred["is_fraud"].to_numpy()
    assert metrics["expected_calibration_error"] == pytest.approx(
        expected_calibration_error(y, pred["score"].to_numpy())
    )
    assert metrics["expected_calibration_error_raw"] == pytest.approx(
        expected_calibration_error(y, pred["raw_score"].to_numpy())
    )
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert meta["calibration"]["method"] == "platt" and meta["calibration"]["a"] > 0


def test_a_bundle_without_calibration_predicts_raw_scores(run: Path) -> None:
    bundle = load_bundle(run)
    bundle.meta.pop("calibration")
    rows = np.zeros((3, len(bundle.features)), dtype=np.float32)
    np.testing.assert_array_equal(bundle.predict_calibrated(rows), bundle.predict(rows))


def test_an_unreadable_calibration_is_an_artifact_error(run: Path) -> None:
    bundle = load_bundle(run)
    bundle.meta["calibration"] = {"method": "isotonic"}
    with pytest.raises(ArtifactError, match=r"calibration .* is unreadable"):
        bundle.predict_calibrated(np.zeros((1, len(bundle.features)), dtype=np.float32))
