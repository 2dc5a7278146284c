"""CUDA checks: run by benchmarks/gpu_check.sh on a GPU machine (`pytest -m gpu`)."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fraudflow.config import TrainConfig
from fraudflow.errors import ConfigError
from fraudflow.models import MLP
from fraudflow.train import DONE
from fraudflow.train.backoff import activation_bytes_per_sample
from fraudflow.train.distributed import DistContext, single_process
from fraudflow.train.loop import FitResult, TensorData, fit
from tests.helpers.crash import Crash, CrashMidEpoch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _data(n: int, seed: int, features: int = 6) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    logit = 2.0 * x[:, 0] - 1.5 * x[:, 1] + 0.5 * torch.randn(n, generator=g)
    return TensorData(inputs={"x": x}, labels=(logit > 2.5).long())


def _fit(tmp: Path, cfg: TrainConfig, train: TensorData, valid: TensorData) -> object:
    return _fit_model(tmp, cfg, train, valid)[1]


def _fit_model(
    tmp: Path, cfg: TrainConfig, train: TensorData, valid: TensorData, **kwargs: Any
) -> tuple[MLP, FitResult]:
    torch.manual_seed(cfg.seed)
    model = MLP(n_features=train.inputs["x"].shape[1], hidden_sizes=cfg.hidden_sizes, dropout=0.1)
    ctx = single_process(torch.device("cuda"))
    return model, fit(model, train, valid, cfg, dist_ctx=ctx, checkpoint_dir=tmp, **kwargs)


def _largest_difference(a: MLP, b: MLP) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


# 60,000 rows at batch 4,096: 14 full batches and a last one of 2,656 in every epoch.
GRAPH_TRAIN, GRAPH_VALID = _data(60_000, 0, features=20), _data(5_000, 1, features=20)
GRAPH_CFG = TrainConfig(epochs=3, batch_size=4096, hidden_sizes=(64, 32), patience=10)


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_cuda_graph_steps_give_the_eager_results(tmp_path: Path, amp: str) -> None:
    runs = {}
    for mode in ("off", "on"):
        cfg = dataclasses.replace(GRAPH_CFG, amp=amp, cuda_graphs=mode)
        runs[mode] = _fit_model(tmp_path / mode, cfg, GRAPH_TRAIN, GRAPH_VALID)
    (eager_model, eager), (graph_model, graphed) = runs["off"], runs["on"]
    # Captured once for the full batch size; the last, smaller batch of each epoch runs eagerly.
    assert (eager.cuda_graph_captures, graphed.cuda_graph_captures) == (0, 1)
    eager_loss = [log["loss"] for log in eager.history]
    graph_loss = [log["loss"] for log in graphed.history]
    difference = _largest_difference(eager_model, graph_model)
    print(
        f"amp={amp}: eager loss {eager_loss}, graphed {graph_loss}, weights differ by {difference}"
    )
    assert all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(eager_loss, graph_loss, strict=True))
    assert graphed.best_valid_average_precision > 0.6


def test_cuda_graph_run_resumes_exactly(tmp_path: Path) -> None:
    cfg = dataclasses.replace(GRAPH_CFG, amp="bf16", cuda_graphs="on", checkpoint_every_steps=4)
    whole, _ = _fit_model(tmp_path / "whole", cfg, GRAPH_TRAIN, GRAPH_VALID)
    with pytest.raises(Crash):
        _fit_model(tmp_path / "split", cfg, GRAPH_TRAIN, GRAPH_VALID, observer=CrashMidEpoch())
    resumed, result = _fit_model(tmp_path / "split", cfg, GRAPH_TRAIN, GRAPH_VALID, resume=True)
    assert result.cuda_graph_captures >= 1
    difference = _largest_difference(whole, resumed)
    assert difference == 0.0, f"resumed weights differ from the uninterrupted run's by {difference}"


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_mixed_precision_trains_on_cuda(tmp_path: Path, amp: str) -> None:
    cfg = TrainConfig(epochs=4, batch_size=512, hidden_sizes=(64, 32), amp=amp, patience=10)
    result = _fit(tmp_path, cfg, _data(20_000, 0), _data(5_000, 1))
    assert result.best_valid_average_precision > 0.6  # type: ignore[attr-defined]


def test_real_out_of_memory_backs_off(tmp_path: Path) -> None:
    # The first batch is sized from the card: fraudflow's own activation estimate (which counts
    # ~3x the forward outputs, above what PyTorch keeps) times the batch is 4x the card's memory,
    # so the first step runs out of memory on any card, and halving must follow.
    hidden = (4096, 4096)
    probe = MLP(n_features=6, hidden_sizes=hidden, dropout=0.1)
    per_sample = activation_bytes_per_sample(probe, {"x": torch.zeros(2, 6)})
    card = torch.cuda.get_device_properties(0).total_memory
    start = 1 << math.ceil(math.log2(4 * card / per_sample))
    cfg = TrainConfig(epochs=1, batch_size=start, hidden_sizes=hidden, min_batch_size=1024)
    result = _fit(tmp_path, cfg, _data(start, 0), _data(10_000, 1))
    backoffs = result.backoffs  # type: ignore[attr-defined]
    print(f"card {card / 2**30:.0f} GiB, first batch {start}, back-offs: {backoffs}")
    assert backoffs and backoffs[0] == [start, start // 2]
    assert result.samples_seen == start  # type: ignore[attr-defined]


def test_ddp_with_nccl_on_one_gpu(features_path: Path, tmp_path: Path) -> None:
    # --no-track: tracking from rank 0 is covered by the CPU (gloo) tests; this one is about
    # NCCL, and GPU machines without MLflow installed should still run it.
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
        "-m", "fraudflow", "train", "--features", str(features_path), "--model", "mlp",
        "--out", str(out), "--epochs", "2", "--device", "cuda", "--amp", "bf16", "--ddp",
        "--no-track",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / DONE).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["device"].startswith("cuda")
    # One rank has no DDP wrapper to capture around: its steps are graphed.
    assert metrics["cuda_graph_captures"] == 1


def test_cuda_graphs_with_several_ddp_ranks_are_refused(tmp_path: Path) -> None:
    # Refused in set-up, before any collective: no process group is needed to show it.
    ranks = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cuda"))
    cfg = dataclasses.replace(GRAPH_CFG, cuda_graphs="on")
    model = MLP(n_features=20, hidden_sizes=cfg.hidden_sizes, dropout=0.1)
    with pytest.raises(
        ConfigError,
        match=r"^--cuda-graphs needs one process \(DDP across 2 ranks is not supported yet\)$",
    ):
        fit(model, GRAPH_TRAIN, GRAPH_VALID, cfg, dist_ctx=ranks, checkpoint_dir=tmp_path)
