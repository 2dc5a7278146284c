"""Training from a folder of Parquet shards streams them one at a time."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from fraudflow.cli.main import app
from fraudflow.config import FeatureConfig, RunConfig, SimulationConfig, TrainConfig
from fraudflow.data.io import write_table
from fraudflow.data.simulator import simulate
from fraudflow.features import read_feature_table, write_feature_shards
from fraudflow.models import Standardizer
from fraudflow.train import train_run
from fraudflow.train.shards import ShardRows, fit_standardizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shard_dir(features_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = read_feature_table(features_path).frame
    folder = tmp_path_factory.mktemp("shards") / "features"
    write_feature_shards(frame, folder, FeatureConfig(), shard_days=7)
    return folder


def test_shards_hold_every_row_once(features_path: Path, shard_dir: Path) -> None:
    whole = read_feature_table(features_path).frame
    files = sorted(shard_dir.glob("*.parquet"))
    assert len(files) == 11  # 75 days in 7-day shards
    assert read_feature_table(shard_dir).frame.equals(whole)
    assert not [p for p in shard_dir.parent.iterdir() if p.name.startswith(".")]


def test_streamed_standardizer_matches_the_in_memory_one(
    features_path: Path, shard_dir: Path
) -> None:
    table = read_feature_table(features_path)
    x = torch.from_numpy(table.frame.select(table.feature_names).to_numpy().astype(np.float32))
    direct = Standardizer.fit(x)
    shards = [pl.scan_parquet(f) for f in sorted(shard_dir.glob("*.parquet"))]
    streamed = fit_standardizer(shards, table.feature_names)
    torch.testing.assert_close(streamed.mean, direct.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(streamed.std, direct.std, rtol=1e-4, atol=1e-6)


class _CountingRows(ShardRows):
    """Records the largest segment held at once."""

    largest = 0

    def segment(self, index: int, device: torch.device):  # type: ignore[no-untyped-def]
        data = super().segment(index, device)
        _CountingRows.largest = max(_CountingRows.largest, len(data))
        return data


def test_training_from_shards_streams_and_learns(
    shard_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fraudflow.train.run.ShardRows", _CountingRows)
    cfg = RunConfig(train=TrainConfig(model="mlp", epochs=4))
    outcome = train_run(shard_dir, tmp_path / "run", cfg)
    assert outcome.metrics["average_precision"] > 0.4
    biggest_shard = max(
        pl.scan_parquet(f).select(pl.len()).collect().item() for f in shard_dir.glob("*.parquet")
    )
    assert 0 < _CountingRows.largest <= biggest_shard
    assert outcome.metrics["epochs_run"] == 4


def test_cli_writes_shards_and_trains_with_data_flag(features_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    log = tmp_path / "log.parquet"
    write_table(simulate(SimulationConfig(n_customers=400, n_terminals=800, n_days=60)), log)
    made = runner.invoke(
        app, ["features", "--input", str(log), "--out", str(tmp_path / "f"), "--shard-days", "10"]
    )
    assert made.exit_code == 0, made.output
    assert len(list((tmp_path / "f").glob("part-*.parquet"))) == 6
    trained = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tmp_path / "f"),
            "--model",
            "mlp",
            "--out",
            str(tmp_path / "r"),
            "--epochs",
            "1",
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "r" / "DONE").is_file()


def test_streamed_standardizer_leaves_out_nulls_as_the_in_memory_one_does(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {"a": [1.0, None, 3.0, 5.0, None, 9.0], "b": [2.0, 2.0, 4.0, None, 8.0, 8.0]}
    )
    x = torch.from_numpy(frame.to_numpy().astype(np.float32))
    direct = Standardizer.fit(x)
    shards = [frame.slice(0, 2).lazy(), frame.slice(2, 4).lazy()]
    streamed = fit_standardizer(shards, ["a", "b"])
    torch.testing.assert_close(streamed.mean, direct.mean)
    torch.testing.assert_close(streamed.std, direct.std)
