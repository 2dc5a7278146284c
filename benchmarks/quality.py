"""Benchmark: model quality on the default simulated data, over four consecutive test weeks.

The default simulation (``SimulationConfig()``: 5,000 cards, 10,000 terminals, 90 days, seed
0, all seven fraud scenarios) gets the default features once. Then each of the last four
weeks is a test week (consecutive; the last ends on the last simulated day), and for each one
every model trains on its own window, as in the Fraud Detection Handbook's chapter 5: the
``--train-days`` days before the label-delay gap (their last 7 days are validation, for early
stopping, calibration and the review threshold), then the gap of ``label_delay_days`` (7: the
last training labels are not known yet when the test week begins), then the test week. Every
run goes through ``fraudflow.train.train_run``, so the metrics are those of ``metrics.json``.

Per model it reports the test weeks' average precision, ROC AUC and card precision@100 (mean
and sample standard deviation over the weeks), and per fraud scenario the recall at the run's
review threshold (100 cards a day, chosen on validation) and the scenario's AP against all
legitimate rows (``fraudflow.eval.scenarios``), as means over the weeks with frauds of that
scenario.

Models: ``MODELS``, a list of (name, run config). Today gbdt, mlp, the customer-terminal
gnn (its ``model.gnn`` defaults) and the sequence transformer (its ``model.transformer``
defaults: the card's last 32 events); the stacked gbdt of issue 16 gets an entry in
``MODELS`` when it lands, and the output keeps its shape.

Prints a table, then a JSON object as its last line:

    {"models": {NAME: {"average_precision": {"mean", "std", "weeks"}, "roc_auc": {...},
                       "card_precision_at_100": {...},
                       "per_scenario": {SCENARIO: {"recall_at_review_threshold": {...},
                                                   "average_precision": {...},
                                                   "n_fraud": [per week]}}}},
     "weeks": [{"train_start", "valid_start", "test_start", "test_end"}, ...],
     "data": {...}}

Run from the repository root (``--quick``: a 2,000-card world, at most 8 MLP, 4 GNN and 3
transformer epochs):

    .venv/bin/python benchmarks/quality.py [--quick] [--models gbdt mlp] [--weeks 4]
        [--train-days 21] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fraudflow.config import (
    FeatureConfig,
    RunConfig,
    SimulationConfig,
    SplitConfig,
    TrainConfig,
)
from fraudflow.data.simulator import SCENARIOS, simulate
from fraudflow.features import build_features, write_feature_table
from fraudflow.train import train_run

WEEK_DAYS = 7
METRICS = ("average_precision", "roc_auc", "card_precision_at_100")
SCENARIO_METRICS = ("recall_at_review_threshold", "average_precision")


def _gbdt(quick: bool) -> TrainConfig:
    return TrainConfig(model="gbdt")


def _mlp(quick: bool) -> TrainConfig:
    return TrainConfig(model="mlp", epochs=8 if quick else 20)


def _gnn(quick: bool) -> TrainConfig:
    return TrainConfig(model="gnn", epochs=4 if quick else 10)


def _transformer(quick: bool) -> TrainConfig:
    return TrainConfig(model="transformer", epochs=3 if quick else 10)


# Each model: a name and its training settings (the split is the benchmark's). Add the
# stacked gbdt here when it exists.
MODELS: list[tuple[str, Callable[[bool], TrainConfig]]] = [
    ("gbdt", _gbdt),
    ("mlp", _mlp),
    ("gnn", _gnn),
    ("transformer", _transformer),
]


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [name for name, _ in MODELS]
    parser.add_argument("--models", nargs="+", choices=names, default=names)
    parser.add_argument("--weeks", type=int, default=4)
    parser.add_argument("--train-days", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a 2,000-card world, 8 MLP epochs")
    return parser.parse_args()


def _simulation(args: argparse.Namespace) -> SimulationConfig:
    if args.quick:
        return SimulationConfig(n_customers=2_000, n_terminals=4_000, seed=args.seed)
    return SimulationConfig(seed=args.seed)


def _splits(sim: SimulationConfig, args: argparse.Namespace, delay_days: int) -> list[SplitConfig]:
    """One split per test week, oldest first; the last week ends on the last simulated day."""
    end = sim.start_date + timedelta(days=sim.n_days)
    splits = []
    for back in range(args.weeks, 0, -1):
        test_start = end - timedelta(days=back * WEEK_DAYS)
        train_start = test_start - timedelta(days=delay_days + args.train_days)
        splits.append(
            SplitConfig(
                train_start=train_start,
                train_days=args.train_days,
                delay_days=delay_days,
                test_days=WEEK_DAYS,
            )
        )
    return splits


def _week(periods: dict[str, str]) -> dict[str, str]:
    keys = ("train_start", "valid_start", "test_start", "test_end")
    return {key: periods[key] for key in keys}


def _summary(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation of the finite values, and every week's value."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else None
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"mean": mean, "std": std, "weeks": values}


def _model_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's summary from the metrics.json of each of its weeks."""
    result: dict[str, Any] = {m: _summary([run[m] for run in runs]) for m in METRICS}
    per_scenario: dict[str, Any] = {}
    for name in SCENARIOS:
        weeks = [run.get("per_scenario", {}).get(name) for run in runs]
        if not any(weeks):
            continue
        per_scenario[name] = {m: _summary([w[m] for w in weeks if w]) for m in SCENARIO_METRICS} | {
            "n_fraud": [w["n_fraud"] if w else 0 for w in weeks]
        }
    result["per_scenario"] = per_scenario
    return result


def _train_weeks(
    name: str, train: TrainConfig, features: Path, splits: list[SplitConfig], work: Path
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    runs, weeks = [], []
    for index, split in enumerate(splits):
        started = time.perf_counter()
        outcome = train_run(features, work / f"{name}_{index}", RunConfig(split=split, train=train))
        runs.append(outcome.metrics)
        weeks.append(_week(outcome.metrics["periods"]))
        ap = outcome.metrics["average_precision"]
        seconds = time.perf_counter() - started
        print(f"  {name} week {index + 1}: AP {ap:.4f} ({seconds:.0f} s)", flush=True)
    return runs, weeks


def _print_table(results: dict[str, Any]) -> None:
    def cell(summary: dict[str, Any] | None) -> str:
        if summary is None or summary["mean"] is None:
            return f"{'n/a':>15}"
        std = summary["std"] if summary["std"] is not None else math.nan
        return f"{summary['mean']:>7.4f} ± {std:<5.3f}"

    print(f"\n{'model':<8}  {'AP':>15}  {'ROC AUC':>15}  {'card P@100':>15}")
    for name, result in results.items():
        cells = "  ".join(cell(result[m]) for m in METRICS)
        print(f"{name:<8}  {cells}")
    print("\nrecall at the review threshold (mean over weeks; frauds over all weeks)")
    names = list(results)
    print(f"{'scenario':<28}  " + "  ".join(f"{n:>15}" for n in names) + f"  {'frauds':>7}")
    for scenario in SCENARIOS:
        found = [results[n]["per_scenario"].get(scenario) for n in names]
        if not any(found):
            continue
        cells = "  ".join(cell(f["recall_at_review_threshold"] if f else None) for f in found)
        frauds = sum(next(f for f in found if f)["n_fraud"])
        print(f"{scenario:<28}  {cells}  {frauds:>7}")


def main() -> None:
    args = _args()
    sim = _simulation(args)
    features_cfg = FeatureConfig()
    started = time.perf_counter()
    log = simulate(sim)
    results: dict[str, Any] = {}
    weeks: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        features = Path(tmp) / "features.parquet"
        write_feature_table(build_features(log, features_cfg), features, features_cfg)
        print(f"{log.height:,} transactions, features in {time.perf_counter() - started:.0f} s")
        splits = _splits(sim, args, features_cfg.label_delay_days)
        for name, train in MODELS:
            if name in args.models:
                runs, weeks = _train_weeks(name, train(args.quick), features, splits, Path(tmp))
                results[name] = _model_result(runs)
    _print_table(results)
    data = {
        "customers": sim.n_customers,
        "terminals": sim.n_terminals,
        "days": sim.n_days,
        "first_day": date.isoformat(sim.start_date),
        "seed": sim.seed,
        "transactions": log.height,
        "fraud_rate": float(log["is_fraud"].mean()),  # type: ignore[arg-type]
        "train_days": args.train_days,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({"models": results, "weeks": weeks, "data": data}))


if __name__ == "__main__":
    main()
