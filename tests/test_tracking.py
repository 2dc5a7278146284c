"""MLflow tracking against a temporary SQLite store: what a run records, and reading it back."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from fraudflow import tracking
from fraudflow.errors import ArtifactError, DataError
from fraudflow.tracking import (
    NullTracker,
    Tracker,
    TrackingConfig,
    compare_runs,
    data_fingerprint,
    list_runs,
    open_tracker,
    resolve_tracking_config,
    run_params,
)

CONFIG = {
    "split": {"train_start": None, "valid_days": 7},
    "train": {"model": "mlp", "hidden_sizes": [256, 128], "compile": False, "learning_rate": 1e-3},
}
METRICS = {
    "model": "mlp",
    "roc_auc": 0.91,
    "average_precision": 0.42,
    "card_precision_at_100": 0.3,
    "recall_at_1pct_fpr": 0.5,
    "train_seconds": 12.5,
    "train_samples_per_second": 1000.0,
    "best_epoch": 1,
    "device": "cpu",
    "periods": {"test_start": "2026-03-01"},
}
# sha256 of b"abc" (FIPS 180-2, appendix B.1).
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.fixture
def cfg(tracking_uri: str, tmp_path: Path) -> TrackingConfig:
    """The session's store, with an experiment of this test's own."""
    return TrackingConfig(
        enabled=True,
        tracking_uri=tracking_uri,
        experiment=f"test-{uuid.uuid4().hex[:8]}",
        artifact_location=(tmp_path / "artifacts").as_uri(),
        project_dir=tmp_path,
    )


@pytest.fixture
def features(tmp_path: Path) -> Path:
    path = tmp_path / "features.parquet"
    path.write_bytes(b"abc")
    return path


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for name, text in [
        ("report.html", "<html></html>"),
        ("metrics.json", json.dumps(METRICS)),
        ("config.json", json.dumps(CONFIG)),
        ("model/meta.json", "{}"),
    ]:
        (run / name).write_text(text)
    return run


def _track(cfg: TrackingConfig, features: Path, run_dir: Path, name: str = "run") -> str:
    tracker = Tracker(cfg)
    with tracker:
        tracker.start(CONFIG, features_path=features, run_name=name)
        for epoch, (loss, ap) in enumerate([(0.5, 0.2), (0.4, 0.3), (0.35, 0.25)]):
            tracker.log_epoch(epoch, loss, ap, 1000.0 + epoch)
        tracker.finish(METRICS, run_dir)
    assert tracker.run_id is not None
    return tracker.run_id


# --- where the store is ----------------------------------------------------------------------


def test_default_store_is_sqlite_under_the_project(tmp_path: Path) -> None:
    cfg = resolve_tracking_config(tmp_path)
    assert cfg.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert cfg.artifact_location == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()
    assert (cfg.enabled, cfg.experiment, cfg.project_dir) == (True, "fraudflow", tmp_path)


def test_the_environment_uri_wins(tmp_path: Path) -> None:
    server = resolve_tracking_config(tmp_path, env_uri="http://mlflow:5000", experiment="fraud")
    assert (server.tracking_uri, server.artifact_location) == ("http://mlflow:5000", None)
    assert server.experiment == "fraud"
    # A local SQLite store keeps its artifacts beside its database.
    local = resolve_tracking_config(tmp_path, env_uri=f"sqlite:///{tmp_path}/x/db.sqlite")
    assert local.artifact_location == (tmp_path / "x" / "artifacts").as_uri()


# --- what a run records ----------------------------------------------------------------------


def test_run_params_flatten_the_config_and_name_data_and_code(
    tmp_path: Path, features: Path
) -> None:
    params = run_params(CONFIG, features, project_dir=tmp_path)
    assert params == {
        "split.train_start": "null",
        "split.valid_days": "7",
        "train.model": "mlp",
        "train.hidden_sizes": "[256, 128]",
        "train.compile": "false",
        "train.learning_rate": "0.001",
        "features_path": str(features.resolve()),
        "data_fingerprint": f"sha256:{SHA256_ABC}",
        "git_commit": "unknown",  # tmp_path is not in a git repository
    }


def test_fingerprint_of_a_shard_folder_follows_content_not_place(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "part-00000.parquet").write_bytes(b"abc")
    (folder / "part-00001.parquet").write_bytes(b"def")
    manifest = f"part-00000.parquet  {SHA256_ABC}\npart-00001.parquet  "
    manifest += hashlib.sha256(b"def").hexdigest() + "\n"
    expected = f"sha256:{hashlib.sha256(manifest.encode()).hexdigest()}"
    assert data_fingerprint(folder) == expected
    assert data_fingerprint(shutil.copytree(folder, tmp_path / "b")) == expected
    (folder / "part-00001.parquet").write_bytes(b"dEf")
    assert data_fingerprint(folder) != expected


def test_missing_feature_table_fails_before_a_run_exists(tmp_path: Path) -> None:
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match=r"feature table .*nope\.parquet does not exist"):
        data_fingerprint(missing)


def test_tracker_records_params_epochs_metrics_and_artifacts(
    cfg: TrackingConfig, features: Path, tmp_path: Path
) -> None:
    run_id = _track(cfg, features, _run_dir(tmp_path))
    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == run_params(CONFIG, features, project_dir=tmp_path)
    assert run.data.tags["mlflow.source.git.commit"] == "unknown"
    history = client.get_metric_history(run_id, "epoch_loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.4), (2, 0.35)]
    numeric = {k: v for k, v in METRICS.items() if isinstance(v, int | float)}
    final = {k: v for k, v in run.data.metrics.items() if not k.startswith("epoch_")}
    assert final == numeric
    root = {a.path for a in client.list_artifacts(run_id)}
    assert root == {"report.html", "metrics.json", "config.json", "model"}
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/meta.json"]


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_an_exception_ends_the_run_failed_or_killed(
    cfg: TrackingConfig, features: Path, error: type[BaseException], status: str
) -> None:
    tracker = Tracker(cfg)
    with pytest.raises(error), tracker:
        tracker.start(CONFIG, features_path=features, run_name="broken")
        raise error("stopped")
    assert MlflowClient(cfg.tracking_uri).get_run(str(tracker.run_id)).info.status == status


def test_null_tracker_records_nothing(cfg: TrackingConfig, features: Path, tmp_path: Path) -> None:
    tracker = open_tracker(TrackingConfig(enabled=False, tracking_uri=cfg.tracking_uri))
    assert isinstance(tracker, NullTracker)
    with tracker:
        tracker.start(CONFIG, features_path=features, run_name="x")
        tracker.log_epoch(0, 0.5, 0.2, 10.0)
        tracker.finish(METRICS, _run_dir(tmp_path))
    assert tracker.run_id is None
    assert list_runs(cfg) == []


# --- reading runs back -----------------------------------------------------------------------


def test_list_and_compare_runs(cfg: TrackingConfig, features: Path, tmp_path: Path) -> None:
    first = _track(cfg, features, _run_dir(tmp_path / "1"), name="first")
    second = _track(cfg, features, _run_dir(tmp_path / "2"), name="second")
    rows = list_runs(cfg)
    assert [(r["run_id"], r["name"], r["status"]) for r in rows] == [
        (second, "second", "FINISHED"),
        (first, "first", "FINISHED"),
    ]
    assert rows[0]["model"] == "mlp"
    assert rows[0]["average_precision"] == METRICS["average_precision"]
    compared = compare_runs(cfg, [first[:10], second])
    assert [r["run_id"] for r in compared] == [first, second]


def test_compare_unknown_id_names_the_store(cfg: TrackingConfig) -> None:
    message = (
        f"no run 'abc' in experiment '{cfg.experiment}' at {cfg.tracking_uri}; "
        "`fraudflow runs list` shows the recorded runs"
    )
    with pytest.raises(ArtifactError) as raised:
        compare_runs(cfg, ["abc"])
    assert str(raised.value) == message


def test_compare_ambiguous_prefix(cfg: TrackingConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[dict[str, Any]] = [{"run_id": "abc1"}, {"run_id": "abc2"}]
    monkeypatch.setattr(tracking, "list_runs", lambda cfg, max_results: rows)
    assert compare_runs(cfg, ["abc2", "abc1"]) == [rows[1], rows[0]]
    with pytest.raises(ArtifactError, match=r"prefix 'abc' is ambiguous: it matches 2 runs"):
        compare_runs(cfg, ["abc"])


def test_listing_a_store_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    cfg = resolve_tracking_config(tmp_path)
    assert list_runs(cfg) == []
    assert not (tmp_path / "mlruns").exists()
