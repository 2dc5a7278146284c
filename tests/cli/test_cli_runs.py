"""`fraudflow train` records into MLflow; `fraudflow runs list|compare` read it back.

All through Typer's CliRunner, against the suite's temporary store, in an experiment of this
module's own so that the listing holds exactly the runs trained here.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner, Result

from fraudflow.artifacts import MANIFEST, check_run
from fraudflow.cli.main import app
from fraudflow.errors import RunCheckError
from fraudflow.tracking import TrackingConfig, list_runs

EXPERIMENT = "test-cli-runs"
EPOCHS = 2


@dataclass(frozen=True)
class Trained:
    runs: Path
    ids: dict[str, str]  # run folder name -> MLflow run id
    quiet: Result  # the run with --no-track --metrics-port 0


def invoke(*args: str | Path, experiment: str = EXPERIMENT) -> Result:
    # A wide console keeps Rich from wrapping the lines we match.
    env = {"COLUMNS": "300", "MLFLOW_EXPERIMENT_NAME": experiment}
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def train(features: Path, out: Path, model: str, *extra: str) -> Result:
    args = ["train", "--features", features, "--model", model, "--out", out]
    args += ["--epochs", str(EPOCHS), "--patience", "100", "--device", "cpu", *extra]
    return invoke(*args)


def store(tracking_uri: str, experiment: str = EXPERIMENT) -> TrackingConfig:
    return TrackingConfig(enabled=True, tracking_uri=tracking_uri, experiment=experiment)


@pytest.fixture(scope="module")
def trained(
    small_features_path: Path, tmp_path_factory: pytest.TempPathFactory, tracking_uri: str
) -> Trained:
    runs = tmp_path_factory.mktemp("runs")
    quiet = ["--no-track", "--metrics-port", "0"]
    plan = [("mlp", "mlp", []), ("gbdt", "gbdt", []), ("quiet", "mlp", quiet)]
    results = {name: train(small_features_path, runs / name, m, *flags) for name, m, flags in plan}
    for result in results.values():
        assert result.exit_code == 0, result.output
    ids = {row["name"]: row["run_id"] for row in list_runs(store(tracking_uri))}
    return Trained(runs=runs, ids=ids, quiet=results["quiet"])


def test_train_records_params_epochs_final_metrics_and_artifacts(
    trained: Trained, small_features_path: Path, tracking_uri: str
) -> None:
    client = MlflowClient(tracking_uri)
    run = client.get_run(trained.ids["mlp"])
    params = run.data.params
    assert (params["train.model"], params["train.epochs"]) == ("mlp", str(EPOCHS))
    digest = hashlib.sha256(small_features_path.read_bytes()).hexdigest()
    assert params["data_fingerprint"] == f"sha256:{digest}"
    assert params["features_path"] == str(small_features_path.resolve())
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", params["git_commit"])
    assert run.data.tags["fraudflow.run_dir"] == str((trained.runs / "mlp").resolve())
    metrics = json.loads((trained.runs / "mlp" / "metrics.json").read_text())
    for key in ("epoch_loss", "epoch_validation_average_precision", "epoch_samples_per_second"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(metrics["epochs_run"])) == [0, 1], key
    _assert_final_metrics_and_artifacts(client, trained.ids["mlp"], metrics)


def test_gbdt_without_epochs_still_records_a_run(trained: Trained, tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    run = client.get_run(trained.ids["gbdt"])
    assert run.data.params["train.model"] == "gbdt"
    assert not any(key.startswith("epoch_") for key in run.data.metrics)
    metrics = json.loads((trained.runs / "gbdt" / "metrics.json").read_text())
    _assert_final_metrics_and_artifacts(client, trained.ids["gbdt"], metrics)


def _assert_final_metrics_and_artifacts(
    client: MlflowClient, run_id: str, metrics: dict[str, object]
) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    numeric = {
        k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    final = {k: v for k, v in run.data.metrics.items() if not k.startswith("epoch_")}
    assert final == pytest.approx(numeric, rel=1e-12)
    assert {"report.html", "metrics.json", "config.json", "model"} <= {
        a.path for a in client.list_artifacts(run_id)
    }
    assert "model/meta.json" in {a.path for a in client.list_artifacts(run_id, "model")}


def test_no_track_records_nothing(trained: Trained) -> None:
    assert (trained.runs / "quiet" / "DONE").is_file()
    assert sorted(trained.ids) == ["gbdt", "mlp"]
    assert "MLflow run" not in trained.quiet.stderr


def test_metrics_port_serves_while_training(trained: Trained) -> None:
    assert re.search(r"Prometheus metrics: http://127\.0\.0\.1:\d+/metrics", trained.quiet.stderr)


def test_a_failed_training_is_recorded_as_failed(
    small_features_path: Path, tmp_path: Path, tracking_uri: str
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("")
    result = invoke(
        "train", "--features", small_features_path, "--model", "gbdt", "--out", out,
        experiment="test-cli-runs-failed",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "already holds a run" in one_line(result.stderr)
    rows = list_runs(store(tracking_uri, "test-cli-runs-failed"))
    assert [(r["name"], r["status"]) for r in rows] == [("taken", "FAILED")]


def test_runs_list_shows_the_runs_newest_first(trained: Trained) -> None:
    result = invoke("runs", "list")
    assert result.exit_code == 0, result.output
    lines = [one_line(line) for line in result.stdout.splitlines()]
    rows = [line for line in lines if line.startswith("│")]
    assert [row.split()[1] for row in rows] == [trained.ids["gbdt"][:8], trained.ids["mlp"][:8]]
    assert all("FINISHED" in row for row in rows)


def test_runs_compare_shows_both_runs_with_their_ap(trained: Trained) -> None:
    result = invoke("runs", "compare", trained.ids["mlp"], trained.ids["gbdt"][:8])
    assert result.exit_code == 0, result.output
    text = one_line(result.stdout)
    for name in ("mlp", "gbdt"):
        ap = json.loads((trained.runs / name / "metrics.json").read_text())["average_precision"]
        assert f"{trained.ids[name][:8]} │ {name} │ {name}" in text
        assert f"{ap:.4f}" in text
    assert "parameters that differ" in text and "train.model" in text


def test_runs_compare_unknown_id_exits_2(trained: Trained, tracking_uri: str) -> None:
    result = invoke("runs", "compare", trained.ids["mlp"], "nosuchrun")
    assert result.exit_code == 2
    expected = (
        f"error: no run 'nosuchrun' in experiment '{EXPERIMENT}' at {tracking_uri}; "
        "`fraudflow runs list` shows the recorded runs"
    )
    assert expected in one_line(result.stderr)
    assert "Traceback" not in result.output


def test_runs_compare_needs_two_ids() -> None:
    result = invoke("runs", "compare", "abc")
    assert result.exit_code == 2
    assert "needs two or more run ids, however got 1" in one_line(result.stderr)


def test_runs_list_of_an_empty_experiment_exits_2(tracking_uri: str) -> None:
    result = invoke("runs", "list", experiment="test-cli-runs-empty")
    assert result.exit_code == 2
    expected = (
        f"error: no runs recorded in experiment 'test-cli-runs-empty' at {tracking_uri}; "
        "`fraudflow train` records one"
    )
    assert expected in one_line(result.stderr)


def test_runs_seal_records_the_hashes_of_a_bundle_saved_without_them(
    trained: Trained, tmp_path: Path
) -> None:
    run = tmp_path / "old"
    shutil.copytree(trained.runs / "mlp", run)
    recorded = json.loads((run / "model" / MANIFEST).read_text())["sha256"]
    assert sorted(recorded) == ["meta.json", "weights.pt"]  # what training wrote
    (run / "model" / MANIFEST).unlink()  # as a bundle saved before hashes were recorded
    with pytest.raises(RunCheckError, match="records no SHA-256 of its files"):
        check_run(run)
    result = invoke("runs", "seal", run)
    assert result.exit_code == 0, result.output
    assert f"recorded the SHA-256 of meta.json, weights.pt in {run / 'model'}" in one_line(
        result.stderr
    )
    assert json.loads((run / "model" / MANIFEST).read_text())["sha256"] == recorded
    check_run(run)
    missing = invoke("runs", "seal", tmp_path / "nope")
    assert missing.exit_code == 2 and "model bundle" in one_line(missing.stderr)
