"""A multilayer perceptron over the feature vector (the 256 -> 128 -> 2 family).

Each categorical column has its own embedding table, whose vectors are concatenated to the
numeric features before the first layer (Guo & Berkhahn, "Entity Embeddings of Categorical
Variables", 2016). An embedding of k codes has ``embedding_dim(k)`` dimensions.

Shape: inputs["x"] (B, F) and, with categorical columns, inputs["codes"] (B, C) int64
-> logits (B, 2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fraudflow.models.dropout import ReLUDropout
from fraudflow.models.interface import VectorInputs

__all__ = ["MLP", "embedding_dim"]

MAX_EMBEDDING_DIM = 16


def embedding_dim(cardinality: int) -> int:
    """fast.ai's rule of thumb, 1.6 k^0.56, capped: wide enough to separate common values,
    small next to the hidden layers."""
    return max(1, min(MAX_EMBEDDING_DIM, round(1.6 * cardinality**0.56)))


class MLP(nn.Module):
    # Shapes follow the batch's and nothing syncs with the host: the trainer may replay its
    # step as a CUDA graph (fraudflow.train.graphs).
    cuda_graph_safe = True
    inputs = VectorInputs()

    def __init__(
        self,
        *,
        n_features: int,
        hidden_sizes: tuple[int, ...],
        dropout: float,
        cardinalities: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        # Without categorical columns there are no tables and no random draws for them: the
        # seeded initial weights are those of an MLP without embeddings.
        self.embeddings = nn.ModuleList(nn.Embedding(k, embedding_dim(k)) for k in cardinalities)
        layers: list[nn.Module] = []
        width = n_features + sum(embedding_dim(k) for k in cardinalities)
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ReLUDropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        x = inputs["x"]  # (B, F)
        if len(self.embeddings):
            codes = inputs["codes"]  # (B, C)
            vectors = [table(codes[:, i]) for i, table in enumerate(self.embeddings)]
            x = torch.cat([x, *vectors], dim=1)  # (B, F + sum of embedding dims)
        return self.net(x)  # (B, 2)
