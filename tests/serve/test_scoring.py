"""Scores and attributions: equal to the bundle's own predictions, summing to the log-odds."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from fraudflow.artifacts import Bundle, load_bundle, seal_bundle
from fraudflow.cli.main import app
from fraudflow.config import SimulationConfig
from fraudflow.errors import ArtifactError, ConfigError
from fraudflow.features.online import MemoryStore
from fraudflow.models import MLP, Standardizer
from fraudflow.serve.policy import Condition, Policy, Rule, save_policy
from fraudflow.serve.scoring import (
    BundleScorer,
    GradientAttribution,
    LeafIndex,
    TreePathAttribution,
    load_engine,
    reference_scores,
)
from tests.helpers.service import simulate_and_train

SIM = SimulationConfig(n_customers=100, n_terminals=200, n_days=60, seed=7)


@pytest.fixture(scope="module", params=["gbdt", "mlp"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run_dir = simulate_and_train(tmp_path_factory.mktemp("scoring"), SIM, model=request.param)
    return run_dir


def _rows(run: Path, n: int = 500) -> np.ndarray:
    features = pl.read_parquet(run.parent / "features.parquet")
    names = load_bundle(run).features
    return features.select(names).tail(n).to_numpy().astype(np.float32)  # (n, F)


def test_scores_equal_the_bundle_calibrated_predictions(run: Path) -> None:
    bundle, x = load_bundle(run), _rows(run)
    scores = BundleScorer(bundle, version="v").score(x)
    assert bundle.meta.get("calibration")  # the runs calibrate: the check is not vacuous
    np.testing.assert_allclose(scores.raw, bundle.predict(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores.score, bundle.predict_calibrated(x), rtol=0, atol=1e-12)
    assert scores.contributions.shape == x.shape


def test_one_row_equals_its_row_in_a_batch(run: Path) -> None:
    # 200 rows: the batch's attributions are one sparse product, a single row's one gather.
    scorer, x = BundleScorer(load_bundle(run), version="v"), _rows(run, 200)
    batch = scorer.score(x)
    for i in (0, 17, 199):
        one = scorer.score(x[i : i + 1])
        assert abs(one.score[0] - batch.score[i]) <= 1e-7
        np.testing.assert_allclose(one.contributions[0], batch.contributions[i], atol=1e-5)


def test_tree_path_contributions_sum_to_the_log_odds() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    params = {"objective": "binary", "num_leaves": 4, "verbosity": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=20)
    contributions, probability = TreePathAttribution(booster, n_features=3)(x[:200])
    margin = booster.predict(x[:200], raw_score=True)
    bias = margin - contributions.sum(axis=1)
    np.testing.assert_allclose(bias, bias[0], atol=1e-9)  # one constant: the root values
    np.testing.assert_allclose(probability, booster.predict(x[:200]), atol=1e-12)
    # Feature 2 is noise: it moves the score far less than the two that decide the label.
    mean_abs = np.abs(contributions).mean(axis=0)
    assert mean_abs[2] < 0.2 * min(mean_abs[0], mean_abs[1])


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_leaf_index_equals_lightgbm_predict_and_leaves_no_garbage(rows: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 4)).astype(np.float32)
    y = (x[:, 0] - x[:, 2] > 0.3).astype(int)
    params = {"objective": "binary", "num_leaves": 8, "verbosity": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=15)
    leaves = LeafIndex(booster, n_trees=booster.num_trees())
    got = leaves(x[:rows])
    assert got.dtype == np.int64 and got.shape == (rows, 15)
    np.testing.assert_array_equal(got, booster.predict(x[:rows], pred_leaf=True))
    np.testing.assert_array_equal(leaves(x[:rows].astype(np.float64)), got)  # any float input
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            leaves(x[:rows])
        assert gc.collect() == 0  # no reference cycles per call (booster.predict leaves some)
    finally:
        gc.enable()


def test_stump_attribution_by_hand() -> None:
    x = np.array([[0.0, 5.0]] * 50 + [[1.0, 5.0]] * 50, dtype=np.float32)
    y = np.array([0] * 45 + [1] * 5 + [1] * 45 + [0] * 5)
    params = {"objective": "binary", "num_leaves": 2, "min_data_in_leaf": 1, "verbosity": -1}
    booster = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=1)
    tree = booster.dump_model()["tree_info"][0]["tree_structure"]
    contributions, _ = TreePathAttribution(booster, n_features=2)(x[[0, 99]])
    left = tree["left_child"]["leaf_value"] - tree["internal_value"]
    right = tree["right_child"]["leaf_value"] - tree["internal_value"]
    np.testing.assert_allclose(contributions, [[left, 0.0], [right, 0.0]], atol=1e-12)


def test_gradient_attribution_of_a_linear_model_is_weight_times_input() -> None:
    torch.manual_seed(0)
    model = MLP(n_features=3, hidden_sizes=(), dropout=0.0)  # logits = W xs + b
    standardizer = Standardizer(
        mean=torch.tensor([1.0, 0.0, -1.0]), std=torch.tensor([2.0, 1.0, 0.5])
    )
    bundle = Bundle(meta={"features": ["a", "b", "c"], "model": "mlp"}, model=model,
                    standardizer=standardizer)  # fmt: skip
    x = np.array([[3.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=np.float32)
    contributions, probability = GradientAttribution(bundle)(x)
    xs = standardizer.transform(torch.from_numpy(x)).numpy()
    weight = model.net[0].weight.detach().numpy()
    np.testing.assert_allclose(contributions, (weight[1] - weight[0]) * xs, rtol=1e-6)
    assert np.all(contributions[1] == 0)  # the training mean has no contributions
    np.testing.assert_allclose(probability, bundle.predict(x), atol=1e-7)


def test_gradient_attribution_leaves_categorical_features_at_zero() -> None:
    torch.manual_seed(0)
    model = MLP(n_features=2, hidden_sizes=(), dropout=0.0, cardinalities=(3,))
    standardizer = Standardizer(mean=torch.tensor([1.0, -1.0]), std=torch.tensor([2.0, 0.5]))
    meta = {"features": ["a", "cat", "c"], "model": "mlp", "categories": {"columns": {
        "cat": ["x", "y"]}}}  # fmt: skip
    bundle = Bundle(meta=meta, model=model, standardizer=standardizer)
    x = np.array([[3.0, 2.0, 0.0], [1.0, 0.0, -1.0]])  # codes 2 ("y") and 0 (unseen)
    contributions, probability = GradientAttribution(bundle)(x)
    xs = standardizer.transform(torch.from_numpy(x[:, [0, 2]]).float()).numpy()
    weight = model.net[0].weight.detach().numpy()[:, :2]  # the numeric inputs' weights
    np.testing.assert_allclose(contributions[:, [0, 2]], (weight[1] - weight[0]) * xs, rtol=1e-6)
    assert np.all(contributions[:, 1] == 0)
    raw = [[3.0, "y", 0.0], [1.0, "never-seen", -1.0]]
    np.testing.assert_allclose(probability, bundle.predict(raw), atol=1e-7)


def test_engine_uses_the_runs_policy_file(run: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    runner = CliRunner()
    result = runner.invoke(app, ["policy", "calibrate", "--run", str(copy)])
    assert result.exit_code == 0, result.output
    engine = load_engine(copy, store=MemoryStore(), policy_path=None)
    assert engine.policy_source == str(copy / "policy.yaml")
    assert engine.policy.rules  # the calibrated file's rules name known features


def test_engine_refuses_a_rule_on_an_unknown_feature(run: Path, tmp_path: Path) -> None:
    bad = Policy(rules=(Rule("x", Condition("customer__nope", above=1.0), "block"),))
    save_policy(bad, tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match=r"`rules\[0\].when.feature` must be `amount` or"):
        load_engine(run, store=MemoryStore(), policy_path=tmp_path / "p.yaml")


def test_engine_refuses_a_bundle_whose_features_differ(run: Path, tmp_path: Path) -> None:
    import json

    copy = Path(shutil.copytree(run, tmp_path / "run"))
    meta = json.loads((copy / "model" / "meta.json").read_text())
    meta["features"] = meta["features"][::-1]
    (copy / "model" / "meta.json").write_text(json.dumps(meta))
    seal_bundle(copy)  # as a bundle written so would record it
    with pytest.raises(ArtifactError, match="however its feature spec computes"):
        load_engine(copy, store=MemoryStore(), policy_path=None)


def test_reference_scores_prefer_validation(run: Path, tmp_path: Path) -> None:
    validation = pl.read_parquet(run / "validation_predictions.parquet")["score"].to_numpy()
    np.testing.assert_array_equal(reference_scores(run), validation)
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / "validation_predictions.parquet").unlink()
    test = pl.read_parquet(run / "predictions.parquet")["score"].to_numpy()
    np.testing.assert_array_equal(reference_scores(copy), test)
    (copy / "predictions.parquet").unlink()
    assert reference_scores(copy) is None
