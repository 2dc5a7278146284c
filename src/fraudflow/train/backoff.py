"""Out-of-memory back-off: halve the batch and retry the same samples.

On CUDA the signal is ``torch.cuda.OutOfMemoryError``. On the CPU, where running out of memory
kills the process instead of raising, a cap on the estimated activation memory of a batch
(``--max-batch-memory``) raises ``BatchMemoryExceeded`` before the step, so the same decision
logic applies on both.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import Tensor, nn

from fraudflow.errors import TrainingError

__all__ = [
    "BatchMemoryExceeded",
    "activation_bytes_per_sample",
    "check_batch_memory",
    "free_memory",
    "is_out_of_memory",
    "next_batch_size",
]

# Forward activations are kept for backward and gradients of the same size are made: about
# three times the forward outputs, in float32.
_BYTES_PER_VALUE = 4
_BACKWARD_FACTOR = 3


class BatchMemoryExceeded(RuntimeError):
    """A batch's estimated activation memory is over the configured cap."""


def next_batch_size(current: int, minimum: int) -> int:
    """Half the batch; below ``minimum`` there is nothing sensible left to try."""
    half = current // 2
    if half < minimum:
        raise TrainingError(
            f"out of memory at batch size {current}; halving it would go below the minimum "
            f"batch size {minimum}: use a smaller model, fewer features or more memory"
        )
    return half


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError | BatchMemoryExceeded)


def check_batch_memory(batch_size: int, bytes_per_sample: int, cap_mb: float | None) -> None:
    if cap_mb is None:
        return
    needed_mb = batch_size * bytes_per_sample / 2**20
    if needed_mb > cap_mb:
        raise BatchMemoryExceeded(
            f"batch of {batch_size} needs about {needed_mb:.1f} MiB, over the {cap_mb:g} MiB cap"
        )


def activation_bytes_per_sample(model: Any, inputs: dict[str, Tensor]) -> int:
    """Estimate from one small forward pass: the outputs of every leaf module, per sample."""
    total = 0

    def count(_module: nn.Module, _args: object, output: object) -> None:
        nonlocal total
        if isinstance(output, Tensor):
            total += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    n = next(iter(inputs.values())).shape[0]
    return max(1, total * _BYTES_PER_VALUE * _BACKWARD_FACTOR // max(n, 1))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
