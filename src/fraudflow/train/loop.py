"""The one training loop for every neural model.

Plain torch, readable in one sitting: batches are sliced from tensors already on the device (no
per-sample DataLoader), the loss is class-weighted cross-entropy, validation average precision
drives early stopping, and a checkpoint after every epoch lets ``resume`` continue bit-for-bit.

Shape: data.inputs[k] is (N, ...), data.labels is (N,); the model maps a batch dict to (B, 2).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fraudflow.config import TrainConfig
from fraudflow.errors import TrainingError
from fraudflow.eval.metrics import average_precision
from fraudflow.models.interface import NeuralModel
from fraudflow.train.checkpointing import BEST, LAST, load_checkpoint, save_checkpoint
from fraudflow.train.device import autocast, check_amp

__all__ = ["EpochLog", "FitResult", "LoopObserver", "TensorData", "fit", "predict_scores"]

PREDICT_BATCH = 65_536


@dataclass(frozen=True)
class TensorData:
    inputs: dict[str, Tensor]  # each (N, ...)
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> TensorData:
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        return TensorData(inputs=inputs, labels=self.labels.to(device, non_blocking=True))

    def batch(self, idx: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {k: v[idx] for k, v in self.inputs.items()}, self.labels[idx]


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


@dataclass
class FitResult:
    best_epoch: int = -1
    best_valid_average_precision: float = -math.inf
    epochs_without_improvement: int = 0
    next_epoch: int = 0
    train_seconds: float = 0.0
    samples_seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds > 0 else 0.0


def fit(
    model: NeuralModel,
    train: TensorData,
    valid: TensorData,
    cfg: TrainConfig,
    *,
    device: torch.device,
    checkpoint_dir: Path,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    observer: LoopObserver | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch."""
    check_amp(cfg.amp, device)
    torch.manual_seed(cfg.seed)
    module: Any = model
    module.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    # GradScaler only for fp16: bf16 has fp32's exponent range, so its gradients do not underflow.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    state = FitResult()
    if resume and (checkpoint_dir / LAST).is_file():
        state = _restore(checkpoint_dir / LAST, model, optimizer, scaler)
    train, valid = train.to(device), valid.to(device)
    weights = _class_weights(train.labels, cfg.pos_weight).to(device)
    for epoch in range(state.next_epoch, cfg.epochs):
        if state.epochs_without_improvement >= cfg.patience:
            break
        started = time.perf_counter()
        loss = _train_epoch(model, train, optimizer, scaler, weights, cfg, epoch, device, observer)
        scores = predict_scores(model, valid, amp=cfg.amp, device=device)
        ap = average_precision(valid.labels.cpu().numpy(), scores)
        log = EpochLog(epoch, loss, ap, time.perf_counter() - started)
        _record(state, log, len(train))
        _save(
            checkpoint_dir,
            state,
            model,
            optimizer,
            scaler,
            extra_state,
            improved=state.best_epoch == epoch,
        )
        if observer is not None:
            observer.on_epoch(log)
    best = load_checkpoint(checkpoint_dir / BEST)
    model.load_state_dict(best["model"])
    return state


def _train_epoch(
    model: NeuralModel,
    data: TensorData,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    weights: Tensor,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    observer: LoopObserver | None,
) -> float:
    model.train()
    # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(len(data), generator=generator).to(device)
    n_batches = math.ceil(len(data) / cfg.batch_size)
    total = torch.zeros((), device=device)
    for b in range(n_batches):
        inputs, labels = data.batch(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
        with autocast(cfg.amp, device):
            logits = model(inputs)  # (B, 2)
            loss = F.cross_entropy(logits.float(), labels, weight=weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # Accumulated on the device: no host sync inside the step.
        total += loss.detach() * labels.shape[0]
        if observer is not None:
            observer.on_batch(epoch, b + 1, n_batches)
    return float(total.item()) / len(data)


@torch.no_grad()
def predict_scores(
    model: NeuralModel, data: TensorData, *, amp: str, device: torch.device
) -> np.ndarray:
    """Fraud probabilities, (N,) float64, in data order."""
    model.eval()
    parts = []
    for start in range(0, len(data), PREDICT_BATCH):
        idx = torch.arange(start, min(start + PREDICT_BATCH, len(data)), device=device)
        inputs, _ = data.batch(idx)
        with autocast(amp, device):
            logits = model(inputs)  # (B, 2)
        parts.append(torch.softmax(logits.float(), dim=1)[:, 1])
    if not parts:
        return np.zeros(0)
    return torch.cat(parts).double().cpu().numpy()


def _class_weights(labels: Tensor, pos_weight: float | None) -> Tensor:
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise TrainingError("the training period has no fraud labels: nothing to learn from")
    if pos_weight is None:
        # sqrt of the imbalance: enough to keep frauds from being ignored without
        # trading away the precision that average precision rewards.
        pos_weight = math.sqrt((len(labels) - n_pos) / n_pos)
    return torch.tensor([1.0, pos_weight], dtype=torch.float32)


def _record(state: FitResult, log: EpochLog, n_samples: int) -> None:
    state.history.append(asdict(log))
    state.train_seconds += log.seconds
    state.samples_seen += n_samples
    state.next_epoch = log.epoch + 1
    if log.valid_average_precision > state.best_valid_average_precision:
        state.best_valid_average_precision = log.valid_average_precision
        state.best_epoch = log.epoch
        state.epochs_without_improvement = 0
    else:
        state.epochs_without_improvement += 1


def _save(
    checkpoint_dir: Path,
    state: FitResult,
    model: NeuralModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    extra_state: dict[str, Any] | None,
    *,
    improved: bool,
) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "loop": asdict(state),
        "rng": _rng_state(),
        **(extra_state or {}),
    }
    if improved:
        save_checkpoint(checkpoint_dir / BEST, payload)
    # "last" is written after "best", so a resume never sees a last newer than its best.
    save_checkpoint(checkpoint_dir / LAST, payload)


def _restore(
    path: Path,
    model: NeuralModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> FitResult:
    saved = load_checkpoint(path)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if torch.cuda.is_available() and saved["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return FitResult(**saved["loop"])


def _rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}
