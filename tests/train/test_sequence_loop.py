"""The one loop trains the sequence Transformer as it trains the MLP: shared event tables go
whole with every batch while rows are sliced, resumes are exact, back-off works, bf16 on CPU."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fraudflow.config import TrainConfig
from fraudflow.features.sequences import card_histories
from fraudflow.models import SequenceTransformer
from fraudflow.train.checkpointing import LAST, load_checkpoint
from fraudflow.train.distributed import single_process
from fraudflow.train.loop import TensorData, fit
from tests.helpers.crash import Crash, CrashMidEpoch

CPU = single_process(torch.device("cpu"))
T = 6


def _data(n: int, seed: int) -> TensorData:
    """Fraud when the card's previous event had a high first feature (a label that depends on
    the history)."""
    rng = np.random.default_rng(seed)
    cards = rng.integers(0, n // 10, size=n)
    seconds = np.sort(rng.uniform(0, 1e6, size=n))
    history, gaps = card_histories(cards, seconds, T)
    events = torch.from_numpy(rng.normal(size=(n, 4)).astype(np.float32))
    previous = history[:, -2]
    labels = (previous >= 0) & (events.numpy()[np.maximum(previous, 0), 0] > 1.3)
    return TensorData(
        inputs={"history": torch.from_numpy(history), "gaps": torch.from_numpy(gaps)},
        labels=torch.from_numpy(labels.astype(np.int64)),
        shared={"events": events},
    )


TRAIN, VALID = _data(1200, 0), _data(400, 1)
CFG = TrainConfig(
    model="transformer", epochs=2, batch_size=128, patience=10, seed=3, amp="bf16",
    learning_rate=3e-3, checkpoint_every_steps=5,
)  # fmt: skip


def _model() -> SequenceTransformer:
    torch.manual_seed(CFG.seed)
    return SequenceTransformer(
        n_features=4, length=T, d_model=16, n_layers=1, n_heads=2, feedforward_dim=32,
        dropout=0.1,
    )  # fmt: skip


def _fit(tmp: Path, cfg: TrainConfig = CFG, **kwargs: object) -> tuple[SequenceTransformer, object]:
    model = _model()
    result = fit(model, TRAIN, VALID, cfg, dist_ctx=CPU, checkpoint_dir=tmp, **kwargs)  # type: ignore[arg-type]
    return model, result


def test_bf16_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole, result = _fit(tmp_path / "whole")
    assert np.isfinite(result.history[-1]["loss"])  # type: ignore[attr-defined]
    with pytest.raises(Crash):
        _fit(tmp_path / "split", observer=CrashMidEpoch(fraction=0.8))
    state = load_checkpoint(tmp_path / "split" / LAST)["loop"]
    assert state["next_epoch"] == 1 and 0 < state["epoch_offset"] < len(TRAIN)
    resumed, _ = _fit(tmp_path / "split", resume=True)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_back_off_halves_the_sequence_batch(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 1, "amp": "off", "max_batch_memory_mb": 0.5})
    cfg = TrainConfig(**{**cfg.__dict__, "batch_size": 1024, "min_batch_size": 8})
    _, result = _fit(tmp_path, cfg)
    assert result.backoffs and result.backoffs[0] == [1024, 512]  # type: ignore[attr-defined]
    assert result.samples_seen == len(TRAIN)  # type: ignore[attr-defined]
