from pathlib import Path

import pytest

from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import build_features, write_feature_table


@pytest.fixture(scope="session")
def features_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated feature table: 75 days, ~200k transactions, ~0.5% fraud."""
    sim = SimulationConfig(n_customers=1500, n_terminals=3000, n_days=75, seed=0)
    cfg = FeatureConfig()
    path = tmp_path_factory.mktemp("data") / "features.parquet"
    write_feature_table(build_features(simulate(sim), cfg), path, cfg)
    return path
