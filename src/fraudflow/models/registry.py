"""``build_model``: the one place that maps a model name and its config to a model.

A model gets the layout of the model matrix and the run's config, and takes its settings from
its own section (the MLP: ``train``, LightGBM: ``gbdt``, the transformer:
``model.transformer``, the GNN: ``model.gnn``). What it consumes it declares itself (``inputs``).
"""

from __future__ import annotations

import torch

from fraudflow.config import RunConfig
from fraudflow.errors import ConfigError
from fraudflow.models.gbdt import GBDT
from fraudflow.models.interface import Estimator, FeatureLayout, NeuralModel
from fraudflow.models.mlp import MLP
from fraudflow.models.sequence import SequenceTransformer

__all__ = ["MODEL_NAMES", "NEURAL_MODELS", "build_model"]

NEURAL_MODELS = ("mlp", "transformer", "gnn")
MODEL_NAMES = ("mlp", "gbdt", "transformer", "gnn")


def build_model(name: str, *, layout: FeatureLayout, cfg: RunConfig) -> NeuralModel | Estimator:
    if name in NEURAL_MODELS:
        # Seeded here so that the initial weights depend on the run's seed only.
        torch.manual_seed(cfg.train.seed)
    if name == "mlp":
        return MLP(
            n_features=layout.n_numeric, hidden_sizes=cfg.train.hidden_sizes,
            dropout=cfg.train.dropout, cardinalities=layout.cardinalities,
        )  # fmt: skip
    if name == "transformer":
        t = cfg.model.transformer
        return SequenceTransformer(
            n_features=layout.n_numeric, cardinalities=layout.cardinalities,
            length=t.sequence_length, d_model=t.d_model, n_layers=t.n_layers,
            n_heads=t.n_heads, feedforward_dim=t.feedforward_dim, dropout=t.dropout,
        )  # fmt: skip
    if name == "gnn":
        return _gnn(layout, cfg)
    if name == "gbdt":
        gbdt = cfg.gbdt
        return GBDT(
            n_estimators=gbdt.n_estimators,
            learning_rate=gbdt.learning_rate,
            num_leaves=gbdt.num_leaves,
            min_child_samples=gbdt.min_child_samples,
            subsample=gbdt.subsample,
            colsample_bytree=gbdt.colsample_bytree,
            early_stopping_rounds=gbdt.early_stopping_rounds,
            num_threads=gbdt.num_threads,
            seed=cfg.train.seed,
            categorical_features=tuple(c.position for c in layout.categorical),
        )
    raise ConfigError(f"--model must be one of {', '.join(MODEL_NAMES)}, however got {name!r}")


def _gnn(layout: FeatureLayout, cfg: RunConfig) -> NeuralModel:
    # Imported here: PyTorch Geometric takes seconds to import, which every command and the
    # service would otherwise pay at start-up without ever building a GNN.
    from fraudflow.models.gnn import GNN

    g = cfg.model.gnn
    return GNN(
        n_features=layout.n_numeric, cardinalities=layout.cardinalities, hop1=g.fanout_hop1,
        hop2=g.fanout_hop2, embedding_size=g.embedding_size, hidden_sizes=g.hidden_sizes,
        dropout=g.dropout,
    )  # fmt: skip
