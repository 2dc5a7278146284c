"""Benchmark: what the online state and the audit log cost per event and per decision.

One replay of transactions through ``POST /v1/decisions/batch`` per state store, then the
store's and the audit log's footprint measured from what the replay left:

* sqlite: the server (``python -m fraudflow serve --run RUN --workers W --state
  sqlite:///<tmp>/state.db``) takes ``--transactions`` transactions in batches of
  ``--batch-size`` (``--batch-concurrency`` requests in flight); reported: batch
  decisions/s, the state file's bytes per retained transaction and per retained event per
  entity key (file size, WAL included, after the server stopped), and the per-worker
  in-memory mirror (``Histories``) rebuilt from that file in this process, measured with
  ``tracemalloc`` (bytes per retained transaction).
* audit (after every store's replay, on the sqlite replay's log): the audit log's bytes per
  decision as the service wrote it (SQLite shards, WAL included), then after
  ``compact_audit`` turned its shards (closed: the server stopped) into Parquet, and the
  seconds that took; the median time to look one transaction up (a duplicate's replay,
  ``lookup_decision``) in each form over the same ``--lookups`` random ids, and their ratio.

Each store is a section function (``SECTIONS``: name -> function(args, run, frame, scratch)
returning its figures), chosen with ``--stores sqlite[,redis,...]``; a section reports under
its own name. Sizes default to a run of a couple of minutes on a loaded 2-core machine;
``--transactions N`` goes bigger (the issue's demo replay: 851,660).

Without ``--run`` a small run is built first in a temporary folder (``serve.py``'s
``build_run``: simulate -> features -> LightGBM, about a minute). Timings are wall-clock and
noisy on a shared machine. It prints a summary and a JSON object as its last line.

Run from the repository root:

    .venv/bin/python benchmarks/state_scale.py [--run RUN_DIR] [--stores sqlite]
        [--transactions 40000] [--batch-size 1000] [--batch-concurrency 2] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from fraudflow.artifacts import feature_spec_of, load_bundle
from fraudflow.features import open_feature_source
from fraudflow.features.spec_online import extra_columns
from fraudflow.serve.audit import compact_audit, lookup_decision, shard_files
from fraudflow.serve.state import SQLiteStore
from serve import (
    API_KEY,
    CANONICAL,
    HOST,
    batch_bodies,
    build_run,
    free_port,
    stop_server,
    transaction_stream,
    wait_ready,
)

REQUEST_TIMEOUT_SECONDS = 120.0

Section = Callable[[argparse.Namespace, Path, pl.DataFrame, Path], dict[str, Any]]


# --- replaying transactions through the service ----------------------------------------------


def load_log(run: Path) -> pl.DataFrame:
    """Every transaction of the run's feature table (canonical columns and the extra ones its
    spec reads), in time order: a replay of distinct transactions. The test period alone
    (``serve.py``'s ``load_transactions``) is too short here: repeated with new ids, its
    copies sort next to their originals in a compacted shard and flatter its compression."""
    config = json.loads((run / "config.json").read_text())
    columns = [*CANONICAL, *extra_columns(feature_spec_of(load_bundle(run).meta))]
    scan = open_feature_source(Path(config["features_path"])).scan()
    return scan.select(columns).sort("timestamp").collect()


def start_server(
    run: Path, *, port: int, workers: int, state: str, scratch: Path
) -> subprocess.Popen[bytes]:
    """``fraudflow serve`` on ``state`` (a --state URL); the audit log goes to ``scratch``."""
    command = [
        sys.executable, "-m", "fraudflow", "serve", "--run", str(run), "--port", str(port),
        "--workers", str(workers), "--state", state,
    ]  # fmt: skip
    env = os.environ | {"FRAUDFLOW_API_KEYS": API_KEY, "FRAUDFLOW_DATA_DIR": str(scratch)}
    log = (scratch / "server.log").open("wb")
    return subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def replay(
    args: argparse.Namespace, run: Path, frame: pl.DataFrame, *, state: str, scratch: Path
) -> dict[str, Any]:
    """``--transactions`` transactions through ``POST /v1/decisions/batch`` of a server on
    ``state`` with ``--workers`` workers; the server is stopped (gracefully) on return."""
    scratch.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_server(run, port=port, workers=args.workers, state=state, scratch=scratch)
    try:
        asyncio.run(wait_ready(proc, port, scratch / "server.log"))
        bodies = list(_bodies(frame, args.transactions, args.batch_size))
        started = time.perf_counter()
        decided = _post_all(port, bodies, args.batch_concurrency)
        seconds = time.perf_counter() - started
    finally:
        stop_server(proc)
    return {
        "decisions": decided,
        # More transactions than the log holds: the rest are its copies with new ids.
        "repeated_log": args.transactions > frame.height,
        "seconds": round(seconds, 2),
        "batch_decisions_per_second": round(decided / seconds),
        "workers": args.workers,
    }


def _bodies(frame: pl.DataFrame, total: int, size: int) -> Iterator[tuple[bytes, int]]:
    """The request bodies, encoded before the clock starts."""
    stream = itertools.islice(transaction_stream(frame), total)
    for body, n in batch_bodies(stream, size):
        if n == 0:
            return
        yield body, n


def _post_all(port: int, bodies: list[tuple[bytes, int]], concurrency: int) -> int:
    """Send every body, ``concurrency`` at a time; the decisions of 2xx answers."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    base = f"http://{HOST}:{port}"

    def post(client: httpx.Client, body: bytes, n: int) -> int:
        answer = client.post("/v1/decisions/batch", content=body, headers=headers)
        return n if answer.is_success else 0

    with (
        httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_SECONDS) as client,
        concurrent.futures.ThreadPoolExecutor(concurrency) as pool,
    ):
        return sum(pool.map(lambda b: post(client, *b), bodies))


# --- sizes -----------------------------------------------------------------------------------


def file_bytes(path: Path) -> int:
    """A SQLite file's bytes with its WAL (what the disk holds)."""
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def mirror_bytes(state_file: Path) -> int:
    """The bytes the per-worker mirror of ``state_file`` holds once rebuilt (tracemalloc)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = SQLiteStore(state_file)  # opening catches the mirror up with the whole file
        after = tracemalloc.get_traced_memory()[0]
        store.close()
    finally:
        tracemalloc.stop()
    return after - before


def entity_keys(run: Path) -> int:
    """How many entity keys the run's feature spec keeps events under."""
    spec = feature_spec_of(load_bundle(run).meta)
    return len({aggregate.by for aggregate in spec.aggregates})


# --- sections --------------------------------------------------------------------------------


def sqlite_section(
    args: argparse.Namespace, run: Path, frame: pl.DataFrame, scratch: Path
) -> dict[str, Any]:
    folder = scratch / "sqlite"
    state_file = folder / "state.db"
    result = replay(args, run, frame, state=f"sqlite:///{state_file}", scratch=folder)
    with contextlib.closing(sqlite3.connect(state_file)) as db:
        (retained,) = db.execute("SELECT COUNT(*) FROM transactions").fetchone()
    keys = entity_keys(run)
    state_bytes = file_bytes(state_file)
    mirror = mirror_bytes(state_file)
    return result | {
        "retained_transactions": retained,
        "entity_keys": keys,
        "state_file_bytes": state_bytes,
        "state_bytes_per_transaction": round(state_bytes / retained, 1),
        "state_bytes_per_event_per_key": round(state_bytes / (retained * keys), 1),
        "mirror_bytes": mirror,
        "mirror_bytes_per_transaction": round(mirror / retained, 1),
        "mirror_bytes_per_event_per_key": round(mirror / (retained * keys), 1),
    }


# --- Redis (one server, and a 3-master cluster with a replica each) ----------------------
#
# The same replay on a redis-server without persistence, then on a Redis Cluster on loopback
# (tests/helpers/redis_cluster.py: three masters, one replica each) with 1 and 2 service
# workers. Footprint from the server itself: MEMORY USAGE of every key of a kind (the
# customers' and terminals' event sets, the transactions' records, the replay records) over
# what they hold, and INFO's used_memory over the retained transactions.

# The bank: cards, transactions per card per 30 days; each Redis node holds up to
# this much state (a 64 GiB machine, room left for forks and fragmentation).
BANK_CARDS, BANK_TX_PER_CARD_30D = 10_000_000, 60
NODE_STATE_GIB = 40


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A redis-server without persistence on a free port; yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly",
         "no"],
        cwd=folder, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(host=HOST, port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer on port {port}") from None
                time.sleep(0.05)
        client.close()
        yield f"redis://{HOST}:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def redis_footprint(nodes: list[Any]) -> dict[str, Any]:
    """Bytes per retained event (per entity key) and per remembered decision, summed over the
    (master) ``nodes``: MEMORY USAGE of each key by kind, and INFO's used_memory beyond
    used_memory_startup."""
    kinds = {"customer": b"{c:", "terminal": b"{m:", "record": b"{t:", "vocabulary": b"{v:"}
    usage = dict.fromkeys(["customer", "terminal", "fraud", "record", "decision", "vocabulary"], 0)
    counts = dict.fromkeys(usage, 0)
    used = 0
    for node in nodes:
        memory = node.info("memory")  # what the keys added since the server started
        used += int(memory["used_memory"]) - int(memory["used_memory_startup"])
        for key in node.scan_iter(match=b"fraudflow:*", count=1000):
            kind = next((k for k, tag in kinds.items() if tag in key), None)
            if kind is None:
                continue
            if kind in ("customer", "terminal") and key.endswith(b"}f"):
                kind = "fraud"
            elif kind == "record" and key.endswith(b"}r"):
                kind = "decision"
            usage[kind] += int(node.memory_usage(key, samples=0) or 0)
            if kind in ("customer", "terminal"):
                counts[kind] += int(node.zcard(key))
            else:
                counts[kind] += 1
    out: dict[str, Any] = {"used_memory_bytes": used}
    for kind in ("customer", "terminal"):
        out[f"{kind}_events"] = counts[kind]
        out[f"bytes_per_event_{kind}"] = round(usage[kind] / max(counts[kind], 1), 1)
    out["records"] = counts["record"]
    out["bytes_per_record"] = round(usage["record"] / max(counts["record"], 1), 1)
    out["decisions"] = counts["decision"]
    out["bytes_per_decision"] = round(usage["decision"] / max(counts["decision"], 1), 1)
    # What the replay records of one model share (fraudflow.serve.replay_record), once.
    out["vocabularies"] = counts["vocabulary"]
    out["vocabulary_bytes"] = usage["vocabulary"]
    out["fraud_set_bytes"] = usage["fraud"]
    out["used_memory_per_transaction"] = round(used / max(counts["record"], 1), 1)
    return out


def bank_projection(
    figures: dict[str, Any],
    *,
    cards: int = BANK_CARDS,
    retention_days: float = 37,
    idempotency_days: float = 7,
) -> dict[str, Any]:
    """Memory for ``cards`` cards at ``BANK_TX_PER_CARD_30D`` transactions: each transaction
    kept for the retention (its events in its card's and its terminal's sets, its record,
    Redis's own overhead per key: used_memory per transaction less its replay record), its
    replay record for the idempotency window; masters of ``NODE_STATE_GIB`` each."""
    per_day = cards * BANK_TX_PER_CARD_30D / 30
    decision = figures["bytes_per_decision"]
    per_tx = figures["used_memory_per_transaction"] - decision
    total = per_day * retention_days * per_tx + per_day * idempotency_days * decision
    gib = total / 2**30
    return {
        "cards": cards,
        "transactions_per_day": round(per_day),
        "retained_transactions": round(per_day * retention_days),
        "state_gib": round(gib, 1),
        "masters": max(1, -(-int(gib) // NODE_STATE_GIB)),
    }


def redis_section(
    args: argparse.Namespace, run: Path, frame: pl.DataFrame, scratch: Path
) -> dict[str, Any]:
    import redis

    folder = scratch / "redis"
    with redis_server(folder / "server") as url:
        result = replay(args, run, frame, state=url, scratch=folder)
        client = redis.Redis.from_url(url)
        figures = redis_footprint([client])
        client.close()
    return result | figures | {"bank": bank_projection(figures)}


def redis_cluster_section(
    args: argparse.Namespace, run: Path, frame: pl.DataFrame, scratch: Path
) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' cluster helper
    from tests.helpers.redis_cluster import redis_cluster

    out: dict[str, Any] = {}
    for workers in (1, 2):
        folder = scratch / f"redis-cluster-{workers}"
        with redis_cluster(folder / "nodes") as cluster:
            result = replay(
                argparse.Namespace(**(vars(args) | {"workers": workers})), run, frame,
                state=cluster.url, scratch=folder,
            )  # fmt: skip
            masters = [cluster.node(port) for port in cluster.masters()]
            figures = redis_footprint(masters)
            figures["keys_per_master"] = [int(m.dbsize()) for m in masters]
            for m in masters:
                m.close()
        out[f"workers_{workers}"] = result | figures
    return out


SECTIONS: dict[str, Section] = {
    "sqlite": sqlite_section,
    "redis": redis_section,
    "redis-cluster": redis_cluster_section,
}


def audit_section(audit_path: Path, *, lookups: int, seed: int) -> dict[str, Any]:
    """The audit log's bytes per decision and lookup time, as written and once compacted."""
    ids = _recorded_ids(shard_files(audit_path))
    picked = random.Random(seed).sample(ids, min(lookups, len(ids)))
    before, (sqlite_ms, answers) = log_bytes(audit_path), _lookups(audit_path, picked)
    started = time.perf_counter()
    compact_audit(audit_path)
    seconds = time.perf_counter() - started
    after, (compacted_ms, compacted_answers) = log_bytes(audit_path), _lookups(audit_path, picked)
    if compacted_answers != answers:
        raise RuntimeError("a lookup answered otherwise once its shard was compacted")
    return {
        "decisions": len(ids),
        "sqlite_bytes_per_decision": round(before / len(ids), 1),
        "compacted_bytes_per_decision": round(after / len(ids), 1),
        "compaction_seconds": round(seconds, 2),
        "lookup_ms_p50_sqlite": sqlite_ms,
        "lookup_ms_p50_compacted": compacted_ms,
        "lookup_compacted_over_sqlite": round(compacted_ms / sqlite_ms, 1),
    }


def log_bytes(audit_path: Path) -> int:
    """Every file of the log on disk: shards, WALs, compacted files (not the lock files)."""
    files = audit_path.parent.glob(f"{audit_path.stem}.*")
    return sum(f.stat().st_size for f in files if f.is_file() and f.suffix != ".lock")


def _recorded_ids(files: list[Path]) -> list[str]:
    ids: list[str] = []
    for file in files:
        with contextlib.closing(sqlite3.connect(file)) as db:
            ids += [tid for (tid,) in db.execute("SELECT transaction_id FROM decision_ids")]
    return ids


def _lookups(audit_path: Path, ids: list[str]) -> tuple[float, list[bytes | None]]:
    """Median milliseconds of looking each of ``ids`` up in the log (a duplicate's replay),
    and the answers."""
    times, answers = [], []
    for tid in ids:
        started = time.perf_counter()
        answers.append(lookup_decision(audit_path, tid))
        times.append(time.perf_counter() - started)
    if None in answers:
        raise RuntimeError("a recorded transaction's lookup found nothing")
    return round(statistics.median(times) * 1e3, 3), answers


# --- the benchmark ---------------------------------------------------------------------------


def report(result: dict[str, Any]) -> None:
    for name in result["stores"]:
        section = result.get(name, {})
        print(f"{name}: {json.dumps(section)}")
    if "audit" in result:
        print(f"audit: {json.dumps(result['audit'])}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--stores", default="sqlite", help="comma-separated: " + ",".join(SECTIONS))
    parser.add_argument("--transactions", type=int, default=40_000)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--batch-concurrency", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unknown = [s for s in args.stores.split(",") if s not in SECTIONS]
    if unknown:
        parser.error(f"--stores: unknown {unknown}, however the stores are {list(SECTIONS)}")
    return args


def main() -> int:
    args = parse_args()
    stores = args.stores.split(",")
    result: dict[str, Any] = {"stores": stores, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="fraudflow-bench-state-") as tmp:
        scratch = Path(tmp)
        run = args.run or build_run(scratch / "build")
        frame = load_log(run)
        result["run"] = str(run)
        try:
            for store in stores:
                result[store] = SECTIONS[store](args, run, frame, scratch)
            if "sqlite" in stores:
                audit_path = scratch / "sqlite" / "audit.db"
                result["audit"] = audit_section(audit_path, lookups=args.lookups, seed=args.seed)
        except (RuntimeError, OSError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
    report(result)
    print(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
