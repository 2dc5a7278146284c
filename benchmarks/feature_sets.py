"""Benchmark: what the v2 feature block adds to the default features, on the simulator.

For each simulation seed, the same simulated log gets the default features and the default
plus the v2 block (``fraudflow.features.default_spec(cfg, v2=True)``); each table trains the
same model on the same time split (``fraudflow train`` defaults: the last 7 days are the test
period), and the test metrics are compared: average precision and card precision@100
(``fraudflow.eval.metrics``). Prints a table, then a JSON object as its last line.

    PYTHONPATH=src .venv/bin/python benchmarks/feature_sets.py [--model gbdt] [--seeds 0 1]
        [--customers 3000] [--terminals 6000] [--days 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fraudflow.config import FeatureConfig, RunConfig, SimulationConfig, TrainConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import build_features, default_spec, write_feature_table
from fraudflow.train import train_run

METRICS = ("average_precision", "card_precision_at_100", "roc_auc")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gbdt", choices=("gbdt", "mlp"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--customers", type=int, default=3_000)
    parser.add_argument("--terminals", type=int, default=6_000)
    parser.add_argument("--days", type=int, default=100)
    return parser.parse_args()


def _measure(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sim = SimulationConfig(
        n_customers=args.customers, n_terminals=args.terminals, n_days=args.days, seed=seed
    )
    log = simulate(sim)
    cfg = FeatureConfig()
    out: dict[str, Any] = {"transactions": log.height}
    for name, v2 in (("default", False), ("default_v2", True)):
        spec = default_spec(cfg, v2=v2)
        path = work / f"{name}_{seed}.parquet"
        started = time.perf_counter()
        write_feature_table(build_features(log, spec), path, cfg, spec=spec)
        features_s = time.perf_counter() - started
        run = train_run(
            path, work / f"run_{name}_{seed}", RunConfig(train=TrainConfig(model=args.model))
        )
        out[name] = {m: run.metrics[m] for m in METRICS} | {
            "features": len(spec.feature_names),
            "features_seconds": round(features_s, 2),
        }
    return out


def main() -> None:
    args = _args()
    results: dict[str, Any] = {"model": args.model, "seeds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results["seeds"][str(seed)] = _measure(seed, args, Path(tmp))
    print(f"{'seed':>4}  {'set':<11}  {'features':>8}  {'AP':>7}  {'CP@100':>7}  {'AUC':>7}")
    for seed, by_set in results["seeds"].items():
        for name in ("default", "default_v2"):
            m = by_set[name]
            print(
                f"{seed:>4}  {name:<11}  {m['features']:>8}  {m['average_precision']:>7.4f}  "
                f"{m['card_precision_at_100']:>7.4f}  {m['roc_auc']:>7.4f}"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
