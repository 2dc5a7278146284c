"""`fraudflow policy calibrate` on a real small run, through Typer's CliRunner."""

from __future__ import annotations

import math
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner, Result

from fraudflow.cli.main import app
from fraudflow.config import RunConfig, TrainConfig
from fraudflow.eval.thresholds import review_cards_per_day
from fraudflow.features import read_feature_table
from fraudflow.train import train_run


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def run_dir(small_features_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("policy") / "gbdt"
    train_run(small_features_path, run, RunConfig(train=TrainConfig(model="gbdt")))
    return run


def _validation_amounts(features: Path, run: Path) -> np.ndarray:
    ids = pl.read_parquet(run / "validation_predictions.parquet")["transaction_id"]
    table = read_feature_table(features).frame
    return table.filter(pl.col("transaction_id").is_in(ids.implode()))["amount"].to_numpy()


def _when(feature: str, above: float) -> dict[str, object]:
    return {"feature": feature, "above": above}


def test_calibrate_writes_the_contract_format(run_dir: Path, small_features_path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    result = invoke("policy", "calibrate", "--run", run_dir, "--review-budget", "100")
    assert result.exit_code == 0, result.output
    assert "review" in result.output and "block" in result.output
    text = (run_dir / "policy.yaml").read_text()
    doc = yaml.safe_load(text)
    assert list(doc) == ["version", "thresholds", "rules", "calibration"]
    assert doc["version"] == 1
    thresholds = doc["thresholds"]
    assert list(thresholds) == ["review", "block"]
    assert 0.0 <= thresholds["review"] <= thresholds["block"] <= 1.0
    amount = math.ceil(np.quantile(_validation_amounts(small_features_path, run_dir), 0.999))

    assert [(r["name"], r["when"], r["action"]) for r in doc["rules"]] == [
        ("large_amount", _when("amount", amount), "review"),
        ("burst", _when("customer__count__1h", 10), "review"),
        ("terminal_with_known_fraud", _when("terminal__fraud_rate__30d", 0.2), "review"),
    ]
    assert all(list(r) == ["name", "when", "action"] for r in doc["rules"])
    _check_calibration(doc["calibration"], run_dir, thresholds["review"], before)
    _check_layout(text)


def _check_calibration(cal: dict[str, object], run: Path, review: float, before: datetime) -> None:
    assert list(cal) == [
        "run", "review_budget_cards_per_day", "block_precision", "validation_days",
        "expected_review_cards_per_day", "expected_block_precision", "expected_block_recall",
        "created",
    ]  # fmt: skip
    assert cal["run"] == str(run.resolve())
    assert (cal["review_budget_cards_per_day"], cal["block_precision"]) == (100, 0.9)
    assert cal["validation_days"] == 7  # SplitConfig().valid_days
    valid = pl.read_parquet(run / "validation_predictions.parquet")
    days = valid["timestamp"].dt.date().to_numpy()
    expected = review_cards_per_day(valid["customer_id"], days, valid["score"], review)
    assert cal["expected_review_cards_per_day"] == pytest.approx(expected)
    assert isinstance(cal["expected_review_cards_per_day"], float) and expected <= 100
    for key in ("expected_block_precision", "expected_block_recall"):
        assert cal[key] is None or 0.0 <= float(cal[key]) <= 1.0  # type: ignore[arg-type]
    created = datetime.fromisoformat(str(cal["created"]))
    assert created.utcoffset() == timedelta(0)
    assert before <= created <= datetime.now(UTC)


def _check_layout(text: str) -> None:
    """Block style at the top, one flow mapping per line, as in the contract."""
    lines = text.splitlines()
    assert lines[0] == "version: 1"
    assert re.fullmatch(r"thresholds: \{review: [0-9.e-]+, block: [0-9.e-]+\}", lines[1])
    assert lines[2] == "rules:"
    assert all(
        re.fullmatch(r"  - \{name: \w+, when: \{.*\}, action: review\}", x) for x in lines[3:6]
    )
    assert lines[6].startswith("calibration: {run: ") and lines[6].endswith("}")
    assert len(lines) == 7


def test_out_option_and_budget(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "deep" / "p.yaml"
    result = invoke("policy", "calibrate", "--run", run_dir, "--review-budget", "5", "--out", out)
    assert result.exit_code == 0, result.output
    cal = yaml.safe_load(out.read_text())["calibration"]
    assert cal["review_budget_cards_per_day"] == 5
    assert cal["expected_review_cards_per_day"] <= 5


def test_missing_run_exits_2(tmp_path: Path) -> None:
    result = invoke("policy", "calibrate", "--run", tmp_path / "nope")
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert not (tmp_path / "nope").exists()


def test_run_without_validation_predictions_asks_to_retrain(run_dir: Path, tmp_path: Path) -> None:
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("validation_predictions.parquet"))
    (old / "policy.yaml").unlink(missing_ok=True)
    result = invoke("policy", "calibrate", "--run", old)
    assert result.exit_code == 2
    assert "retrain it with this version" in re.sub(r"\s+", " ", result.output)
    assert not (old / "policy.yaml").exists()


def test_bad_budget_exits_2_without_writing(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    result = invoke("policy", "calibrate", "--run", run_dir, "--review-budget", "0", "--out", out)
    assert result.exit_code == 2
    assert "--review-budget must be >= 1" in result.output
    assert not out.exists()


def test_the_service_reads_the_written_policy(run_dir: Path, tmp_path: Path) -> None:
    """The contract with fraudflow.serve.policy, checked from its reader's side."""
    serve_policy = pytest.importorskip("fraudflow.serve.policy")
    out = tmp_path / "policy.yaml"
    assert invoke("policy", "calibrate", "--run", run_dir, "--out", out).exit_code == 0
    doc = yaml.safe_load(out.read_text())
    policy = serve_policy.load_policy(out)
    assert (policy.thresholds.review, policy.thresholds.block) == tuple(doc["thresholds"].values())
    assert [rule.name for rule in policy.rules] == [rule["name"] for rule in doc["rules"]]
