"""The training step as one CUDA graph: forward, loss, backward and optimizer step, replayed.

Why: at the batch sizes fraud teams use (a few thousand rows), an MLP's step is some fifty
small kernels, and launching them one by one from Python costs more than running them: the
host, not the GPU, sets the rate. A CUDA graph records the step's kernels once and replays them
all with one launch (PyTorch's CUDA semantics notes, "CUDA Graphs", whole-network capture).
``benchmarks/train_gpu.py`` measures graphed against eager steps at several batch sizes.

How ``StepGraphs`` runs a step:

* Only full batches are graphed, one graph per batch size. A size's first ``WARMUP_STEPS``
  steps run eagerly on a side stream, because lazy initialisation (the optimizer's state,
  cuBLAS workspaces, autograd's gradient accumulators) must not happen inside a capture. They
  are ordinary training steps: nothing is repeated or thrown away. The next step of that size
  is captured and replayed, and every later one is a replay.
* A replay reads its batch from static buffers (one per model input, and the labels) into
  which the rows are gathered first, and leaves its loss sum in a static tensor.
* A batch of another size (the last, smaller one of an epoch or a shard) runs eagerly: one
  step per segment and epoch, where capturing each remainder would cost a capture and a memory
  pool per distinct size, again in every epoch for shards of varying sizes.
* Same numbers as eager mode: the graph runs the same kernels on the same inputs; dropout
  draws from the device's Philox generator, whose offset a replay advances exactly as the
  eager kernels would, so the masks are the same and a checkpoint's RNG state resumes either
  way. Autocast's weight-cast cache is off inside a capture (cached casts must not outlive
  it); each weight is cast once per step either way, inside the same single launch.
* The optimizer must be capturable (fused AdamW with ``capturable=True``: its step count lives
  on the device, and its update is one kernel with no host synchronisation).

Shape: each input (N, ...) is gathered to (B, ...); labels (N,) to (B,).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["WARMUP_STEPS", "StepGraphs", "TrainStep"]

WARMUP_STEPS = 2


class Batches(Protocol):
    """Where a step's rows come from (``fraudflow.train.loop.TensorData``)."""

    @property
    def inputs(self) -> dict[str, Tensor]: ...

    @property
    def labels(self) -> Tensor: ...


# (inputs, labels, capturing) -> the batch's loss sum, a 0-d tensor on the device. The step
# zeroes the gradients, runs forward and backward, and steps the optimizer.
TrainStep = Callable[[dict[str, Tensor], Tensor, bool], Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Tensor]  # static: (B, ...) each
    labels: Tensor  # static: (B,)
    loss_sum: Tensor  # static: 0-d, written by each replay


class StepGraphs:
    """Runs training steps of full batches as CUDA graph replays (see the module doc)."""

    def __init__(self, step: TrainStep, *, warmup_steps: int = WARMUP_STEPS) -> None:
        self._step = step
        self._warmup_steps = warmup_steps
        self._graphs: dict[int, _Captured] = {}
        self._warmed: dict[int, int] = {}
        self._side_stream: torch.cuda.Stream | None = None
        self.captures = 0  # graphs captured so far, for tests and logs

    def __call__(self, data: Batches, idx: Tensor) -> Tensor:
        """Train on rows ``idx`` of ``data``; the loss sum is valid until the next call."""
        size = int(idx.shape[0])
        captured = self._graphs.get(size)
        if captured is None:
            if self._warmed.get(size, 0) < self._warmup_steps:
                self._warmed[size] = self._warmed.get(size, 0) + 1
                return self._eager_on_side_stream(data, idx)
            captured = self._capture(data, idx)
        for name, buffer in captured.inputs.items():
            torch.index_select(data.inputs[name], 0, idx, out=buffer)
        torch.index_select(data.labels, 0, idx, out=captured.labels)
        captured.graph.replay()
        return captured.loss_sum

    def reset(self) -> None:
        """Drop every graph and its memory pool (the batch size changed, e.g. on back-off)."""
        self._graphs.clear()
        self._warmed.clear()

    def _eager_on_side_stream(self, data: Batches, idx: Tensor) -> Tensor:
        main = torch.cuda.current_stream()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        side = self._side_stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            inputs = {name: values[idx] for name, values in data.inputs.items()}
            loss_sum = self._step(inputs, data.labels[idx], False)
        main.wait_stream(side)
        # Made on the side stream, read on the main one: the allocator must not hand its
        # memory back to the side stream before the main stream is done with it.
        loss_sum.record_stream(main)
        return loss_sum

    def _capture(self, data: Batches, idx: Tensor) -> _Captured:
        inputs = {name: values[idx] for name, values in data.inputs.items()}
        labels = data.labels[idx]
        graph = torch.cuda.CUDAGraph()
        # thread_local: a metrics thread reading memory gauges must not void the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            loss_sum = self._step(inputs, labels, True)
        captured = _Captured(graph=graph, inputs=inputs, labels=labels, loss_sum=loss_sum)
        self._graphs[int(idx.shape[0])] = captured
        self.captures += 1
        return captured
