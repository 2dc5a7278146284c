"""GPU training benchmark: MLP samples/s on synthetic data, per precision, with and without
torch.compile, plus the CPU figure for the ratio and a timed 100-epoch run.

Data: ``--samples`` x ``--features`` float32 (default 10M x 100), about 1% positives, made on
the device. Each configuration trains with ``fraudflow.train.loop.fit`` (the same loop as
``fraudflow train``) for ``--epochs`` epochs; samples/s is ``FitResult.samples_per_second``,
whose clock covers the steps, the per-epoch validation and the checkpoint writes. The CPU
figure uses ``--cpu-samples`` rows (a full 10M epoch would take minutes there).

Targets (issue 4, one H100): >= 20M samples/s in bf16, and 100 epochs over 10M x 100 in under
two minutes. Writes every figure to ``--out`` (JSON) and prints it as the last line.

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

TARGET_BF16_SAMPLES_PER_SECOND = 20e6
TARGET_100_EPOCHS_SECONDS = 120.0


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--valid-samples", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--long-epochs", type=int, default=100)
    parser.add_argument("--cpu-samples", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check/train_gpu.json"))
    # A CPU dry run checks the script itself on a machine without a GPU (fp16 is then refused).
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    return parser.parse_args()


def _data(n: int, features: int, device: torch.device, seed: int) -> TensorData:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, features, generator=g, device=device)  # (n, F)
    noise = torch.randn(n, generator=g, device=device)
    logit = x[:, :4].sum(dim=1) + 0.5 * noise
    y = (logit > torch.quantile(logit[:100_000], 0.99)).long()  # about 1% positives
    return TensorData(inputs={"x": x}, labels=y)


def _measure(cfg: TrainConfig, train: TensorData, valid: TensorData) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    model = MLP(n_features=train.inputs["x"].shape[1], hidden_sizes=cfg.hidden_sizes, dropout=0.2)
    if cfg.compile:
        model.compile()
    ctx = single_process(train.labels.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(model, train, valid, cfg, dist_ctx=ctx, checkpoint_dir=Path(tmp))
    return {
        "samples_per_second": result.samples_per_second,
        "wall_seconds": time.perf_counter() - started,
        "epochs": result.next_epoch,
        "valid_average_precision": result.best_valid_average_precision,
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
    cuda = torch.device(args.device)
    base = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, patience=10**6)
    train = _data(args.samples, args.features, cuda, seed=0)
    valid = _data(args.valid_samples, args.features, cuda, seed=1)
    name = torch.cuda.get_device_name(0) if cuda.type == "cuda" else "cpu"
    results: dict[str, Any] = {"device": name, "args": {**vars(args), "out": str(args.out)}}
    for amp in ("off", "bf16", "fp16"):
        for compiled in (False, True):
            cfg = dataclasses.replace(base, amp=amp, compile=compiled)
            name = f"{'fp32' if amp == 'off' else amp}{'_compile' if compiled else ''}"
            results[name] = _safe(name, lambda cfg=cfg: _measure(cfg, train, valid))
    best = max(("bf16", "bf16_compile"), key=lambda k: results[k].get("samples_per_second", 0))
    long_cfg = dataclasses.replace(
        base, amp="bf16", compile=best.endswith("compile"), epochs=args.long_epochs
    )
    results["long_run"] = _safe("long_run", lambda: _measure(long_cfg, train, valid))
    results["long_run"]["config"] = best
    cpu = torch.device("cpu")
    cpu_train, cpu_valid = (
        _data(n, args.features, cpu, s) for n, s in ((args.cpu_samples, 0), (20_000, 1))
    )
    cpu_cfg = dataclasses.replace(base, epochs=1, batch_size=2048)
    results["cpu_fp32"] = _safe("cpu_fp32", lambda: _measure(cpu_cfg, cpu_train, cpu_valid))
    _summarise(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


def _summarise(results: dict[str, Any]) -> None:
    bf16 = max(results[k].get("samples_per_second", 0.0) for k in ("bf16", "bf16_compile"))
    cpu = results["cpu_fp32"].get("samples_per_second", 0.0)
    long_seconds = results["long_run"].get("wall_seconds", float("inf"))
    results["bf16_samples_per_second"] = bf16
    results["gpu_bf16_vs_cpu_fp32"] = bf16 / cpu if cpu else None
    results["long_run_seconds"] = long_seconds
    results["target_bf16_met"] = bf16 >= TARGET_BF16_SAMPLES_PER_SECOND
    results["target_100_epochs_met"] = long_seconds < TARGET_100_EPOCHS_SECONDS


if __name__ == "__main__":
    main()
