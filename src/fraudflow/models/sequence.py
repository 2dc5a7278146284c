"""A causal Transformer encoder over the card's last transactions, the current one last.

Each event is its spec feature vector (standardised numeric columns, plus an embedding per
categorical column, as in the MLP), projected to ``d_model``; the time gaps (log1p seconds to
the current event and since the card's previous event) and a learned position are added.
Pre-norm blocks (Xiong et al., "On Layer Normalization in the Transformer Architecture",
2020) attend causally: an event sees itself and the card's earlier events, never padding. The
current event's output, the last position, is classified.

Sequences are padded on the left. A padded position attends to itself alone, so that no row of
the attention is empty (an all-masked softmax is NaN, and NaN times a zero weight stays NaN in
the next layer); no real position ever attends to one.

Shape: inputs["history"] (B, T) int64 (-1: padding), inputs["gaps"] (B, T, 2), the shared
inputs["events"] (M, F) and, with categorical columns, inputs["event_codes"] (M, C)
-> logits (B, 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fraudflow.models.interface import SequenceInputs
from fraudflow.models.mlp import embedding_dim

__all__ = ["SequenceTransformer", "attention_mask"]

N_GAPS = 2


def attention_mask(valid: Tensor) -> Tensor:
    """(B, T) bool, True for real events -> (B, 1, T, T) bool: query q may attend key k."""
    t = valid.shape[1]
    positions = torch.arange(t, device=valid.device)
    causal = positions[None, :] <= positions[:, None]  # (T, T): k <= q
    itself = torch.eye(t, dtype=torch.bool, device=valid.device)  # (T, T)
    allowed = causal[None] & (valid[:, None, :] | itself[None])  # (B, T, T)
    return allowed[:, None]  # (B, 1, T, T), one mask for every head


class _Block(nn.Module):
    def __init__(self, *, d_model: int, n_heads: int, feedforward_dim: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, feedforward_dim),
            nn.GELU(),
            nn.Linear(feedforward_dim, d_model),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: Tensor, *, last_only: bool = False) -> Tensor:
        """(B, T, d) -> (B, T, d), or (B, 1, d) for the last position alone (``last_only``)."""
        b, t, d = h.shape
        dh = d // self.n_heads
        normed = self.norm1(h)
        if last_only:
            q, k, v = _last_query(self.qkv, normed, self.n_heads)
            h, mask = h[:, -1:], mask[:, :, -1:]  # (B, 1, d), (B, 1, 1, T)
        else:
            qkv = self.qkv(normed).view(b, t, 3, self.n_heads, dh)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, d / H)
        # No dropout on the attention weights: residual dropout regularises, and on the CPU
        # a dropout mask over (B, H, T, T) weights costs more than the attention itself
        # (benchmarks/sequence_train.py).
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T or 1, d / H)
        a = a.transpose(1, 2).reshape(b, -1, d)  # (B, T or 1, d)
        h = h + self.drop(self.out(a))
        return h + self.drop(self.ff(self.norm2(h)))


def _last_query(qkv: nn.Linear, normed: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Queries of the last position only, keys and values of all: what the last block needs
    when only the current event's output is classified (benchmarks/sequence_train.py)."""
    b, t, d = normed.shape
    dh = d // n_heads
    q = F.linear(normed[:, -1:], qkv.weight[:d], qkv.bias[:d])  # (B, 1, d)
    kv = F.linear(normed, qkv.weight[d:], qkv.bias[d:]).view(b, t, 2, n_heads, dh)
    k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, H, T, d / H)
    return q.view(b, 1, n_heads, dh).transpose(1, 2), k, v  # q (B, H, 1, d / H)


class SequenceTransformer(nn.Module):
    # Attention holds (B, H, T, T) scores: scoring batches stay far below the MLP's.
    predict_batch_rows = 4096

    def __init__(
        self,
        *,
        n_features: int,
        length: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        feedforward_dim: int,
        dropout: float,
        cardinalities: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.inputs = SequenceInputs(length=length)
        self.embeddings = nn.ModuleList(nn.Embedding(k, embedding_dim(k)) for k in cardinalities)
        width = n_features + sum(embedding_dim(k) for k in cardinalities)
        self.event = nn.Linear(width, d_model)
        self.gaps = nn.Linear(N_GAPS, d_model)
        self.position = nn.Parameter(torch.zeros(length, d_model))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(
            _Block(d_model=d_model, n_heads=n_heads, feedforward_dim=feedforward_dim,
                   dropout=dropout)
            for _ in range(n_layers)
        )  # fmt: skip
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        history = inputs["history"]  # (B, T)
        valid = history >= 0
        rows = history.clamp_min(0)  # padding reads row 0, then is zeroed
        x = inputs["events"][rows]  # (B, T, F)
        if len(self.embeddings):
            codes = inputs["event_codes"][rows]  # (B, T, C)
            vectors = [table(codes[..., i]) for i, table in enumerate(self.embeddings)]
            x = torch.cat([x, *vectors], dim=-1)  # (B, T, F + sum of embedding dims)
        x = x * valid[..., None]
        h = self.event(x) + self.gaps(inputs["gaps"]) + self.position  # (B, T, d)
        mask = attention_mask(valid)
        *early, last = self.blocks
        for block in early:
            h = block(h, mask)
        # Only the current event is classified: the last block computes its position alone.
        h = last(h, mask, last_only=True)  # (B, 1, d)
        return self.head(self.norm(h[:, -1]))  # (B, 2)
