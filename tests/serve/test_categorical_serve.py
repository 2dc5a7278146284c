"""A model with a categorical feature, served on loopback HTTP: a request's raw category goes
through the codes the bundle learned in training, so the service scores exactly what
``Bundle.predict_calibrated`` scores for the same raw row."""

import random
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest

from fraudflow.artifacts import load_bundle
from fraudflow.config import FeatureConfig, GBDTConfig, RunConfig, SimulationConfig, TrainConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import build_features, parse_spec, write_feature_table
from fraudflow.features.categories import UNSEEN
from fraudflow.serve.audit import read_decisions
from fraudflow.train import train_run
from tests.helpers.service import AUTH, transaction

SPEC = {
    "label_delay": "7d",
    "aggregate": [
        {"name": "customer__count", "by": ["customer_id"], "fn": "count", "windows": ["1d"]},
    ],
    "derive": [{"name": "tx__log_amount", "expr": "log1p(amount)"}],
    "column": [{"name": "merchant_category", "kind": "categorical"}],
}
CATEGORY = "merchant_category"
RISKY = "risky"  # most frauds' category, rare otherwise


@pytest.fixture(scope="module", params=["gbdt", "mlp"])
def run_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A run on the simulated log plus a merchant category that gives frauds away."""
    folder = tmp_path_factory.mktemp("categorical-serve")
    rng = random.Random(0)
    log = simulate(SimulationConfig(n_customers=150, n_terminals=300, n_days=60, seed=3))
    common = ["food", "fuel", "toys", "travel"]
    categories = [
        RISKY if rng.random() < (0.9 if fraud else 0.01) else rng.choice(common)
        for fraud in log["is_fraud"].to_list()
    ]
    log = log.with_columns(pl.Series(CATEGORY, categories))
    spec = parse_spec(SPEC)
    table = folder / "features.parquet"
    write_feature_table(build_features(log, spec), table, FeatureConfig(), spec=spec)
    train = TrainConfig(model=request.param, epochs=2)
    cfg = RunConfig(train=train, gbdt=GBDTConfig(n_estimators=60))
    train_run(table, folder / "run", cfg)
    return folder / "run"


def _tx(i: int, category: Any) -> dict[str, Any]:
    # A card of its own each: equal aggregates, so only the category differs.
    return transaction(i, customer_id=f"card-{i}", terminal_id="t1", amount=50.0) | {
        CATEGORY: category
    }


def test_raw_categories_are_encoded_with_the_bundles_codes(
    client: httpx.Client, run_dir: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(run_dir)
    assert bundle.codes is not None and RISKY in bundle.codes.values[CATEGORY]
    sent = [RISKY, "food", "never-seen", None]
    scores = []
    for i, category in enumerate(sent):
        response = client.post("/v1/decisions", json=_tx(i, category), headers=AUTH)
        assert response.status_code == 200, response.text
        scores.append(response.json()["score"])
    decisions = read_decisions(tmp_path / "data" / "audit.db").sort("transaction_id")
    codes = bundle.codes.encode(CATEGORY, sent).tolist()
    assert decisions[CATEGORY].to_list() == codes  # the feature the model read: the code
    assert codes[2] == codes[3] == UNSEEN
    if bundle.meta["model"] == "gbdt":
        assert scores[0] > scores[1]  # the model learned the risky category
    assert scores[2] == scores[3]  # a value never seen in training and a null: both unseen
    # The bundle alone, given the raw rows, scores the same.
    position = bundle.features.index(CATEGORY)
    rows = [list(r) for r in decisions.select(bundle.features).rows()]
    for row, category in zip(rows, sent, strict=True):
        row[position] = category
    np.testing.assert_allclose(bundle.predict_calibrated(rows), scores, rtol=1e-6)


def test_a_request_without_the_category_is_422_naming_it(client: httpx.Client) -> None:
    tx = {k: v for k, v in _tx(0, "food").items() if k != CATEGORY}
    response = client.post("/v1/decisions", json=tx, headers=AUTH)
    assert response.status_code == 422
    assert response.json() == {
        "detail": "missing column 'merchant_category': the model's feature spec reads it"
    }
