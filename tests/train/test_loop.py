from pathlib import Path

import pytest
import torch

from fraudflow.config import TrainConfig
from fraudflow.errors import ConfigError, TrainingError
from fraudflow.models import MLP
from fraudflow.train.backoff import (
    BatchMemoryExceeded,
    activation_bytes_per_sample,
    check_batch_memory,
    next_batch_size,
)
from fraudflow.train.checkpointing import BEST, LAST, load_checkpoint
from fraudflow.train.distributed import DistContext, single_process
from fraudflow.train.loop import EpochLog, TensorData, fit

CPU = single_process(torch.device("cpu"))


def _data(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    # Fraud when a noisy linear score is high: learnable, far from trivial.
    logit = 2.0 * x[:, 0] - 1.5 * x[:, 1] + 0.5 * torch.randn(n, generator=g)
    y = (logit > 2.5).long()
    return TensorData(inputs={"x": x}, labels=y)


TRAIN, VALID = _data(3000, 0), _data(1000, 1)
CFG = TrainConfig(epochs=5, batch_size=128, patience=10, hidden_sizes=(32, 16), seed=3)


def _model(cfg: TrainConfig = CFG) -> MLP:
    torch.manual_seed(cfg.seed)
    return MLP(n_features=6, hidden_sizes=cfg.hidden_sizes, dropout=0.2)


def _fit(tmp: Path, cfg: TrainConfig = CFG, **kwargs: object) -> tuple[MLP, object]:
    model = _model(cfg)
    result = fit(model, TRAIN, VALID, cfg, dist_ctx=CPU, checkpoint_dir=tmp, **kwargs)  # type: ignore[arg-type]
    return model, result


def _same_weights(a: MLP, b: MLP) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_learns_and_keeps_the_best_epoch(tmp_path: Path) -> None:
    model, result = _fit(tmp_path)
    assert result.best_valid_average_precision > 0.6  # base rate is about 0.05
    best = load_checkpoint(tmp_path / BEST)
    assert best["loop"]["best_epoch"] == result.best_epoch
    assert all(torch.equal(v, best["model"][k]) for k, v in model.state_dict().items())
    assert result.samples_seen == 5 * len(TRAIN)


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    a, _ = _fit(tmp_path / "a")
    b, _ = _fit(tmp_path / "b")
    c, _ = _fit(tmp_path / "c", TrainConfig(**{**CFG.__dict__, "seed": 4}))
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


class _Crash(Exception):
    pass


class _CrashAfter:
    """Simulates a process dying right after an epoch's checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_batch(self, epoch: int, done: int, total: int) -> None:
        pass

    def on_epoch(self, log: EpochLog) -> None:
        if log.epoch == self.epoch:
            raise _Crash

    def on_backoff(self, old_batch_size: int, new_batch_size: int) -> None:
        pass


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole, whole_result = _fit(tmp_path / "whole")
    with pytest.raises(_Crash):
        _fit(tmp_path / "split", observer=_CrashAfter(epoch=1))
    assert load_checkpoint(tmp_path / "split" / LAST)["loop"]["next_epoch"] == 2
    resumed, resumed_result = _fit(tmp_path / "split", resume=True)
    assert _same_weights(whole, resumed)
    last_whole = load_checkpoint(tmp_path / "whole" / LAST)["model"]
    last_resumed = load_checkpoint(tmp_path / "split" / LAST)["model"]
    assert all(torch.equal(last_whole[k], last_resumed[k]) for k in last_whole)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in whole_result.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed_result.history]


def test_early_stopping_stops_after_patience(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 40, "patience": 1, "learning_rate": 0.05})
    _, result = _fit(tmp_path, cfg)
    assert result.next_epoch < 40
    assert result.next_epoch == result.best_epoch + 2


def test_fp16_is_refused_on_cpu(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "amp": "fp16"})
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA device"):
        _fit(tmp_path, cfg)


def test_bf16_autocast_trains_on_cpu(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "amp": "bf16", "epochs": 2})
    _, result = _fit(tmp_path, cfg)
    assert result.best_valid_average_precision > 0.3


def test_no_fraud_labels_is_an_error(tmp_path: Path) -> None:
    empty = TensorData(inputs=TRAIN.inputs, labels=torch.zeros_like(TRAIN.labels))
    with pytest.raises(TrainingError, match="no fraud labels"):
        fit(_model(), empty, VALID, CFG, dist_ctx=CPU, checkpoint_dir=tmp_path)


def test_memory_cap_halves_the_batch_until_it_fits(tmp_path: Path) -> None:
    model = _model()
    per_sample = activation_bytes_per_sample(model, {"x": TRAIN.inputs["x"][:2]})
    # Room for 300 samples: 1024 -> 512 -> 256.
    cap_mb = 300 * per_sample / 2**20
    cfg = TrainConfig(**{**CFG.__dict__, "batch_size": 1024, "max_batch_memory_mb": cap_mb})
    _, result = _fit(tmp_path, cfg)
    assert result.backoffs == [[1024, 512], [512, 256]]
    assert result.batch_size == 256
    assert result.samples_seen == 5 * len(TRAIN)  # nothing skipped: the same samples retried
    assert result.best_valid_average_precision > 0.6


def test_memory_cap_below_the_minimum_batch_gives_a_clear_error(tmp_path: Path) -> None:
    cfg = TrainConfig(
        **{**CFG.__dict__, "batch_size": 256, "min_batch_size": 64, "max_batch_memory_mb": 1e-6}
    )
    with pytest.raises(TrainingError, match="halving it would go below the minimum batch size 64"):
        _fit(tmp_path, cfg)


def test_back_off_decision() -> None:
    assert next_batch_size(2048, 32) == 1024
    assert next_batch_size(65, 32) == 32
    with pytest.raises(TrainingError, match="out of memory at batch size 63"):
        next_batch_size(63, 32)
    check_batch_memory(100, 2**20, cap_mb=100)  # exactly at the cap fits
    with pytest.raises(BatchMemoryExceeded):
        check_batch_memory(101, 2**20, cap_mb=100)
    check_batch_memory(10**9, 2**20, cap_mb=None)  # no cap


def test_mid_epoch_checkpoints_resume_exactly(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "checkpoint_every_steps": 7})
    whole, _ = _fit(tmp_path / "whole", cfg)

    class _CrashMidEpoch(_CrashAfter):
        def on_batch(self, epoch: int, done: int, total: int) -> None:
            if epoch == 2 and done >= total // 2:
                raise _Crash

    with pytest.raises(_Crash):
        _fit(tmp_path / "split", cfg, observer=_CrashMidEpoch(epoch=-1))
    state = load_checkpoint(tmp_path / "split" / LAST)["loop"]
    assert state["next_epoch"] == 2 and 0 < state["epoch_offset"] < len(TRAIN)
    resumed, _ = _fit(tmp_path / "split", cfg, resume=True)
    assert _same_weights(whole, resumed)


class _CountingMoves(TensorData):
    moves = 0

    def to(self, device: torch.device) -> TensorData:
        self.moves += 1
        return super().to(device)


def test_in_memory_rows_move_to_the_device_once_not_every_epoch(tmp_path: Path) -> None:
    # On a GPU each move of the training table is a host-to-device copy of all of it.
    rows = _CountingMoves(inputs=TRAIN.inputs, labels=TRAIN.labels)
    fit(_model(), rows, VALID, CFG, dist_ctx=CPU, checkpoint_dir=tmp_path)
    assert CFG.epochs > 1 and rows.moves == 1


def test_cuda_graphs_on_is_refused_where_the_run_cannot_use_them(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "cuda_graphs": "on"})
    with pytest.raises(
        ConfigError, match=r"--cuda-graphs needs a CUDA device \(this run trains on cpu\)"
    ):
        _fit(tmp_path, cfg)


def test_cuda_graphs_are_refused_with_several_ddp_ranks(tmp_path: Path) -> None:
    # Refused in set-up, before any collective: no process group is needed to show it.
    ranks = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    cfg = TrainConfig(**{**CFG.__dict__, "cuda_graphs": "on"})
    with pytest.raises(
        ConfigError, match=r"one process \(DDP across 2 ranks is not supported yet\)"
    ):
        fit(_model(cfg), TRAIN, VALID, cfg, dist_ctx=ranks, checkpoint_dir=tmp_path)


def test_cuda_graphs_auto_trains_eagerly_on_cpu(tmp_path: Path) -> None:
    auto, auto_result = _fit(tmp_path / "auto")
    off, _ = _fit(tmp_path / "off", TrainConfig(**{**CFG.__dict__, "cuda_graphs": "off"}))
    assert _same_weights(auto, off)
    assert auto_result.cuda_graph_captures == 0  # type: ignore[attr-defined]
