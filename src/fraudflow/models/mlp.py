"""A multilayer perceptron over the feature vector (the 256 -> 128 -> 2 family).

Shape: inputs["x"] (B, F) -> logits (B, 2).
"""

from __future__ import annotations

from torch import Tensor, nn

from fraudflow.models.dropout import ReLUDropout

__all__ = ["MLP"]


class MLP(nn.Module):
    # Shapes follow the batch's and nothing syncs with the host: the trainer may replay its
    # step as a CUDA graph (fraudflow.train.graphs).
    cuda_graph_safe = True

    def __init__(self, *, n_features: int, hidden_sizes: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ReLUDropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.net(inputs["x"])  # (B, F) -> (B, 2)
