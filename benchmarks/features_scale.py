"""Benchmark: the feature spec's engines at scale, Polars against Spark (``local[2]``).

For each size, a simulated log (``fraudflow generate``'s simulator, 5,000 cards per ~1M
transactions over 106 days) is written once; each engine then runs the default spec on it in
a fresh process (``fraudflow features --input LOG --out TABLE --engine E``), timed end to end
(reading, validating, computing, writing), with the peak memory of the process and its
children (Spark's JVM included) sampled every 0.2 s. Prints a table, then JSON as its last line.

    PYTHONPATH=src .venv/bin/python benchmarks/features_scale.py [--sizes 1000000 4000000 16000000]
        [--engines polars spark] [--spark-master local[2]]
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

from fraudflow.config import SimulationConfig
from fraudflow.data.simulator import simulate

DAYS = 106
CARDS_PER_MILLION = 5_000


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    parser.add_argument("--engines", nargs="+", default=["polars", "spark"])
    parser.add_argument("--spark-master", default="local[2]")
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


def _run(engine: str, log: Path, out: Path, master: str) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "fraudflow", "features", "--input", str(log), "--out", str(out),
        "--engine", engine, "--spark-master", master,
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
        lines = stderr.decode(errors="replace").strip().splitlines()
        return {"error": f"exit {process.returncode}: {lines[-1] if lines else ''}"}
    return {"seconds": round(seconds, 2), "peak_memory_gib": round(peak[0] / 2**30, 2)}


def main() -> None:
    args = _args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in args.sizes:
            log, rows = _log(size, folder)
            for engine in args.engines:
                figures = _run(engine, log, folder / f"{engine}_{size}.parquet", args.spark_master)
                if "seconds" in figures:
                    figures["transactions_per_second"] = round(rows / figures["seconds"])
                results.append({"engine": engine, "transactions": rows, **figures})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            log.unlink()
    print(f"{'engine':<7} {'transactions':>13} {'seconds':>8} {'tx/s':>10} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['engine']:<7} {r['transactions']:>13,} {r['error']}")
            continue
        print(
            f"{r['engine']:<7} {r['transactions']:>13,} {r['seconds']:>8.1f} "
            f"{r['transactions_per_second']:>10,} {r['peak_memory_gib']:>9.2f}"
        )
    print(json.dumps({"results": results, "spark_master": args.spark_master}))


if __name__ == "__main__":
    main()
