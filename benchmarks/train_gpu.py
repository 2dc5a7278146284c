"""GPU training benchmark: MLP samples/s on synthetic data, eager against CUDA-graph steps
at batch 4,096, 16,384 and 65,536, per precision, plus the CPU figure for the ratio and timed
100-epoch runs.

Data: ``--samples`` x ``--features`` float32 (default 10M x 100), about 1% positives, made on
the device. Each configuration trains with ``fraudflow.train.loop.fit`` (the same loop as
``fraudflow train``), after one untimed warm-up run; samples/s is
``FitResult.samples_per_second``, whose clock covers the steps and the per-epoch validation
(``wall_seconds`` adds model set-up and checkpoint writes). ``eager`` runs every step from
Python (``cuda_graphs="off"``), ``graphs`` replays full batches as CUDA graphs
(``cuda_graphs="on"``; the graph capture counts in the first epoch). The CPU figure uses
``--cpu-samples`` rows (a full 10M epoch would take minutes there).

Targets (issue 18, one H100 or H200): bf16 at batch 4,096 >= 10M samples/s; 100 epochs over
10M x 100 at batch 4,096 in under two minutes; bf16 at batch 65,536 >= 50M samples/s. Writes
every figure to ``--out`` (JSON) and prints it as the last line.

    python benchmarks/train_gpu.py --out runs/gpu_check/train_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from fraudflow.config import TrainConfig
from fraudflow.models.mlp import MLP
from fraudflow.train.distributed import single_process
from fraudflow.train.loop import TensorData, fit

TARGET_BF16_4096_SAMPLES_PER_SECOND = 10e6
TARGET_BF16_65536_SAMPLES_PER_SECOND = 50e6
TARGET_100_EPOCHS_SECONDS = 120.0
SMALL_BATCH = 4_096


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--valid-samples", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[4_096, 16_384, 65_536])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--long-epochs", type=int, default=100)
    parser.add_argument("--cpu-samples", type=int, default=1_000_000)
    parser.add_argument("--extra-batch-sizes", type=int, nargs="*", default=[262_144])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check/train_gpu.json"))
    # A CPU dry run checks the script itself on a machine without a GPU (fp16 is then refused).
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    # Device time is lent by the minute: configurations that would start after this many
    # seconds are recorded as skipped, and a 100-epoch run predicted to take longer than
    # --long-run-max-seconds is not started.
    parser.add_argument("--budget-seconds", type=float, default=330.0)
    parser.add_argument("--long-run-max-seconds", type=float, default=180.0)
    return parser.parse_args()


def _data(n: int, features: int, device: torch.device, seed: int) -> TensorData:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, features, generator=g, device=device)  # (n, F)
    noise = torch.randn(n, generator=g, device=device)
    logit = x[:, :4].sum(dim=1) + 0.5 * noise
    y = (logit > torch.quantile(logit[:100_000], 0.99)).long()  # about 1% positives
    return TensorData(inputs={"x": x}, labels=y)


def _measure(
    cfg: TrainConfig, train: TensorData, valid: TensorData, compile_mode: str | None = None
) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    model = MLP(n_features=train.inputs["x"].shape[1], hidden_sizes=cfg.hidden_sizes, dropout=0.2)
    if cfg.compile:
        model.compile(mode=compile_mode)
    ctx = single_process(train.labels.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(model, train, valid, cfg, dist_ctx=ctx, checkpoint_dir=Path(tmp))
    # After the first epoch: without torch.compile's compilations (first shapes, the last
    # partial batch, eval mode), which all fall in epoch 0.
    later = result.history[1:]
    later_seconds = sum(log["seconds"] for log in later)
    return {
        "samples_per_second": result.samples_per_second,
        "samples_per_second_after_epoch_0": (
            len(train) * len(later) / later_seconds if later_seconds else None
        ),
        "wall_seconds": time.perf_counter() - started,
        "epochs": result.next_epoch,
        "valid_average_precision": result.best_valid_average_precision,
        "cuda_graph_captures": result.cuda_graph_captures,
        "loss_history": [round(log["loss"], 6) for log in result.history],
    }


def _safe(name: str, fn: Any) -> dict[str, Any]:
    """A failing configuration is recorded, not fatal: the other figures still matter."""
    try:
        figures = dict(fn())
    except Exception as exc:
        traceback.print_exc()
        figures = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"{name:>24}: {figures}", flush=True)
    return figures


def main() -> None:
    args = _args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_gpu.py needs a CUDA device (or --device cpu)")
    started = time.perf_counter()
    cuda = torch.device(args.device)
    base = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, patience=10**6)
    train = _data(args.samples, args.features, cuda, seed=0)
    valid = _data(args.valid_samples, args.features, cuda, seed=1)
    device_name = torch.cuda.get_device_name(0) if cuda.type == "cuda" else "cpu"
    results: dict[str, Any] = {"device": device_name, "torch": torch.__version__}
    results["args"] = {**vars(args), "out": str(args.out)}

    def record(name: str, fn: Any) -> None:
        # Cheapest and most wanted first; what the budget leaves out is marked, never guessed.
        if time.perf_counter() - started > args.budget_seconds:
            results[name] = {"skipped": f"over the {args.budget_seconds:g} s budget"}
            print(f"{name:>24}: skipped (budget)", flush=True)
        else:
            results[name] = _safe(name, fn)
        _write(args.out, results)  # after every figure: a killed run keeps what it measured

    def run(name: str, **changes: Any) -> None:
        cfg = dataclasses.replace(base, **changes)
        record(name, lambda: _measure(cfg, train, valid))

    graphs = "on" if cuda.type == "cuda" else "off"
    # Untimed: the CUDA context, library handles and the allocator's first blocks would
    # otherwise be charged to whichever configuration runs first.
    _measure(dataclasses.replace(base, amp="bf16", epochs=1, cuda_graphs=graphs), train, valid)
    # Most wanted first: the batch size people use, graphed and eager, then the long run.
    for size in args.batch_sizes:
        run(f"bf16_graphs_batch_{size}", amp="bf16", batch_size=size, cuda_graphs=graphs)
        run(f"bf16_eager_batch_{size}", amp="bf16", batch_size=size, cuda_graphs="off", epochs=2)
        if size == SMALL_BATCH:
            record(
                "long_run_4096", lambda: _long_run(args, base, results, SMALL_BATCH, train, valid)
            )
    record("long_run", lambda: _long_run(args, base, results, args.batch_size, train, valid))
    run("fp32_graphs", amp="off", cuda_graphs=graphs)
    run("fp32", amp="off", cuda_graphs="off")
    run("fp16", amp="fp16", cuda_graphs="off")
    cpu = torch.device("cpu")
    cpu_train, cpu_valid = (
        _data(n, args.features, cpu, s) for n, s in ((args.cpu_samples, 0), (20_000, 1))
    )
    cpu_cfg = dataclasses.replace(base, epochs=1, batch_size=2048)
    record("cpu_fp32", lambda: _measure(cpu_cfg, cpu_train, cpu_valid))
    for size in args.extra_batch_sizes:
        # Whether the rate is still bound by per-step overhead (it then grows with the batch).
        run(f"bf16_graphs_batch_{size}", amp="bf16", batch_size=size, cuda_graphs=graphs)
    if not args.no_compile:
        # The alternative to our own graphs: torch.compile's CUDA graphs of forward and
        # backward (the optimizer step stays eager), at the small batch size.
        small = dataclasses.replace(base, amp="bf16", batch_size=SMALL_BATCH, compile=True)
        record(
            "bf16_compile_reduce_overhead_batch_4096",
            lambda: _measure(small, train, valid, compile_mode="reduce-overhead"),
        )
        for amp in ("bf16", "off"):
            run(f"{'fp32' if amp == 'off' else amp}_compile", amp=amp, compile=True)
    _summarise(results)
    results["benchmark_seconds"] = time.perf_counter() - started
    _write(args.out, results)
    print(json.dumps(results))


def _long_run(
    args: argparse.Namespace,
    base: TrainConfig,
    results: dict[str, Any],
    batch_size: int,
    train: TensorData,
    valid: TensorData,
) -> dict[str, Any]:
    """``--long-epochs`` epochs in bf16 at ``batch_size``, graphed where the device allows."""
    graphs = "on" if train.labels.is_cuda else "off"
    measured = results.get(f"bf16_graphs_batch_{batch_size}", {})
    rate = measured.get("samples_per_second_after_epoch_0") or measured.get("samples_per_second")
    predicted = args.long_epochs * args.samples / rate if rate else float("inf")
    if predicted > args.long_run_max_seconds:
        # Already a miss by the rate just measured: spend the device time elsewhere.
        return {
            "skipped": f"predicted {predicted:.0f} s by the measured rate",
            "predicted": predicted,
        }
    cfg = dataclasses.replace(
        base, amp="bf16", epochs=args.long_epochs, batch_size=batch_size, cuda_graphs=graphs
    )
    figures = _measure(cfg, train, valid)
    figures.pop("loss_history")
    return {**figures, "config": f"bf16, batch {batch_size}, cuda_graphs={graphs}"}


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def _summarise(results: dict[str, Any]) -> None:
    def rate(name: str) -> float:
        return float(results.get(name, {}).get("samples_per_second", 0.0))

    def seconds(name: str) -> float | None:
        run = results.get(name, {})
        return run.get("wall_seconds", run.get("predicted"))

    small, large = rate("bf16_graphs_batch_4096"), rate("bf16_graphs_batch_65536")
    cpu = rate("cpu_fp32")
    long_4096 = seconds("long_run_4096")
    results["summary"] = {
        "bf16_4096_samples_per_second": small,
        "bf16_4096_graphs_vs_eager": small / rate("bf16_eager_batch_4096")
        if rate("bf16_eager_batch_4096")
        else None,
        "bf16_65536_samples_per_second": large,
        "bf16_65536_graphs_vs_eager": large / rate("bf16_eager_batch_65536")
        if rate("bf16_eager_batch_65536")
        else None,
        "long_run_4096_seconds": long_4096,
        "long_run_65536_seconds": seconds("long_run"),
        "gpu_bf16_vs_cpu_fp32": max(small, large) / cpu if cpu else None,
        "target_4096_met": small >= TARGET_BF16_4096_SAMPLES_PER_SECOND,
        "target_100_epochs_4096_met": long_4096 is not None
        and long_4096 < TARGET_100_EPOCHS_SECONDS,
        "target_65536_met": large >= TARGET_BF16_65536_SAMPLES_PER_SECOND,
    }


if __name__ == "__main__":
    main()
