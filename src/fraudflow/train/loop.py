"""The one training loop for every neural model.

Plain torch, readable in one sitting. Batches are sliced from tensors already on the device
(no per-sample DataLoader). The loss is class-weighted cross-entropy, validation average
precision drives early stopping, and checkpoints (every epoch, optionally every N steps) let
``resume`` continue bit-for-bit, mid-epoch included.

Distributed: every rank holds the data and draws the same per-epoch permutation; each global
batch of ``batch_size`` rows is split across the ranks, and DDP averages their gradients. With
the loss scaled as below, N ranks compute the same update as one process with the same global
batch. Only rank 0 writes checkpoints and reports progress.

Shape: data.inputs[k] is (N, ...), data.labels is (N,), data.shared[k] is (M, ...) and goes
whole with every batch; the model maps a batch dict to (B, 2).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from fraudflow.config import TrainConfig
from fraudflow.errors import ConfigError, TrainingError
from fraudflow.eval.metrics import average_precision
from fraudflow.models.interface import NeuralModel, predict_batch_rows
from fraudflow.train.backoff import (
    activation_bytes_per_sample,
    check_batch_memory,
    free_memory,
    is_out_of_memory,
    next_batch_size,
)
from fraudflow.train.checkpointing import BEST, LAST, load_checkpoint, save_checkpoint
from fraudflow.train.device import autocast, check_amp
from fraudflow.train.distributed import DistContext
from fraudflow.train.graphs import StepGraphs

__all__ = [
    "EpochLog",
    "FitResult",
    "LoopObserver",
    "TensorData",
    "TrainingRows",
    "fit",
    "predict_scores",
]


@dataclass(frozen=True)
class TensorData:
    """Rows of a model's declared inputs: ``inputs`` are sliced by row, ``shared`` tables (that
    per-row indices point into) go whole with every batch."""

    inputs: dict[str, Tensor]  # each (N, ...)
    labels: Tensor  # (N,) int64
    shared: dict[str, Tensor] = field(default_factory=dict)  # each (M, ...)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> TensorData:
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        shared = {k: v.to(device, non_blocking=True) for k, v in self.shared.items()}
        labels = self.labels.to(device, non_blocking=True)
        return TensorData(inputs=inputs, labels=labels, shared=shared)

    def batch(self, idx: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {k: v[idx] for k, v in self.inputs.items()} | self.shared, self.labels[idx]

    # TrainingRows: in memory, the whole table is one segment.
    def positives(self) -> int:
        return int(self.labels.sum())

    def segment_sizes(self) -> list[int]:
        return [len(self)]

    def segment(self, index: int, device: torch.device) -> TensorData:
        return self.to(device)

    def for_device(self, device: torch.device) -> TensorData:
        # Moved once per fit: segment() then finds it there instead of copying every epoch.
        return self.to(device)


class TrainingRows(Protocol):
    """The loop's view of the training rows: segments that each fit on the device.

    In memory (``TensorData``) there is one segment; a folder of Parquet shards streams one
    shard per segment (``fraudflow.train.shards``). Segment order and the row order inside each
    segment are reshuffled every epoch from (seed, epoch) alone.
    """

    def __len__(self) -> int: ...

    def positives(self) -> int: ...

    def segment_sizes(self) -> list[int]: ...

    def segment(self, index: int, device: torch.device) -> TensorData: ...

    def for_device(self, device: torch.device) -> TrainingRows:
        """The rows as ``fit`` keeps them for a run on ``device``."""
        ...


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    loss: float
    valid_average_precision: float
    seconds: float


class LoopObserver(Protocol):
    """What a progress display needs; the loop never prints."""

    def on_batch(self, epoch: int, done: int, total: int) -> None: ...

    def on_epoch(self, log: EpochLog) -> None: ...

    def on_backoff(self, old_batch_size: int, new_batch_size: int) -> None: ...


@dataclass
class FitResult:
    """The loop's whole state: a checkpoint stores it, a resume restores it."""

    batch_size: int = 0
    best_epoch: int = -1
    best_valid_average_precision: float = -math.inf
    epochs_without_improvement: int = 0
    next_epoch: int = 0
    # Mid-epoch position: samples of ``next_epoch`` already trained on, and their loss sum.
    epoch_offset: int = 0
    epoch_loss_sum: float = 0.0
    steps: int = 0
    train_seconds: float = 0.0
    samples_seen: int = 0
    backoffs: list[list[int]] = field(default_factory=list)
    # Training steps captured as CUDA graphs (0: every step ran eagerly).
    cuda_graph_captures: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds > 0 else 0.0


@dataclass
class _Run:
    """What every step needs, bundled so that helpers keep short signatures."""

    model: NeuralModel  # the bare model: its state_dict is what checkpoints hold
    net: Any  # what forward runs through: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    weights: Tensor  # (2,) class weights
    cfg: TrainConfig
    dist: DistContext
    checkpoint_dir: Path
    extra_state: dict[str, Any]
    observer: LoopObserver | None
    bytes_per_sample: int = 0
    graphs: StepGraphs | None = None  # full batches as CUDA graph replays (None: eager)


def fit(
    model: NeuralModel,
    train: TrainingRows,
    valid: TensorData,
    cfg: TrainConfig,
    *,
    dist_ctx: DistContext,
    checkpoint_dir: Path,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    observer: LoopObserver | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch."""
    device = dist_ctx.device
    check_amp(cfg.amp, device)
    torch.manual_seed(cfg.seed)
    run = _setup(model, cfg, dist_ctx, checkpoint_dir, extra_state or {}, observer)
    state = FitResult(batch_size=cfg.batch_size)
    if resume and (checkpoint_dir / LAST).is_file():
        state = _restore(checkpoint_dir / LAST, run)
    _agree_on_start(state, dist_ctx, checkpoint_dir)
    valid = valid.to(device)
    train = train.for_device(device)
    run.weights = _class_weights(len(train), train.positives(), cfg.pos_weight).to(device)
    if cfg.max_batch_memory_mb is not None:
        run.bytes_per_sample = activation_bytes_per_sample(model, valid.batch(torch.arange(2))[0])
    for epoch in range(state.next_epoch, cfg.epochs):
        if state.epochs_without_improvement >= cfg.patience:
            break
        _run_epoch(run, state, epoch, train, valid)
    dist_ctx.barrier()
    if dist_ctx.is_main:
        model.load_state_dict(load_checkpoint(checkpoint_dir / BEST)["model"])
    if dist_ctx.enabled:
        # From rank 0's file to every rank: other machines need not see the checkpoint folder.
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    return state


def _agree_on_start(state: FitResult, dist_ctx: DistContext, checkpoint_dir: Path) -> None:
    """Every rank must resume from the same point. A rank whose --out is not the folder rank 0
    writes checkpoints to (another machine's local disk) would otherwise start over and, with
    the other ranks, train on shards of different epochs' permutations, without any error."""
    if not dist_ctx.enabled:
        return
    mine = (state.next_epoch, state.epoch_offset, state.steps)
    every: list[Any] = [None] * dist_ctx.world_size
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        points = ", ".join(
            f"rank {rank}: epoch {epoch}, sample {offset}, step {steps}"
            for rank, (epoch, offset, steps) in enumerate(every)
        )
        raise TrainingError(
            f"the ranks would start from different points ({points}) in {checkpoint_dir}: "
            "with several machines, --out must be on a filesystem that every machine shares"
        )


def _setup(
    model: NeuralModel,
    cfg: TrainConfig,
    dist_ctx: DistContext,
    checkpoint_dir: Path,
    extra_state: dict[str, Any],
    observer: LoopObserver | None,
) -> _Run:
    graphed = _use_cuda_graphs(cfg, model, dist_ctx)  # refuses before any set-up work
    module: Any = model
    module.to(dist_ctx.device)
    net: Any = model
    if dist_ctx.enabled:
        ids = [dist_ctx.device.index] if dist_ctx.device.type == "cuda" else None
        net = DistributedDataParallel(module, device_ids=ids)
    # Fused AdamW: one kernel for the update (on CPU a third of the foreach version's time for
    # the MLP), and on CUDA it takes GradScaler's inf check on the device, so fp16 steps need no
    # host sync either. Capturable: its step count on the device, as a CUDA graph needs.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True,
        capturable=graphed,
    )  # fmt: skip
    # GradScaler only for fp16: bf16 has fp32's exponent range, so its gradients do not underflow.
    scaler = torch.amp.GradScaler(dist_ctx.device.type, enabled=cfg.amp == "fp16")
    run = _Run(
        model=model, net=net, optimizer=optimizer, scaler=scaler, weights=torch.ones(2),
        cfg=cfg, dist=dist_ctx, checkpoint_dir=checkpoint_dir, extra_state=extra_state,
        observer=observer if dist_ctx.is_main else None,
    )  # fmt: skip
    if graphed:
        # One process: the global batch is the whole batch.
        run.graphs = StepGraphs(
            lambda inputs, labels, capturing: _train_step(
                run, inputs, labels, int(labels.shape[0]), capturing=capturing
            )
        )
    return run


def _use_cuda_graphs(cfg: TrainConfig, model: NeuralModel, dist_ctx: DistContext) -> bool:
    """Whether the step runs as a CUDA graph: ``cfg.cuda_graphs`` against what the run allows.

    A model allows it by declaring ``cuda_graph_safe = True``: its forward has shapes fixed by
    the batch's and no host synchronisation (a graph replays kernels, not Python).
    """
    if cfg.cuda_graphs == "off":
        return False
    blockers = []
    if dist_ctx.device.type != "cuda":
        blockers.append(f"a CUDA device (this run trains on {dist_ctx.device.type})")
    if dist_ctx.enabled:
        # DDP's gradient all-reduce runs from autograd hooks and would have to be captured
        # with it. (One rank under torchrun has no DDP wrapper: its step is graphed.)
        blockers.append(
            f"one process (DDP across {dist_ctx.world_size} ranks is not supported yet)"
        )
    if cfg.amp == "fp16":
        # GradScaler skips a step and adapts its scale by decisions that a replay cannot make.
        blockers.append("--amp bf16 or off (not fp16)")
    if cfg.compile:
        blockers.append("no --compile (torch.compile makes graphs of its own)")
    if not getattr(model, "cuda_graph_safe", False):
        blockers.append(f"a model that declares cuda_graph_safe ({type(model).__name__} does not)")
    if blockers and cfg.cuda_graphs == "on":
        raise ConfigError("--cuda-graphs needs " + ", ".join(blockers))
    return not blockers


def _run_epoch(
    run: _Run, state: FitResult, epoch: int, train: TrainingRows, valid: TensorData
) -> None:
    started = time.perf_counter()
    n_used, loss_sum = _train_epoch(run, state, epoch, train)
    if run.graphs is not None:
        state.cuda_graph_captures += run.graphs.captures
        run.graphs.captures = 0
    # The bare model: a DDP forward would broadcast buffers, a collective we do not need here.
    scores = predict_scores(run.model, valid, amp=run.cfg.amp, device=run.dist.device)
    ap = average_precision(valid.labels.cpu().numpy(), scores)
    log = EpochLog(epoch, loss_sum / max(n_used, 1), ap, time.perf_counter() - started)
    _record(state, log)
    _save(run, state, improved=state.best_epoch == epoch)
    run.dist.barrier()
    if run.observer is not None:
        run.observer.on_epoch(log)


def _permutation(n: int, seed: int, device: torch.device) -> Tensor:
    # Drawn on the device: a host permutation of 10M rows would cost more than a GPU epoch.
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randperm(n, generator=generator, device=device)


def _train_epoch(run: _Run, state: FitResult, epoch: int, rows: TrainingRows) -> tuple[int, float]:
    """Train from the saved mid-epoch offset to the end; return (samples used, loss sum)."""
    run.net.train()
    # Orders depend on (seed, epoch) only: every rank and every resume draws the same ones.
    base_seed = run.cfg.seed * 1_000_003 + epoch * 1_009
    sizes = rows.segment_sizes()
    segment_order = _permutation(len(sizes), base_seed, torch.device("cpu")).tolist()
    # Rank 0 carries the loss already summed before a mid-epoch resume; sums meet at the end.
    carried = state.epoch_loss_sum if run.dist.is_main else 0.0
    total = torch.tensor(carried, dtype=torch.float64, device=run.dist.device)
    done = 0  # rows of this epoch in segments already finished
    for index in segment_order:
        if done + sizes[index] > state.epoch_offset:
            data = rows.segment(index, run.dist.device)
            order = _permutation(len(data), base_seed + 1 + index, run.dist.device)
            total = _train_segment(run, state, epoch, (data, order, done), total, len(rows))
        done += sizes[index]
    state.epoch_offset, state.epoch_loss_sum = 0, 0.0
    return len(rows), _global_sum(total, run.dist)


def _train_segment(
    run: _Run,
    state: FitResult,
    epoch: int,
    segment: tuple[TensorData, Tensor, int],
    total: Tensor,
    epoch_rows: int,
) -> Tensor:
    data, order, before = segment
    within = max(state.epoch_offset - before, 0)
    while len(batch := order[within : within + state.batch_size]) >= run.dist.world_size:
        step_loss = _guarded_step(run, state, data, batch)
        if step_loss is None:
            continue  # the batch size was halved; retry the same samples
        total += step_loss
        within += batch.shape[0]
        state.steps += 1
        state.samples_seen += batch.shape[0]
        if run.observer is not None:
            run.observer.on_batch(epoch, before + within, epoch_rows)
        if _step_checkpoint_due(run.cfg, state, before + within, epoch_rows):
            state.epoch_offset, state.epoch_loss_sum = before + within, _global_sum(total, run.dist)
            _save(run, state, improved=False)
    return total


def _step_checkpoint_due(cfg: TrainConfig, state: FitResult, offset: int, n: int) -> bool:
    every = cfg.checkpoint_every_steps
    return every > 0 and state.steps % every == 0 and offset < n


def _guarded_step(run: _Run, state: FitResult, data: TensorData, batch: Tensor) -> Tensor | None:
    """One step; on out-of-memory, halve the batch size and return None."""
    mine = batch.tensor_split(run.dist.world_size)[run.dist.rank]
    try:
        check_batch_memory(mine.shape[0], run.bytes_per_sample, run.cfg.max_batch_memory_mb)
        if run.graphs is not None and batch.shape[0] == state.batch_size:
            return run.graphs(data, batch)
        return _step(run, data, mine, batch.shape[0])
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        if run.dist.enabled:
            raise TrainingError(
                f"out of memory at batch size {state.batch_size} in a distributed run; "
                "back-off needs every rank to agree, so lower --batch-size instead"
            ) from exc
    run.optimizer.zero_grad(set_to_none=True)
    if run.graphs is not None:
        run.graphs.reset()
    free_memory(run.dist.device)
    new_size = next_batch_size(state.batch_size, run.cfg.min_batch_size)
    state.backoffs.append([state.batch_size, new_size])
    if run.observer is not None:
        run.observer.on_backoff(state.batch_size, new_size)
    state.batch_size = new_size
    return None


def _step(run: _Run, data: TensorData, idx: Tensor, global_batch: int) -> Tensor:
    inputs, labels = data.batch(idx)
    return _train_step(run, inputs, labels, global_batch)


def _train_step(
    run: _Run,
    inputs: dict[str, Tensor],
    labels: Tensor,
    global_batch: int,
    *,
    capturing: bool = False,
) -> Tensor:
    """One optimizer step on this rank's rows; the same code runs eagerly and in a capture."""
    with autocast(run.cfg.amp, run.dist.device, cache=not capturing):
        logits = run.net(inputs)  # (B, 2)
    per_sample = F.cross_entropy(logits.float(), labels, weight=run.weights, reduction="none")
    # DDP averages gradients over ranks, so world / global_batch makes the update the gradient of
    # sum(weighted loss) / global_batch: the same as one process taking the whole batch.
    loss = per_sample.sum() * (run.dist.world_size / global_batch)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    # Stays on the device: no host sync inside the step.
    return per_sample.detach().sum().double()


def _global_sum(total: Tensor, dist_ctx: DistContext) -> float:
    if dist_ctx.enabled:
        total = total.clone()
        dist.all_reduce(total)
    return float(total.item())


@torch.no_grad()
def predict_scores(model: Any, data: TensorData, *, amp: str, device: torch.device) -> np.ndarray:
    """Fraud probabilities, (N,) float64, in data order."""
    model.eval()
    parts = []
    step = predict_batch_rows(model)
    for start in range(0, len(data), step):
        idx = torch.arange(start, min(start + step, len(data)), device=device)
        inputs, _ = data.batch(idx)
        with autocast(amp, device):
            logits = model(inputs)  # (B, 2)
        parts.append(torch.softmax(logits.float(), dim=1)[:, 1])
    if not parts:
        return np.zeros(0)
    return torch.cat(parts).double().cpu().numpy()


def _class_weights(n_rows: int, n_pos: int, pos_weight: float | None) -> Tensor:
    if n_pos == 0:
        raise TrainingError("the training period has no fraud labels: nothing to learn from")
    if pos_weight is None:
        # sqrt of the imbalance: enough to keep frauds from being ignored without
        # trading away the precision that average precision rewards.
        pos_weight = math.sqrt((n_rows - n_pos) / n_pos)
    return torch.tensor([1.0, pos_weight], dtype=torch.float32)


def _record(state: FitResult, log: EpochLog) -> None:
    state.history.append(asdict(log))
    state.train_seconds += log.seconds
    state.next_epoch = log.epoch + 1
    if log.valid_average_precision > state.best_valid_average_precision:
        state.best_valid_average_precision = log.valid_average_precision
        state.best_epoch = log.epoch
        state.epochs_without_improvement = 0
    else:
        state.epochs_without_improvement += 1


def _save(run: _Run, state: FitResult, *, improved: bool) -> None:
    if not run.dist.is_main:
        return
    payload = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "loop": asdict(state),
        "rng": _rng_state(),
        **run.extra_state,
    }
    if improved:
        save_checkpoint(run.checkpoint_dir / BEST, payload)
    # "last" is written after "best", so a resume never sees a last newer than its best.
    save_checkpoint(run.checkpoint_dir / LAST, payload)


def _restore(path: Path, run: _Run) -> FitResult:
    saved = load_checkpoint(path)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if torch.cuda.is_available() and saved["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return FitResult(**saved["loop"])


def _rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}
