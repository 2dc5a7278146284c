"""Categorical inputs: LightGBM splits on them as categories, the MLP embeds them; both learn a
fraud pattern carried by the category alone. Without categorical columns, both models give
exactly the results they gave before categorical columns existed."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fraudflow.config import GBDTConfig, RunConfig, TrainConfig
from fraudflow.eval.metrics import average_precision
from fraudflow.models import (
    GBDT,
    MLP,
    Categorical,
    FeatureLayout,
    Standardizer,
    build_model,
    neural_inputs,
)

N_CATEGORIES = 30
FRAUD_CODES = (4, 11, 27)  # the only categories whose transactions are fraud


def _table(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) model matrix: two noise features and, at position 1, a category code in
    1..30; the label is 1 exactly for the FRAUD_CODES categories."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(1, N_CATEGORIES + 1, size=n)
    x = np.column_stack([rng.normal(size=n), codes, rng.normal(size=n)]).astype(np.float32)
    return x, np.isin(codes, FRAUD_CODES).astype(np.int64)


CATEGORY = Categorical(position=1, cardinality=N_CATEGORIES + 1)


def test_lightgbm_learns_a_fraud_pattern_carried_by_the_category_alone() -> None:
    x, y = _table(8_000, seed=0)
    x_test, y_test = _table(2_000, seed=1)
    cfg = RunConfig(train=TrainConfig(seed=0), gbdt=GBDTConfig(n_estimators=50, num_threads=1))
    model = build_model("gbdt", layout=FeatureLayout(3, (CATEGORY,)), cfg=cfg)
    assert isinstance(model, GBDT)
    model.fit(x[:6_000], y[:6_000], x[6_000:], y[6_000:])
    assert average_precision(y_test, model.predict_proba(x_test)) > 0.99
    root = model.booster_.dump_model()["tree_info"][0]["tree_structure"]
    assert (root["split_feature"], root["decision_type"]) == (1, "==")  # a set of categories
    assert sorted(int(c) for c in root["threshold"].split("||")) == list(FRAUD_CODES)


def test_the_mlp_learns_it_through_an_embedding() -> None:
    x, y = _table(2_000, seed=0)
    x_test, y_test = _table(1_000, seed=1)
    train = TrainConfig(seed=0, hidden_sizes=(8,), dropout=0.0)
    model = build_model("mlp", layout=FeatureLayout(3, (CATEGORY,)), cfg=RunConfig(train=train))
    assert isinstance(model, MLP) and len(model.embeddings) == 1
    matrix = torch.from_numpy(x)
    standardizer = Standardizer.fit(matrix[:, [0, 2]])
    inputs = neural_inputs(matrix, (CATEGORY,), standardizer)
    assert inputs["x"].shape == (2_000, 2) and inputs["codes"].shape == (2_000, 1)
    labels = torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(neural_inputs(torch.from_numpy(x_test), (CATEGORY,), standardizer))
    scores = torch.softmax(logits, dim=1)[:, 1].numpy()
    assert average_precision(y_test, scores) > 0.99


def _golden_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3000, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.5, size=3000) > 1.5).astype(np.int64)
    return x, y


# Printed by the code before categorical columns existed (commit f84c68a), same data and seeds.
GOLDEN_GBDT = [
    0.03101282601477716, 0.05042214153067297, 0.029551580924886214, 0.02691323022342054,
    0.5814643527679582, 0.05559904394373258, 0.5193269039519209, 0.03153275442244838,
    0.3627426176661584, 0.028934920183468767,
]  # fmt: skip
GOLDEN_MLP = [
    [0.10448206216096878, 0.17696572840213776], [0.10021179169416428, 0.18380515277385712],
    [0.20422983169555664, 0.22709688544273376], [0.253060519695282, 0.1839563399553299],
    [0.13997070491313934, 0.16642850637435913],
]  # fmt: skip


def test_lightgbm_without_categorical_columns_is_unchanged() -> None:
    x, y = _golden_data()
    cfg = RunConfig(train=TrainConfig(seed=3), gbdt=GBDTConfig(n_estimators=30, num_threads=1))
    model = build_model("gbdt", layout=FeatureLayout(6), cfg=cfg)
    assert isinstance(model, GBDT)
    model.fit(x[:2000], y[:2000], x[2000:], y[2000:])
    np.testing.assert_allclose(model.predict_proba(x[2000:2010]), GOLDEN_GBDT, rtol=1e-9)


def test_the_mlp_without_categorical_columns_is_unchanged() -> None:
    x, _ = _golden_data()
    train = TrainConfig(seed=3, hidden_sizes=(8, 4))
    model = build_model("mlp", layout=FeatureLayout(6), cfg=RunConfig(train=train))
    assert isinstance(model, MLP)
    assert not any(name.startswith("embeddings") for name in model.state_dict())
    model.eval()
    with torch.no_grad():
        out = model({"x": torch.from_numpy(x[:5])})
    np.testing.assert_allclose(out.numpy(), GOLDEN_MLP, rtol=1e-6)


@pytest.mark.parametrize("cardinality", [1, 2, 31, 10_000])
def test_embedding_widths_stay_small(cardinality: int) -> None:
    model = MLP(n_features=2, hidden_sizes=(), dropout=0.0, cardinalities=(cardinality,))
    width = model.embeddings[0].embedding_dim
    assert 1 <= width <= 16
    assert model.net[0].in_features == 2 + width
