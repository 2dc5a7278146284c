"""End to end on simulated data: features -> train -> run folder -> metrics, and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from fraudflow.artifacts import load_bundle
from fraudflow.cli.main import app
from fraudflow.config import FeatureConfig, RunConfig, SimulationConfig, TrainConfig
from fraudflow.data.simulator import simulate
from fraudflow.errors import ConfigError
from fraudflow.features import (
    build_features,
    load_spec,
    parse_spec,
    read_feature_table,
    write_feature_table,
)
from fraudflow.train import DONE, train_run

pytestmark = pytest.mark.slow

# Test-week average precision each model must beat; the fraud base rate is about 0.7%,
# so 0.4 is about 60 times what random scoring gets.
AP_FLOOR = 0.4
METRIC_KEYS = {
    "roc_auc",
    "average_precision",
    "card_precision_at_100",
    "recall_at_1pct_fpr",
    "train_seconds",
    "train_samples_per_second",
}


def _cfg(model: str, **train: object) -> RunConfig:
    return RunConfig(train=TrainConfig(model=model, **{"epochs": 8, **train}))  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["gbdt", "mlp"])
def test_models_beat_the_ap_floor_and_write_the_run_folder(
    features_path: Path, tmp_path: Path, model: str
) -> None:
    outcome = train_run(features_path, tmp_path / model, _cfg(model))
    run = tmp_path / model
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics.keys() >= METRIC_KEYS
    assert metrics["average_precision"] > AP_FLOOR, metrics
    assert metrics == json.loads(json.dumps(outcome.metrics))
    for name in ("config.json", "predictions.parquet", "report.html", DONE, "model/meta.json"):
        assert (run / name).is_file(), name
    _check_predictions(run, features_path, metrics)


def _check_predictions(run: Path, features_path: Path, metrics: dict[str, object]) -> None:
    pred = pl.read_parquet(run / "predictions.parquet")
    # fraud_scenario: the simulated input names each fraud's scenario (per-scenario metrics).
    assert pred.columns == [
        "transaction_id", "customer_id", "timestamp", "is_fraud", "score", "known_compromised",
        "fraud_scenario", "raw_score",
    ]  # fmt: skip
    periods = metrics["periods"]
    assert isinstance(periods, dict)
    days = pred["timestamp"].dt.date().cast(pl.String)
    assert days.min() == periods["test_start"] and days.max() < periods["test_end"]
    table = read_feature_table(features_path).frame
    in_test = table.filter(pl.col("timestamp").dt.date().cast(pl.String) >= periods["test_start"])
    assert pred.height == in_test.height  # every test-period transaction has a row
    # The bundle alone reproduces the scores from the feature rows.
    bundle = load_bundle(run)
    rows = in_test.select(bundle.features).to_numpy().astype(np.float32)
    np.testing.assert_allclose(
        bundle.predict(rows), pred["raw_score"].to_numpy(), rtol=1e-5, atol=1e-6
    )
    calibrated = bundle.predict_calibrated(rows)
    np.testing.assert_allclose(calibrated, pred["score"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_known_compromised_cards_had_a_fraud_known_before_the_test(
    features_path: Path, tmp_path: Path
) -> None:
    train_run(features_path, tmp_path / "gbdt", _cfg("gbdt"))
    pred = pl.read_parquet(tmp_path / "gbdt" / "predictions.parquet")
    test_start = pred["timestamp"].min()
    table = read_feature_table(features_path).frame
    known_by = test_start - pl.duration(days=7)  # type: ignore[operator]
    known = table.filter((pl.col("is_fraud") == 1) & (pl.col("timestamp") <= known_by))
    expected = pred["customer_id"].is_in(known["customer_id"].unique().implode())
    assert pred["known_compromised"].equals(expected.alias("known_compromised"))
    assert 0 < pred["known_compromised"].sum() < pred.height


def test_existing_run_folder_is_refused_without_resume(features_path: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        train_run(features_path, tmp_path / "run", _cfg("gbdt"))


def _cli_args(features: Path, out: Path, epochs: int) -> list[str]:
    return [
        "train", "--features", str(features), "--model", "mlp", "--out", str(out),
        "--epochs", str(epochs), "--patience", "100", "--batch-size", "512", "--seed", "5",
        "--checkpoint-every-steps", "20",
    ]  # fmt: skip


def test_cuda_graphs_flag_is_refused_on_the_cpu(features_path: Path, tmp_path: Path) -> None:
    args = [*_cli_args(features_path, tmp_path / "run", 1), "--device", "cpu", "--cuda-graphs"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "--cuda-graphs needs a CUDA device (this run trains on cpu)" in said


def _loop_state(run: Path) -> dict[str, int]:
    last = run / "checkpoints" / "last.pt"
    try:
        return dict(torch.load(last, weights_only=False)["loop"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return {"next_epoch": 0, "epoch_offset": 0}


def _mid_epoch(run: Path) -> bool:
    state = _loop_state(run)
    return state["next_epoch"] >= 1 and state["epoch_offset"] > 0


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(
    features_path: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    whole = runner.invoke(app, _cli_args(features_path, tmp_path / "whole", 4))
    assert whole.exit_code == 0, whole.output
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fraudflow", *_cli_args(features_path, killed, 4)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _mid_epoch(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / DONE).exists()
    assert _loop_state(killed)["epoch_offset"] > 0  # the stop was mid-epoch
    resumed = runner.invoke(app, [*_cli_args(features_path, killed, 4), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a = torch.load(tmp_path / "whole" / "model" / "weights.pt", weights_only=True)
    b = torch.load(killed / "model" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    for key in ("roc_auc", "average_precision", "card_precision_at_100", "best_epoch"):
        assert ma[key] == mb[key], key
    losses = [[h["loss"] for h in _history(run)] for run in (tmp_path / "whole", killed)]
    assert losses[0] == losses[1]


def _history(run: Path) -> list[dict[str, float]]:
    return list(torch.load(run / "checkpoints" / "last.pt", weights_only=False)["loop"]["history"])


def test_resume_with_other_settings_is_refused(features_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(app, _cli_args(features_path, tmp_path / "run", 1))
    assert first.exit_code == 0, first.output
    args = [*_cli_args(features_path, tmp_path / "run", 2), "--resume", "--learning-rate", "0.01"]
    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "learning_rate" in again.output


@pytest.mark.parametrize("model", ["gbdt", "mlp"])
def test_a_custom_spec_with_empty_windows_trains_end_to_end(tmp_path: Path, model: str) -> None:
    # Features that are null where their window is empty (no large amount in the last day):
    # LightGBM takes them as missing, the MLP as the training mean.
    sim = SimulationConfig(n_customers=300, n_terminals=600, n_days=60, seed=0)
    raw = {
        "label_delay": "7d",
        "aggregate": [
            {"name": "customer__count", "by": ["customer_id"], "fn": "count", "windows": ["1d"]},
            {"name": "customer__large_mean", "by": ["customer_id"], "fn": "mean", "of": "amount",
             "where": "amount > 150", "windows": ["1d", "7d"]},
            {"name": "terminal__fraud_rate", "by": ["terminal_id"], "fn": "fraud_rate",
             "windows": ["30d"]},
            {"name": "customer__terminals", "by": ["customer_id"], "fn": "count_distinct",
             "of": "terminal_id", "windows": ["last 5"]},
        ],
        "derive": [{"name": "amount_vs_large", "expr": "amount / customer__large_mean__7d"}],
    }  # fmt: skip
    spec = parse_spec(raw)
    frame = build_features(simulate(sim), spec)
    assert frame["customer__large_mean__1d"].null_count() > 0
    path = tmp_path / "features.parquet"
    write_feature_table(frame, path, FeatureConfig(label_delay_days=7), spec=spec)
    outcome = train_run(path, tmp_path / "run", _cfg(model, epochs=2))
    assert (tmp_path / "run" / DONE).is_file()
    assert math.isfinite(outcome.metrics["average_precision"])
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["feature_spec_hash"] == spec.hash and meta["features"] == spec.feature_names
    written = load_spec(tmp_path / "run" / "feature_spec.toml")
    assert written.hash == spec.hash
