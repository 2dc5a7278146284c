"""The MLP and LightGBM give the results they gave before models declared their inputs.

The figures below were printed by commit dd172bf (flat-vector seams) for the same simulated
data, config and seeds; the run now goes through ``fraudflow.inputs`` and the declared inputs.
"""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from fraudflow.config import FeatureConfig, GBDTConfig, RunConfig, SimulationConfig, TrainConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import build_features, write_feature_table
from fraudflow.train import train_run

pytestmark = pytest.mark.slow

GOLDEN = {
    "mlp": {
        "average_precision": 0.0025077704202622663,
        "roc_auc": 0.2166382737081204,
        "raw_sum": 232.34410885900434,
        "raw_head": [
            0.00830900203436613, 0.002250072779133916, 0.012122602201998234,
            0.010450114496052265, 0.01684410125017166,
        ],
    },
    "gbdt": {
        "average_precision": 0.5260698686670702,
        "roc_auc": 0.9075335983342797,
        "raw_sum": 49.23961427983051,
        "raw_head": [
            0.0034258862664610155, 0.039209015318658384, 0.004844734102259499,
            0.013221530133814687, 0.0027355676478070723,
        ],
    },
}  # fmt: skip
# Sums of the MLP's trained weights per tensor, from the same commit.
GOLDEN_MLP_WEIGHT_SUMS = {
    "net.0.weight": -3.349781056313077,
    "net.0.bias": 0.6740425353091268,
    "net.2.weight": 93.47791870331275,
    "net.2.bias": 1.2451760109397583,
    "net.4.weight": 0.18910086770483758,
    "net.4.bias": 0.04175044596195221,
}


@pytest.fixture(scope="module")
def golden_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sim = SimulationConfig(n_customers=200, n_terminals=400, n_days=60, seed=3)
    path = tmp_path_factory.mktemp("golden") / "features.parquet"
    cfg = FeatureConfig()
    write_feature_table(build_features(simulate(sim), cfg), path, cfg)
    return path


@pytest.mark.parametrize("model", ["mlp", "gbdt"])
def test_results_are_those_before_declared_inputs(
    golden_features: Path, tmp_path: Path, model: str
) -> None:
    cfg = RunConfig(
        train=TrainConfig(model=model, epochs=2, batch_size=256, seed=7, device="cpu"),
        gbdt=GBDTConfig(n_estimators=40, num_threads=1),
    )
    outcome = train_run(golden_features, tmp_path / model, cfg)
    raw = pl.read_parquet(tmp_path / model / "predictions.parquet")["raw_score"]
    want = GOLDEN[model]
    # LightGBM (deterministic=True) repeats itself exactly; the MLP up to float rounding.
    rel = 1e-9 if model == "gbdt" else 1e-6
    for key in ("average_precision", "roc_auc"):
        assert outcome.metrics[key] == pytest.approx(want[key], rel=rel), key
    assert float(raw.sum()) == pytest.approx(want["raw_sum"], rel=rel)
    np.testing.assert_allclose(raw.head(5).to_numpy(), want["raw_head"], rtol=rel)
    if model == "mlp":
        weights = torch.load(tmp_path / model / "model" / "weights.pt", weights_only=True)
        sums = {k: float(v.double().sum()) for k, v in weights.items()}
        assert sums == pytest.approx(GOLDEN_MLP_WEIGHT_SUMS, rel=rel)
