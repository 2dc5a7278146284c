"""DDP with real torchrun processes on the CPU (gloo)."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from fraudflow.cli.main import app
from fraudflow.config import TrainConfig
from fraudflow.errors import TrainingError
from fraudflow.models import MLP
from fraudflow.tracking import TrackingConfig, list_runs
from fraudflow.train import DONE
from fraudflow.train.checkpointing import BEST, load_checkpoint
from fraudflow.train.distributed import DistContext, cleanup
from fraudflow.train.loop import TensorData, fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Same global batch, no dropout: two ranks must follow one process. Summation order differs
# (two half-batch gradients averaged vs one), so equality holds to rounding: the epoch losses
# agree to ~1e-8 relative; Adam turns a rounding-level gradient difference into up to a few
# 1e-4 on individual weights after two epochs (measured 3e-4).
LOSS_RTOL = 1e-6
WEIGHT_TOLERANCE = 2e-3
AP_TOLERANCE = 1e-4


def _args(features: Path, out: Path, epochs: int = 2) -> list[str]:
    return [
        "train", "--features", str(features), "--model", "mlp", "--out", str(out),
        "--epochs", str(epochs), "--batch-size", "1024", "--device", "cpu", "--seed", "7",
        "--patience", "100", "--set", "train.dropout=0.0",
    ]  # fmt: skip


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "fraudflow", *args, "--ddp",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    # One thread per rank: two ranks already fill the two cores of a small machine.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_two_ranks_equal_one_process_with_the_same_global_batch(
    features_path: Path, tmp_path: Path, tracking_uri: str
) -> None:
    single = CliRunner().invoke(app, _args(features_path, tmp_path / "single"))
    assert single.exit_code == 0, single.output
    experiment = f"ddp-{uuid.uuid4().hex[:8]}"
    ddp = subprocess.run(
        _torchrun(_args(features_path, tmp_path / "ddp")),
        env={**_env(), "MLFLOW_EXPERIMENT_NAME": experiment},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert (tmp_path / "ddp" / DONE).is_file()
    a = torch.load(tmp_path / "single" / "model" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "model" / "weights.pt", weights_only=True)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < WEIGHT_TOLERANCE, worst
    history = [_history(tmp_path / name) for name in ("single", "ddp")]
    assert [h["loss"] for h in history[0]] == pytest.approx(
        [h["loss"] for h in history[1]], rel=LOSS_RTOL
    )
    metrics = [json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("single", "ddp")]
    assert metrics[1]["world_size"] == 2
    for key in ("average_precision", "validation_average_precision"):
        assert abs(metrics[0][key] - metrics[1][key]) < AP_TOLERANCE, key
    # Tracked by rank 0 alone: one finished run holding the job's metrics, not one per rank.
    tracked = list_runs(
        TrackingConfig(enabled=True, tracking_uri=tracking_uri, experiment=experiment)
    )
    assert [run["status"] for run in tracked] == ["FINISHED"]
    assert tracked[0]["average_precision"] == pytest.approx(metrics[1]["average_precision"])


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _node(rank: int, endpoint: str, args: list[str]) -> list[str]:
    """One machine's torchrun of a two-machine job, one process on it."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
        f"--rdzv-endpoint={endpoint}", "--nproc-per-node=1", "-m", "fraudflow", *args, "--ddp",
    ]  # fmt: skip


def test_two_nodes_equal_two_processes_on_one_node(features_path: Path, tmp_path: Path) -> None:
    """Two torchrun agents on loopback, as two machines would run them (--nnodes 2, one
    process each, rendezvous at node 0's endpoint), train exactly as one agent with two."""
    one_node = subprocess.run(
        _torchrun(_args(features_path, tmp_path / "one")), env=_env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_start(_node(r, endpoint, _args(features_path, tmp_path / "two"))) for r in (0, 1)]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    a = torch.load(tmp_path / "one" / "model" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same ranks doing the same sums
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def _history(run: Path) -> list[dict[str, float]]:
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    return list(last["loop"]["history"])


def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (read from /proc)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().split()
        except OSError:
            continue
        if int(stat[3]) != parent:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


def test_a_crashed_rank_ends_the_job_with_an_error(features_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "crash"
    proc = _start(_torchrun(_args(features_path, out, epochs=50)))
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    workers = _workers(proc.pid)
    assert set(workers) == {0, 1}
    os.kill(workers[1], signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=120)  # ends, rather than hanging
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "FAILED" in output or "failed" in output.lower()
    assert not (out / DONE).exists()


def _rank_job(rank: int, store: str, folders: list[str], resume: bool, results: str) -> None:
    """One of two gloo ranks calling ``fit`` directly, each with its own checkpoint folder, as
    two machines with local disks would. Writes its final weights, or its error, to results."""
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    out = Path(results) / f"rank{rank}"
    try:
        ctx = DistContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        model = _tiny_model()
        fit(model, *_tiny_data(), _TINY_CFG, dist_ctx=ctx, checkpoint_dir=Path(folders[rank]),
            resume=resume)  # fmt: skip
        torch.save(model.state_dict(), out.with_suffix(".pt"))
    except TrainingError as exc:
        out.with_suffix(".error").write_text(str(exc))
    finally:
        cleanup()


_TINY_CFG = TrainConfig(epochs=2, batch_size=64, hidden_sizes=(8,), patience=10, seed=3)


def _tiny_model() -> MLP:
    torch.manual_seed(0)
    return MLP(n_features=4, hidden_sizes=_TINY_CFG.hidden_sizes, dropout=0.0)


def _tiny_data() -> tuple[TensorData, TensorData]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_200, 4, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(1_200, generator=g) > 1.5).long()
    return TensorData({"x": x[:1_000]}, y[:1_000]), TensorData({"x": x[1_000:]}, y[1_000:])


def _two_ranks(tmp: Path, folders: list[Path], *, resume: bool) -> Path:
    results = tmp / f"results-{uuid.uuid4().hex[:6]}"
    results.mkdir()
    store = (tmp / f"store-{results.name}").as_uri()
    spawn = multiprocessing.get_context("spawn")
    args = [str(f) for f in folders]
    ranks = [
        spawn.Process(target=_rank_job, args=(r, store, args, resume, str(results))) for r in (0, 1)
    ]
    for rank in ranks:
        rank.start()
    try:
        for rank in ranks:
            rank.join(timeout=300)
            assert rank.exitcode == 0
    finally:
        for rank in ranks:
            rank.kill()  # a rank still waiting in a collective after a failure
    return results


def test_ranks_without_a_shared_folder_end_alike_and_cannot_resume_apart(tmp_path: Path) -> None:
    """Rank 0 alone writes checkpoints. A fresh run still ends with the best weights on every
    rank (sent from rank 0, not read from a folder another machine cannot see); a resume where
    one rank finds a checkpoint and the other none is refused on both, not run from two points."""
    folders = [tmp_path / "machine0", tmp_path / "machine1"]
    fresh = _two_ranks(tmp_path, folders, resume=False)
    best = load_checkpoint(folders[0] / BEST)["model"]
    for rank in (0, 1):
        weights = torch.load(fresh / f"rank{rank}.pt", weights_only=True)
        assert all(torch.equal(weights[k], best[k]) for k in best)
    assert not folders[1].exists() or not any(folders[1].iterdir())
    resumed = _two_ranks(tmp_path, folders, resume=True)
    for rank in (0, 1):
        message = (resumed / f"rank{rank}.error").read_text()
        assert "rank 0: epoch 2, sample 0" in message and "rank 1: epoch 0, sample 0" in message
        assert "--out must be on a filesystem that every machine shares" in message
