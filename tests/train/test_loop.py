from pathlib import Path

import pytest
import torch

from fraudflow.config import TrainConfig
from fraudflow.errors import ConfigError, TrainingError
from fraudflow.models import MLP
from fraudflow.train.checkpointing import BEST, LAST, load_checkpoint
from fraudflow.train.distributed import single_process
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
