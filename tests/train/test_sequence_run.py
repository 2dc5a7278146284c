"""`fraudflow train --model transformer` end to end: the run folder, a bundle that scores its
test rows again identically from the feature table, the point-in-time trap on scores, and the
service's run check accepting it (served: tests/serve/test_sequence_serving.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from fraudflow.artifacts import check_run, load_bundle
from fraudflow.cli.main import app
from fraudflow.errors import ArtifactError
from fraudflow.features import read_feature_table
from fraudflow.models import SequenceInputs
from fraudflow.train import DONE

pytestmark = pytest.mark.slow

TINY = [
    "model.transformer.sequence_length=8", "model.transformer.d_model=16",
    "model.transformer.n_layers=1", "model.transformer.n_heads=2",
    "model.transformer.feedforward_dim=32",
]  # fmt: skip


def _args(features: Path, run: Path, *extra: str) -> list[str]:
    return [
        "train", "--features", str(features), "--model", "transformer", "--out", str(run),
        "--epochs", "1", "--batch-size", "1024", "--device", "cpu", "--no-track",
        *(a for item in TINY for a in ("--set", item)), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def transformer_run(small_features_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("transformer") / "run"
    result = CliRunner().invoke(app, _args(small_features_path, run))
    assert result.exit_code == 0, result.output
    return run


def test_the_run_writes_metrics_and_a_bundle_that_scores_again(
    transformer_run: Path, small_features_path: Path
) -> None:
    metrics = json.loads((transformer_run / "metrics.json").read_text())
    assert metrics["model"] == "transformer" and 0 <= metrics["average_precision"] <= 1
    assert (transformer_run / DONE).is_file()
    bundle = load_bundle(transformer_run)
    assert bundle.inputs == SequenceInputs(length=8)
    table = read_feature_table(small_features_path).frame
    scores = bundle.predict_frame(table)
    pred = pl.read_parquet(transformer_run / "predictions.parquet")
    at = table.with_row_index("row").join(pred.select("transaction_id"), on="transaction_id")
    by_id = dict(zip(at["transaction_id"], scores[at["row"].to_numpy()], strict=True))
    again = np.array([by_id[t] for t in pred["transaction_id"]])
    np.testing.assert_array_equal(again, pred["raw_score"].to_numpy())
    with pytest.raises(ArtifactError, match=r"Bundle\.predict_frame"):
        bundle.predict(table.select(bundle.features).to_numpy())


def test_a_later_event_changes_no_earlier_score(
    transformer_run: Path, small_features_path: Path
) -> None:
    bundle = load_bundle(transformer_run)
    table = read_feature_table(small_features_path).frame
    cut = table.height * 2 // 3
    later = pl.int_range(pl.len()) >= cut
    changed = table.with_columns(
        *(pl.when(later).then(pl.col(f) * 3 + 1).otherwise(pl.col(f)).alias(f)
          for f in bundle.features),
        pl.when(later).then(pl.col("timestamp") + pl.duration(hours=5))
        .otherwise(pl.col("timestamp")).alias("timestamp"),
    )  # fmt: skip
    before, after = bundle.predict_frame(table), bundle.predict_frame(changed)
    np.testing.assert_array_equal(before[:cut], after[:cut])
    assert not np.allclose(before[cut:], after[cut:])


def test_the_service_accepts_a_transformer_run(transformer_run: Path) -> None:
    check_run(transformer_run)


@pytest.mark.distributed
def test_two_ddp_ranks_follow_one_process(small_features_path: Path, tmp_path: Path) -> None:
    """Same global batch, no dropout: equal up to the summation order of the gradients."""
    extra = ("--epochs", "2", "--set", "model.transformer.dropout=0.0", "--patience", "100")
    single = CliRunner().invoke(app, _args(small_features_path, tmp_path / "single", *extra))
    assert single.exit_code == 0, single.output
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "fraudflow", *_args(small_features_path, tmp_path / "ddp", *extra), "--ddp",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    losses = [
        [h["loss"] for h in torch.load(tmp_path / n / "checkpoints" / "last.pt",
                                       weights_only=False)["loop"]["history"]]
        for n in ("single", "ddp")
    ]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["world_size"] == 2
