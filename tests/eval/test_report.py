"""The HTML report: self-contained, complete, and never half-written."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fraudflow.errors import ArtifactError
from fraudflow.eval.report import comparison_table, load_run, write_report


def _make_run(root: Path, name: str, model: str, seed: int, **extra: object) -> Path:
    rng = np.random.default_rng(seed)
    n = 2_000
    y = (rng.random(n) < 0.05).astype(np.int8)
    start = datetime(2024, 5, 1, tzinfo=UTC)
    pred = pl.DataFrame(
        {
            "transaction_id": np.arange(n),
            "customer_id": [f"c{i}" for i in rng.integers(0, 400, n)],
            "timestamp": [start + timedelta(minutes=int(m)) for m in rng.integers(0, 7 * 1440, n)],
            "is_fraud": pl.Series(y, dtype=pl.Int8),
            "score": np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0, 1),
            "known_compromised": rng.random(n) < 0.1,
        }
    )
    metrics = {
        "model": model,
        "roc_auc": 0.9 + seed / 100,
        "average_precision": 0.5 - seed / 100,
        "card_precision_at_100": 0.2,
        "recall_at_1pct_fpr": 0.4,
        "train_seconds": 10.0 * (seed + 1),
        "train_samples_per_second": 5_000.0 * (seed + 1),
        **extra,
    }
    run_dir = root / name
    run_dir.mkdir(parents=True)
    pred.write_parquet(run_dir / "predictions.parquet")
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    return [
        _make_run(tmp_path / "runs", "gbdt-run", "gbdt", 0),
        _make_run(tmp_path / "runs", "mlp-run", "mlp", 1, card_precision_at_100_per_day=[0.1] * 7),
    ]


def test_report_is_self_contained(two_runs: list[Path], tmp_path: Path) -> None:
    out = write_report(two_runs, tmp_path / "out" / "report.html", title="Q2 <models> & more")
    text = out.read_text(encoding="utf-8")
    assert "gbdt-run" in text and "mlp-run" in text
    assert "Q2 &lt;models&gt; &amp; more" in text
    # PR, ROC, card precision per day, one histogram per run.
    assert text.count("data:image/png;base64,") >= 5
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text


def test_report_highlights_best_values(two_runs: list[Path], tmp_path: Path) -> None:
    text = write_report(two_runs, tmp_path / "r.html").read_text(encoding="utf-8")
    # ROC AUC 0.91 (mlp) beats 0.90; AP 0.50 (gbdt) beats 0.49; 10 train seconds (gbdt) beat 20.
    assert '<td class="best">0.9100</td>' in text
    assert '<td class="best">0.5000</td>' in text
    assert '<td class="best">10.0</td>' in text
    assert '<td class="best">10,000</td>' in text  # samples/s: higher is better


def test_comparison_table_rows(two_runs: list[Path]) -> None:
    rows = comparison_table([load_run(d) for d in two_runs])
    assert [(r["name"], r["model"]) for r in rows] == [("gbdt-run", "gbdt"), ("mlp-run", "mlp")]
    assert rows[1]["roc_auc"] == pytest.approx(0.91)
    assert rows[0]["train_samples_per_second"] == 5_000.0


def test_missing_predictions_names_path_and_writes_nothing(
    two_runs: list[Path], tmp_path: Path
) -> None:
    missing = two_runs[1] / "predictions.parquet"
    missing.unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ArtifactError, match=re.escape(str(missing))):
        write_report(two_runs, out_dir / "report.html")
    assert list(out_dir.iterdir()) == []


def test_failed_report_keeps_previous_report(two_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("previous")
    (two_runs[0] / "metrics.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"cannot read .*metrics\.json"):
        write_report(two_runs, out)
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "runs"]


def test_load_run_missing_metrics_names_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "empty-run"
    run_dir.mkdir()
    with pytest.raises(ArtifactError, match=re.escape(str(run_dir / "metrics.json"))):
        load_run(run_dir)


def test_single_class_run_still_renders(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path, "no-fraud", "mlp", 3, roc_auc=float("nan"))
    pred = pl.read_parquet(run_dir / "predictions.parquet")
    pred.with_columns(pl.lit(0, dtype=pl.Int8).alias("is_fraud")).write_parquet(
        run_dir / "predictions.parquet"
    )
    text = write_report([run_dir], tmp_path / "r.html").read_text(encoding="utf-8")
    assert "n/a" in text  # the NaN ROC AUC


def test_per_scenario_table_shows_each_run_and_scenario(tmp_path: Path) -> None:
    per_scenario = {
        "account_takeover": {
            "n_fraud": 41,
            "recall_at_review_threshold": 0.5,
            "average_precision": 0.25,
        },
        "fraud_ring": {"n_fraud": 7, "recall_at_review_threshold": 1.0, "average_precision": None},
    }
    runs = [
        _make_run(tmp_path, "with", "gbdt", 0, per_scenario=per_scenario, review_threshold=0.125),
        _make_run(tmp_path, "without", "mlp", 1),
    ]
    text = write_report(runs, tmp_path / "report.html").read_text(encoding="utf-8")
    section = text.split("<h2>Per fraud scenario</h2>")[1].split("<h2>")[0]
    rows = re.findall(r"<tr><td>with</td><td>(\w+)</td>(.*?)</tr>", section)
    cells = {name: re.findall(r"<td>([^<]*)</td>", rest) for name, rest in rows}
    assert cells == {
        "account_takeover": ["41", "0.5000", "0.2500", "0.1250"],
        "fraud_ring": ["7", "1.0000", "n/a", "0.1250"],
    }
    assert "<td>without</td>" not in section


def test_no_per_scenario_section_without_scenarios(two_runs: list[Path], tmp_path: Path) -> None:
    text = write_report(two_runs, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Per fraud scenario" not in text
