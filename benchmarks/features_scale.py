"""Benchmark: the feature spec's engines at scale, Polars against Spark (``local[2]``).

For each size, a simulated log (``fraudflow generate``'s simulator, 5,000 cards per ~1M
transactions over 106 days) is written once; each engine then runs the default spec on it in
a fresh process (``fraudflow features --input LOG --out TABLE --engine E``), timed end to end
(reading, validating, computing, writing), with the peak memory of the process and its
children (Spark's JVM included) sampled every 0.2 s. Prints a table, then JSON as its last line.

Beside each Polars peak it prints the engine's own estimate (``fraudflow.features.memory``),
which `fraudflow features` checks before the work, and from it the largest log the Polars
engine takes within ``--memory-gib`` (16). ``--past-limit`` also runs a log 5 % past that size
with ``--memory-limit`` set to it, to show what the engine does there (a clear error, exit 2).

    PYTHONPATH=src .venv/bin/python benchmarks/features_scale.py [--sizes 1000000 4000000 16000000]
        [--engines polars spark] [--spark-master local[2]] [--memory-gib 16] [--past-limit]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import default_spec
from fraudflow.features.memory import BASE_BYTES, PEAK_FACTOR, peak_memory

DAYS = 106
CARDS_PER_MILLION = 5_000


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    parser.add_argument("--engines", nargs="+", default=["polars", "spark"])
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--memory-gib", type=float, default=16.0)
    parser.add_argument("--past-limit", action="store_true")
    return parser.parse_args()


def _log(size: int, folder: Path) -> tuple[Path, int]:
    cards = max(100, round(CARDS_PER_MILLION * size / 1_000_000))
    sim = SimulationConfig(n_customers=cards, n_terminals=2 * cards, n_days=DAYS, seed=0)
    log = simulate(sim)
    path = folder / f"log_{size}.parquet"
    log.write_parquet(path)
    return path, log.height


def _peak_rss(process: psutil.Popen, peak: list[int], done: threading.Event) -> None:
    while not done.is_set():
        try:
            tree = [process, *process.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)


def _run(
    engine: str, log: Path, out: Path, master: str, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "fraudflow", "features", "--input", str(log), "--out", str(out),
        "--engine", engine, *(["--spark-master", master] if engine == "spark" else []), *extra,
    ]  # fmt: skip
    peak, done = [0], threading.Event()
    started = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = threading.Thread(target=_peak_rss, args=(process, peak, done), daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        text = " ".join(stderr.decode(errors="replace").split())  # Rich wraps long lines
        return {"exit": process.returncode, "error": text[-400:]}
    return {"seconds": round(seconds, 2), "peak_memory_gib": round(peak[0] / 2**30, 2)}


def _columns(log: Path) -> int:
    """Output columns of the default spec on ``log``: its own plus the features."""
    names = set(pq.read_schema(log).names)
    return len(names) + sum(
        1 for f in default_spec(FeatureConfig()).feature_names if f not in names
    )


def _largest_within(limit_bytes: float, columns: int) -> int:
    """The most rows whose estimate fits ``limit_bytes`` (``peak_memory`` inverted)."""
    return int((limit_bytes - BASE_BYTES) // (columns * 8 * PEAK_FACTOR))


def _past_limit(rows: int, limit_gib: float, folder: Path) -> dict[str, Any]:
    log, n = _log(rows, folder)
    figures = _run(
        "polars", log, folder / "past.parquet", "", ("--memory-limit", f"{limit_gib}GiB")
    )
    log.unlink()
    return {"transactions": n, **figures}


def main() -> None:
    args = _args()
    results: list[dict[str, Any]] = []
    columns = 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in args.sizes:
            log, rows = _log(size, folder)
            columns = _columns(log)
            for engine in args.engines:
                figures = _run(engine, log, folder / f"{engine}_{size}.parquet", args.spark_master)
                if "seconds" in figures:
                    figures["transactions_per_second"] = round(rows / figures["seconds"])
                if engine == "polars":
                    figures["estimated_peak_gib"] = round(peak_memory(rows, columns) / 2**30, 2)
                results.append({"engine": engine, "transactions": rows, **figures})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            log.unlink()
        largest = _largest_within(args.memory_gib * 2**30, columns)
        past = (
            _past_limit(int(largest * 1.05), args.memory_gib, folder) if args.past_limit else None
        )
    head = f"{'engine':<7} {'transactions':>13} {'seconds':>8} {'tx/s':>10} {'peak GiB':>9}"
    print(f"{head} {'estimate':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['engine']:<7} {r['transactions']:>13,} exit {r['exit']}: {r['error']}")
            continue
        estimate = f"{r['estimated_peak_gib']:>9.2f}" if "estimated_peak_gib" in r else ""
        print(
            f"{r['engine']:<7} {r['transactions']:>13,} {r['seconds']:>8.1f} "
            f"{r['transactions_per_second']:>10,} {r['peak_memory_gib']:>9.2f} {estimate}"
        )
    covered = all(
        r["estimated_peak_gib"] >= r["peak_memory_gib"]
        for r in results
        if "estimated_peak_gib" in r
    )
    print(f"Polars: the largest log within {args.memory_gib:g} GiB by its estimate: {largest:,} tx")
    print(f"the estimate covers every measured Polars peak: {covered}")
    if past is not None:
        outcome = f"exit {past.get('exit', 0)}: {past.get('error', '')}"
        print(f"past it ({past['transactions']:,} transactions): {outcome}")
    summary = {
        "results": results,
        "spark_master": args.spark_master,
        "polars_memory_gib": args.memory_gib,
        "polars_largest_transactions": largest,
        "estimate_covers_measured_peaks": covered,
        "past_limit": past,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
