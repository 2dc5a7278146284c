"""Benchmark: the decision service under load on loopback, beside its in-process floor.

Three figures, in one run, against one model bundle:

* floor: what one decision costs without HTTP, state I/O or the policy: ``OnlineFeatures``
  over a ``MemoryStore`` (warmed with ``--warm-transactions`` earlier transactions) plus
  ``Bundle.predict_calibrated`` (the model, then the Platt scaling the service answers with)
  on one row; the median over ``--floor-transactions`` transactions. For a sequence model
  (``--model transformer``) the model's part is what the service does: the card's history
  appended and read (a ``MemoryHistory``) and the scorer's one pass giving the score and its
  attributions; its targets are its own (issue 16): floor <= 2 ms, >= 500 decisions/s at a
  p99 <= 50 ms (``--rate`` defaults to the model's target rate).
* single, capacity: the real server (``python -m fraudflow serve --run RUN --port P --workers
  W --state sqlite:///<tmp>/state.db``, API key ``bench-key``) driven for ``--seconds`` by
  ``--concurrency`` clients, each with its own keep-alive connection, each sending
  ``POST /v1/decisions`` with one canonical transaction and waiting for the answer (a closed
  loop). Reported: decisions/s (2xx answers only): ``decisions_per_second``, the most the
  service sustains. Its latencies (``closed_loop_p99_ms``, ...) are reported too, but a closed
  loop at saturation measures the queue it builds: mean latency = concurrency / throughput.
* single, latency at the target rate: an open loop for ``--rate-seconds`` at ``--rate``
  requests/s (default: the 1,500/s target), sent on schedule whether or not earlier answers
  came back, over at most ``--rate-connections`` keep-alive connections. Latency is measured
  from each request's scheduled send time, so time spent waiting for a free connection
  counts (no coordinated omission). These are ``p50_ms``, ``p95_ms``, ``p99_ms``: what a
  caller sees at that load.
* batch: ``POST /v1/decisions/batch`` with ``--batch-size`` transactions per request
  (the service takes up to 10,000), ``--batch-concurrency`` requests in flight, for
  ``--batch-seconds``; decisions/s counts the transactions of 2xx answers. The bodies are
  encoded before the phase starts, so the client spends its CPU on sending, not on JSON.

The load generator: this process, one thread, asyncio streams and a minimal HTTP/1.1 client
(stdlib only). On a 2-core machine the client competes with the server for CPU, so it must
be cheap: an httpx request costs a few hundred microseconds of client CPU, which at 1,500
requests/s would take half a core; a raw request on asyncio streams costs a fraction of that.
One thread means the client can use at most one core; the CPU it did use (process time over
wall time) is reported as ``client_cpu_cores``.

Transactions are the test period of the run's feature table, in time order, with string ids
(the service's canonical form). When they run out they repeat with fresh ids (``-r1``, ...)
and timestamps shifted past the previous pass, so every transaction_id is new and time keeps
moving forward, as in production.

* shadow (``--shadow RUN[,RUN...]``, instead of the phases above): the open loop at
  ``--rate`` for ``--rate-seconds``, against a server of the run alone and then against one
  that also scores the challengers in shadow (``fraudflow serve --shadow``), each on fresh
  state with the same transactions, ``--shadow-rounds`` times in turn. Reported: each
  one's p50/p95/p99 of the champion's answers (pooled over the rounds), the server's CPU per
  decision and the machine's load average at each start, and ``shadow_p99_ratio``, with /
  without (target: at most 1.2 with two challengers). The challengers must read features the
  run's online engine computes.

Without ``--run`` a small run is built first in a temporary folder: simulate -> features ->
LightGBM (about a minute), on the default spec, or with ``--v2`` the default spec plus its v2
block (served by the spec engine, ``SpecOnline``, not the fast path: ``online_path``).
Timings are wall-clock and noisy on a shared machine. It prints a summary, whether the targets
are met, and a JSON object as its last line.

Run from the repository root:

    .venv/bin/python benchmarks/serve.py [--run RUN_DIR | --v2] [--seconds 20] [--concurrency 32]
        [--workers 2] [--rate 1500] [--rate-seconds 15] [--rate-connections 64]
        [--batch-size 1000] [--batch-seconds 10] [--batch-concurrency 4]
        [--shadow RUN[,RUN...] [--shadow-rounds 2]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fraudflow.artifacts import Bundle, feature_config_of, feature_spec_of, load_bundle
from fraudflow.config import FeatureConfig, RunConfig, SimulationConfig, TrainConfig
from fraudflow.data.simulator import simulate
from fraudflow.errors import FraudflowError
from fraudflow.features import (
    build_features,
    default_spec,
    open_feature_source,
    write_feature_table,
)
from fraudflow.features.online import MemoryStore, OnlineFeatures, to_event
from fraudflow.features.spec_online import MemorySpecStore, SpecOnline, extra_columns
from fraudflow.models import SequenceInputs
from fraudflow.serve.history_state import MemoryHistory
from fraudflow.serve.scoring import fast_path_serves, scorer_for
from fraudflow.serve.sequence_scoring import SequenceHistory
from fraudflow.train import train_run

API_KEY = "bench-key"
HOST = "127.0.0.1"
CANONICAL = ("transaction_id", "timestamp", "customer_id", "terminal_id", "amount")
TARGET_SINGLE_PER_SECOND = 1_500
TARGET_P99_MS = 25.0
TARGET_BATCH_PER_SECOND = 30_000
# A sequence model (issue 16): its own single-decision targets, and the floor's.
TARGET_SEQUENCE_PER_SECOND = 500
TARGET_SEQUENCE_P99_MS = 50.0
TARGET_SEQUENCE_FLOOR_MS = 2.0
READY_TIMEOUT_SECONDS = 120.0
WARMUP_REQUESTS = 200
REQUEST_TIMEOUT_SECONDS = 30.0
STAGGER_SECONDS = 0.02  # between the closed-loop clients' starts (see drive)
# Batch bodies encoded before the batch phase's clock starts: enough for this rate.
ENCODED_AHEAD_PER_SECOND = 40_000


# --- the run and its transactions -----------------------------------------------------------


def build_run(folder: Path, *, v2: bool = False) -> Path:
    """A small LightGBM run: 1,500 cards, 3,000 terminals, 60 days (about 150k transactions),
    on the default spec (``v2``: with the v2 block, ``default_spec(cfg, v2=True)``)."""
    sim = SimulationConfig(n_customers=1_500, n_terminals=3_000, n_days=60, seed=0)
    cfg = FeatureConfig()
    spec = default_spec(cfg, v2=v2)
    features = folder / "features.parquet"
    print(f"building a run in {folder} (simulate -> features -> gbdt)", flush=True)
    write_feature_table(build_features(simulate(sim), spec), features, cfg, spec=spec)
    run = folder / "run"
    train_run(features, run, RunConfig(train=TrainConfig(model="gbdt")))
    return run


def load_transactions(run: Path, columns: tuple[str, ...] = ()) -> pl.DataFrame:
    """The run's test-period transactions, canonical columns and the extra ``columns`` its
    feature spec reads, in time order."""
    config = json.loads((run / "config.json").read_text())
    test_start = config["periods"]["test_start"]
    scan = open_feature_source(Path(config["features_path"])).scan()
    day = pl.col("timestamp").dt.date().cast(pl.String)
    wanted = [*CANONICAL, *columns]
    frame = scan.filter(day >= test_start).select(wanted).sort("timestamp").collect()
    if frame.height == 0:
        raise FraudflowError(f"the feature table of {run} has no test-period transactions")
    return frame


def transaction_stream(frame: pl.DataFrame) -> Iterator[dict[str, Any]]:
    """The transactions as JSON-ready dicts, repeated forever with fresh ids and later times."""
    rows = frame.to_dicts()
    span = rows[-1]["timestamp"] - rows[0]["timestamp"] + timedelta(days=1)
    for repeat in itertools.count():
        suffix, shift = (f"-r{repeat}" if repeat else ""), span * repeat
        for row in rows:
            yield row | {  # the extra columns a custom spec reads, as they are
                "transaction_id": f"{row['transaction_id']}{suffix}",
                "timestamp": (row["timestamp"] + shift).isoformat(),
                "customer_id": str(row["customer_id"]),
                "terminal_id": str(row["terminal_id"]),
                "amount": float(row["amount"]),
            }


# --- the floor: features + model in process ---------------------------------------------------


def floor_ms(bundle: Bundle, frame: pl.DataFrame, *, warm: int, measured: int) -> float:
    """Median milliseconds of OnlineFeatures(MemoryStore) + predict_calibrated on one row
    (a run on another spec than the default one: SpecOnline(MemorySpecStore), as served)."""
    spec = feature_spec_of(bundle.meta)
    online: OnlineFeatures | SpecOnline = SpecOnline(spec, store=MemorySpecStore())
    if fast_path_serves(spec, bundle.meta):
        online = OnlineFeatures(cfg=feature_config_of(bundle.meta), store=MemoryStore())
    names = bundle.features
    stream = transaction_stream(frame)
    model = _floor_model(bundle)
    for tx in itertools.islice(stream, warm):
        values = online.features(tx)
        if isinstance(bundle.inputs, SequenceInputs):  # the cards' histories warm up too
            model(tx, np.array([[values[n] for n in names]], dtype=np.float32))
    times = []
    for tx in itertools.islice(stream, measured):
        started = time.perf_counter()
        values = online.features(tx)
        row = np.array([[values[n] for n in names]], dtype=np.float32)  # (1, F); None: NaN
        model(tx, row)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def _floor_model(bundle: Bundle) -> Callable[[dict[str, Any], np.ndarray], Any]:
    """The model's part of the floor: ``predict_calibrated``; for a sequence model, the card's
    history (appended and read, in a ``MemoryHistory``) and the service's scorer (one forward
    and backward pass: the score and its attributions come from one pass)."""
    declared = bundle.inputs
    if not isinstance(declared, SequenceInputs):
        return lambda tx, row: bundle.predict_calibrated(row)
    history = SequenceHistory(MemoryHistory(), features=bundle.features, length=declared.length)
    scorer = scorer_for(bundle, version="floor")

    def score(tx: dict[str, Any], row: np.ndarray) -> Any:
        return scorer.score(row, history.windows([to_event(tx)], row))

    return score


# --- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(
    run: Path, port: int, workers: int, scratch: Path, *, shadow: str | None = None
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "fraudflow", "serve", "--run", str(run), "--port", str(port),
        "--workers", str(workers), "--state", f"sqlite:///{scratch / 'state.db'}",
    ]  # fmt: skip
    if shadow:
        command += ["--shadow", shadow]
    # The audit log and any other service files go to the scratch folder, not into the run.
    env = os.environ | {"FRAUDFLOW_API_KEYS": API_KEY, "FRAUDFLOW_DATA_DIR": str(scratch)}
    log = (scratch / "server.log").open("wb")
    return subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's own process group (a graceful shutdown of the supervisor and
    its workers), SIGKILL after 15 s. The group is the server's: started in a new session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            conn = await Connection.open(port)
            status, _ = await conn.request("GET", "/readyz")
            conn.close()
            if status == 200:
                return
        await asyncio.sleep(0.25)
    raise RuntimeError(
        f"the server was not ready after {READY_TIMEOUT_SECONDS:.0f}s:\n{_tail(log)}"
    )


def _tail(log: Path) -> str:
    """The end of the server's output: the log folder is removed when the benchmark ends."""
    return log.read_text(errors="replace")[-3_000:]


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants; Linux only.

    Throughput on a shared 2-core machine swings with what else runs; the server's own CPU
    per decision barely does, so it is the figure to compare versions by.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    try:
        while todo:
            current = todo.pop()
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    except (OSError, ValueError, IndexError):
        return None
    return total


def worker_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds so far of each worker of the server (a direct child, with its threads and
    children; multiprocessing's resource tracker is not a worker); empty where /proc cannot
    tell."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        workers = [
            int(c) for c in children
            if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()
        ]  # fmt: skip
    except OSError:
        return {}
    seconds = {worker: tree_cpu_seconds(worker) for worker in workers}
    return {child: value for child, value in seconds.items() if value is not None}


def worker_shares(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """Each worker's share of the server's CPU between two ``worker_cpu_seconds``, largest
    first: [0.5, 0.5] is an even spread, [1.0, 0.0] one worker doing all the work."""
    used = [after[w] - before.get(w, 0.0) for w in after]
    total = sum(used)
    return sorted((round(u / total, 3) for u in used), reverse=True) if total > 0 else []


# --- a minimal HTTP/1.1 keep-alive client -------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it are sequential."""

    def __init__(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.port, self.reader, self.writer = port, reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(port, reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode("ascii") + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        headers = await self._headers()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return status, await self._chunked()
        return status, await self.reader.readexactly(int(headers.get("content-length", "0")))

    async def _headers(self) -> dict[str, str]:
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return headers

    async def _chunked(self) -> bytes:
        parts = []
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            parts.append(await self.reader.readexactly(size))
            await self.reader.readline()
        await self.reader.readline()  # the blank line after the last chunk
        return b"".join(parts)

    def close(self) -> None:
        self.writer.close()


# --- load ---------------------------------------------------------------------------------


@dataclass
class Load:
    """What a load phase saw: latencies of 2xx answers, decisions, statuses, wall, client CPU."""

    latencies_ms: list[float] = field(default_factory=list)
    decisions: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    first_failure: str | None = None
    seconds: float = 0.0
    client_cpu_seconds: float = 0.0

    def record(self, status: int, body: bytes, ms: float, n: int) -> None:
        self.statuses[status] += 1
        if 200 <= status < 300:
            self.latencies_ms.append(ms)
            self.decisions += n
        elif self.first_failure is None:
            self.first_failure = f"HTTP {status}: {body[:300].decode(errors='replace')}"

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


async def drive(
    port: int, bodies: Iterator[tuple[bytes, int]], path: str, concurrency: int, seconds: float
) -> Load:
    """``concurrency`` closed-loop clients POSTing ``bodies`` to ``path`` for ``seconds``.

    The clients start ``STAGGER_SECONDS`` apart, each opening its connection and sending its
    first request before the next one connects. Opened all at once, the connections arrive
    together and one uvicorn worker accepts them all (the workers share one listening
    socket): measured, every batch connection on one worker and the other idle. Staggered, a
    worker busy with a request leaves the next connection to an idle one, as a load
    balancer's pool opened over time would spread.
    """
    load = Load()
    deadline = time.perf_counter() + seconds
    cpu, wall = time.process_time(), time.perf_counter()
    clients = []
    for _ in range(concurrency):
        clients.append(asyncio.create_task(_client(port, bodies, path, deadline, load)))
        await asyncio.sleep(STAGGER_SECONDS)
    await asyncio.gather(*clients)
    load.seconds = time.perf_counter() - wall
    load.client_cpu_seconds = time.process_time() - cpu
    return load


async def _client(
    port: int, bodies: Iterator[tuple[bytes, int]], path: str, deadline: float, load: Load
) -> None:
    conn: Connection | None = None  # opened by the first request
    while time.perf_counter() < deadline:
        body, n = next(bodies)
        conn = await _post(port, conn, path, (body, n), time.perf_counter(), load)
        if conn is None:
            await asyncio.sleep(0.01)  # it failed: a moment before a new connection
    if conn is not None:
        conn.close()


async def _post(
    port: int,
    conn: Connection | None,
    path: str,
    request: tuple[bytes, int],
    since: float,
    load: Load,
) -> Connection | None:
    """POST one body on ``conn`` (opened if None), record it with latency from ``since``;
    the connection to go on with, None after a failure (then closed)."""
    body, n = request
    try:
        conn = conn or await Connection.open(port)
        status, answer = await asyncio.wait_for(
            conn.request("POST", path, body), REQUEST_TIMEOUT_SECONDS
        )
        load.record(status, answer, (time.perf_counter() - since) * 1e3, n)
        return conn
    except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
        load.errors[type(exc).__name__] += 1
        if conn is not None:
            conn.close()
        return None


async def drive_rate(
    port: int,
    bodies: Iterator[tuple[bytes, int]],
    path: str,
    *,
    rate: float,
    seconds: float,
    connections: int,
) -> Load:
    """An open loop: ``rate`` requests/s on schedule for ``seconds``, latency from schedule."""
    load = Load()
    idle: asyncio.Queue[Connection | None] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(None)  # a slot; its connection is opened on first use
    tasks: set[asyncio.Task[None]] = set()
    cpu, start = time.process_time(), time.perf_counter()
    total = int(rate * seconds)
    for k in range(total):
        scheduled = start + k / rate
        if (wait := scheduled - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        body, n = next(bodies)
        task = asyncio.create_task(_scheduled(port, path, body, n, scheduled, idle, load))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    load.seconds = time.perf_counter() - start
    load.client_cpu_seconds = time.process_time() - cpu
    while not idle.empty():
        if (conn := idle.get_nowait()) is not None:
            conn.close()
    return load


async def _scheduled(
    port: int,
    path: str,
    body: bytes,
    n: int,
    scheduled: float,
    idle: asyncio.Queue[Connection | None],
    load: Load,
) -> None:
    conn = await idle.get()
    idle.put_nowait(await _post(port, conn, path, (body, n), scheduled, load))


def single_bodies(stream: Iterator[dict[str, Any]]) -> Iterator[tuple[bytes, int]]:
    for tx in stream:
        yield json.dumps(tx).encode(), 1


def batch_bodies(stream: Iterator[dict[str, Any]], size: int) -> Iterator[tuple[bytes, int]]:
    while True:
        batch = list(itertools.islice(stream, size))
        yield json.dumps({"transactions": batch}).encode(), len(batch)


def encoded_ahead(bodies: Iterator[tuple[bytes, int]], count: int) -> Iterator[tuple[bytes, int]]:
    """The first ``count`` bodies encoded now, the rest on demand: encoding a 1,000-transaction
    body costs the client ~3 ms of the CPU the server needs (5% of a core at 15 batches/s)."""
    return itertools.chain(list(itertools.islice(bodies, count)), bodies)


# --- the benchmark ----------------------------------------------------------------------------


async def serve_phases(args: argparse.Namespace, run: Path, frame: pl.DataFrame) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fraudflow-bench-serve-") as tmp:
        scratch, port = Path(tmp), args.port or free_port()
        proc = start_server(run, port, args.workers, scratch)
        try:
            await wait_ready(proc, port, scratch / "server.log")
            stream = transaction_stream(frame)
            await _warm_up(port, stream)
            cpu_before = tree_cpu_seconds(proc.pid)
            single = await drive(
                port, single_bodies(stream), "/v1/decisions", args.concurrency, args.seconds
            )
            cpu_single = _cpu_since(proc.pid, cpu_before)
            at_rate = await drive_rate(
                port, single_bodies(stream), "/v1/decisions",
                rate=args.rate, seconds=args.rate_seconds, connections=args.rate_connections,
            )  # fmt: skip
            ahead = math.ceil(ENCODED_AHEAD_PER_SECOND * args.batch_seconds / args.batch_size)
            batches = encoded_ahead(batch_bodies(stream, args.batch_size), ahead)
            cpu_before = tree_cpu_seconds(proc.pid)
            workers_before = worker_cpu_seconds(proc.pid)
            batch = await drive(
                port,
                batches,
                "/v1/decisions/batch",
                args.batch_concurrency,
                args.batch_seconds,
            )
            cpu_batch = _cpu_since(proc.pid, cpu_before)
            shares = worker_shares(workers_before, worker_cpu_seconds(proc.pid))
        finally:
            stop_server(proc)
    return _serve_results(single, at_rate, batch) | {
        "rate": args.rate,
        "server_cpu_ms_per_decision": _per_decision(cpu_single, single.decisions),
        "batch_server_cpu_ms_per_decision": _per_decision(cpu_batch, batch.decisions),
        # Connections stay on the worker that accepted them: an uneven spread caps throughput.
        "batch_worker_cpu_shares": shares,
    }


async def shadow_phases(args: argparse.Namespace, run: Path, frame: pl.DataFrame) -> dict[str, Any]:
    """The champion's latency at ``--rate`` alone, then with the ``--shadow`` challengers,
    ``--shadow-rounds`` times in turn (a shared machine's load drifts: alternating spreads it
    over both); each configuration's latencies pooled over its rounds."""
    out: dict[str, Any] = {"shadow": args.shadow, "rate": args.rate, "rounds": args.shadow_rounds}
    pooled = {"alone": Load(), "with_shadow": Load()}
    cpu: dict[str, float | None] = {"alone": 0.0, "with_shadow": 0.0}
    loads: dict[str, list[float]] = {"alone": [], "with_shadow": []}
    for _ in range(args.shadow_rounds):
        for label, shadow in (("alone", None), ("with_shadow", args.shadow)):
            loads[label].append(os.getloadavg()[0])  # a shared machine: what else ran
            at_rate, seconds = await _rate_phase(args, run, frame, shadow)
            spent = cpu[label]
            cpu[label] = None if spent is None or seconds is None else spent + seconds
            pooled[label].latencies_ms += at_rate.latencies_ms
            pooled[label].decisions += at_rate.decisions
            pooled[label].errors += at_rate.errors
            pooled[label].statuses += at_rate.statuses
    for label, load in pooled.items():
        out[label] = {
            "p50_ms": load.percentile(50), "p95_ms": load.percentile(95),
            "p99_ms": load.percentile(99), "errors": dict(load.errors),
            "statuses": dict(load.statuses), "decisions": load.decisions,
            # The server's CPU over the open loop (the challengers' scoring included, but for
            # what they still held when it ended), and the 1-minute load average at each start.
            "server_cpu_ms_per_decision": _per_decision(cpu[label], load.decisions),
            "load_average": loads[label],
        }  # fmt: skip
    alone, with_shadow = out["alone"]["p99_ms"], out["with_shadow"]["p99_ms"]
    out["shadow_p99_ratio"] = with_shadow / alone if alone and with_shadow else None
    return out


async def _rate_phase(
    args: argparse.Namespace, run: Path, frame: pl.DataFrame, shadow: str | None
) -> tuple[Load, float | None]:
    """A fresh server (with ``shadow`` challengers, if any), warmed up, then the open loop;
    and the server's CPU seconds over the loop."""
    with tempfile.TemporaryDirectory(prefix="fraudflow-bench-shadow-") as tmp:
        scratch, port = Path(tmp), args.port or free_port()
        proc = start_server(run, port, args.workers, scratch, shadow=shadow)
        try:
            await wait_ready(proc, port, scratch / "server.log")
            stream = transaction_stream(frame)  # the same transactions for every server
            await _warm_up(port, stream)
            before = tree_cpu_seconds(proc.pid)
            load = await drive_rate(
                port, single_bodies(stream), "/v1/decisions",
                rate=args.rate, seconds=args.rate_seconds, connections=args.rate_connections,
            )  # fmt: skip
            return load, _cpu_since(proc.pid, before)
        finally:
            stop_server(proc)


def _cpu_since(pid: int, before: float | None) -> float | None:
    after = tree_cpu_seconds(pid)
    return None if before is None or after is None else after - before


def _per_decision(cpu_seconds: float | None, decisions: int) -> float | None:
    return None if cpu_seconds is None or decisions == 0 else cpu_seconds / decisions * 1e3


async def _warm_up(port: int, stream: Iterator[dict[str, Any]]) -> None:
    """A few hundred decisions first: imports, caches and connections are warm when timed."""
    conn = await Connection.open(port)
    try:
        for tx in itertools.islice(stream, WARMUP_REQUESTS):
            status, body = await conn.request("POST", "/v1/decisions", json.dumps(tx).encode())
            if status >= 300:
                raise RuntimeError(f"warm-up request failed, HTTP {status}: {body[:500]!r}")
    finally:
        conn.close()


def _serve_results(single: Load, at_rate: Load, batch: Load) -> dict[str, Any]:
    return {
        "decisions_per_second": single.decisions / single.seconds,
        "p50_ms": at_rate.percentile(50),
        "p95_ms": at_rate.percentile(95),
        "p99_ms": at_rate.percentile(99),
        "rate_decisions_per_second": at_rate.decisions / at_rate.seconds,
        "rate_failed_requests": sum(at_rate.errors.values())
        + sum(n for status, n in at_rate.statuses.items() if not 200 <= status < 300),
        "rate_first_failure": at_rate.first_failure,
        "rate_client_cpu_cores": at_rate.client_cpu_seconds / at_rate.seconds,
        "closed_loop_p50_ms": single.percentile(50),
        "closed_loop_p95_ms": single.percentile(95),
        "closed_loop_p99_ms": single.percentile(99),
        "single_statuses": dict(single.statuses),
        "single_connection_errors": dict(single.errors),
        "single_first_failure": single.first_failure,
        "client_cpu_cores": single.client_cpu_seconds / single.seconds,
        "batch_decisions_per_second": batch.decisions / batch.seconds,
        "batch_p50_ms": batch.percentile(50),
        "batch_statuses": dict(batch.statuses),
        "batch_first_failure": batch.first_failure,
        "batch_client_cpu_cores": batch.client_cpu_seconds / batch.seconds,
    }


def targets(result: dict[str, Any]) -> dict[str, bool]:
    """Single: the capacity reaches the target rate, and at that rate (open loop, all of it
    served, nothing failed) the p99 is within the target. Shadow: the p99 with the
    challengers within 20 % of the p99 without."""
    if "shadow" in result:
        ratio = result.get("shadow_p99_ratio")
        return {"shadow_p99_within_20_percent": ratio is not None and ratio <= 1.2}
    p99 = result.get("p99_ms")
    rate, p99_ms = single_targets(result)
    served = (result.get("rate_decisions_per_second") or 0) >= 0.98 * rate
    met = {
        "single": (result.get("decisions_per_second") or 0) >= rate
        and result.get("rate", 0) >= rate
        and served
        and result.get("rate_failed_requests") == 0
        and p99 is not None
        and p99 <= p99_ms,
        "batch": (result.get("batch_decisions_per_second") or 0) >= TARGET_BATCH_PER_SECOND,
    }
    if result.get("inputs") == "sequence":
        met["floor"] = (result.get("floor_ms") or math.inf) <= TARGET_SEQUENCE_FLOOR_MS
    return met


def single_targets(result: dict[str, Any]) -> tuple[float, float]:
    """(decisions/s, p99 ms) a run's model is held to: a sequence model's are its own."""
    if result.get("inputs") == "sequence":
        return TARGET_SEQUENCE_PER_SECOND, TARGET_SEQUENCE_P99_MS
    return TARGET_SINGLE_PER_SECOND, TARGET_P99_MS


def report(result: dict[str, Any]) -> None:
    def fmt(key: str, spec: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else format(value, spec)

    path = result.get("online_path")
    print(f"online path: {path} ({'default spec' if path == 'fast' else 'a custom spec'})")
    if "shadow" in result:
        for label in ("alone", "with_shadow"):
            phase = result.get(label) or {}
            ms = [phase.get(k) for k in ("p50_ms", "p95_ms", "p99_ms")]
            shown = ", ".join("n/a" if v is None else f"{v:.2f}" for v in ms)
            cpu = phase.get("server_cpu_ms_per_decision")
            print(
                f"champion {label} at {result.get('rate'):,.0f}/s: p50, p95, p99 {shown} ms "
                f"({phase.get('decisions', 0):,} decisions, errors {phase.get('errors')}; "
                f"server CPU {'n/a' if cpu is None else f'{cpu:.3f}'} ms/decision; load "
                f"average at start {phase.get('load_average')})"
            )
        print(f"p99 with / without challengers: {fmt('shadow_p99_ratio', '.3f')}")
        print(f"targets met: {result.get('targets_met')}")
        return
    print(f"floor (features + model, in process): {fmt('floor_ms', '.3f')} ms / decision")
    print(
        f"single, capacity (closed loop): {fmt('decisions_per_second', ',.0f')} decisions/s "
        f"(its p50 {fmt('closed_loop_p50_ms', '.2f')} ms, p99 {fmt('closed_loop_p99_ms', '.2f')}"
        f" ms; client used {fmt('client_cpu_cores', '.2f')} of {os.cpu_count()} cores)"
    )
    print(
        f"single, open loop at {fmt('rate', ',.0f')}/s: served "
        f"{fmt('rate_decisions_per_second', ',.0f')}/s, p50 {fmt('p50_ms', '.2f')} ms, "
        f"p95 {fmt('p95_ms', '.2f')} ms, p99 {fmt('p99_ms', '.2f')} ms, "
        f"failed {fmt('rate_failed_requests', 'd')}"
    )
    print(
        f"batch: {fmt('batch_decisions_per_second', ',.0f')} decisions/s "
        f"(server CPU by worker: {result.get('batch_worker_cpu_shares')})"
    )
    print(
        f"server CPU per decision: single {fmt('server_cpu_ms_per_decision', '.3f')} ms, "
        f"batch {fmt('batch_server_cpu_ms_per_decision', '.3f')} ms"
    )
    met = targets(result)
    rate, p99_ms = single_targets(result)
    print(
        f"target >= {rate:,.0f}/s with p99 <= {p99_ms:g} ms: "
        f"{'met' if met['single'] else 'NOT met'}; batch >= {TARGET_BATCH_PER_SECOND:,}/s: "
        f"{'met' if met['batch'] else 'NOT met'}"
    )
    if "floor" in met:
        print(
            f"floor target <= {TARGET_SEQUENCE_FLOOR_MS:g} ms: "
            f"{'met' if met['floor'] else 'NOT met'}"
        )
    for key in ("single_first_failure", "rate_first_failure", "batch_first_failure", "error"):
        if result.get(key):
            print(f"{key}: {result[key]}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="Run folder; built if omitted.")
    parser.add_argument(
        "--v2", action="store_true", help="Build the run on the default spec with the v2 block."
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="Open-loop requests/s for the latency figures (default: the model's target).",
    )
    parser.add_argument("--rate-seconds", type=float, default=15.0)
    parser.add_argument("--rate-connections", type=int, default=64)
    parser.add_argument("--port", type=int, default=0, help="0: a free port.")
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--batch-seconds", type=float, default=10.0)
    # Two per worker: one decided while the other waits for its audit commit (with one per
    # worker, the worker idled through every commit).
    parser.add_argument("--batch-concurrency", type=int, default=4)
    parser.add_argument("--floor-transactions", type=int, default=2_000)
    parser.add_argument("--warm-transactions", type=int, default=20_000)
    parser.add_argument(
        "--shadow",
        default=None,
        help="RUN[,RUN...]: instead of the phases above, the champion's latency at --rate "
        "without and with these challengers scored in shadow.",
    )
    parser.add_argument("--shadow-rounds", type=int, default=2)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="fraudflow-bench-run-") as tmp:
        run = args.run or build_run(Path(tmp), v2=args.v2)
        bundle = load_bundle(run)
        spec = feature_spec_of(bundle.meta)
        frame = load_transactions(run, extra_columns(spec))
        result: dict[str, Any] = {
            "run": str(run),
            "model": bundle.meta["model"],
            "inputs": bundle.inputs.kind,
            # The targets hold for the default spec's fast path; other specs are served by
            # the spec engine (SpecOnline), reported here for what it costs.
            "online_path": "fast" if fast_path_serves(spec, bundle.meta) else "spec",
            "workers": args.workers,
            "concurrency": args.concurrency,
            "batch_size": args.batch_size,
            "cpu_count": os.cpu_count(),
            "floor_ms": floor_ms(
                bundle, frame, warm=args.warm_transactions, measured=args.floor_transactions
            ),
        }
        if args.rate is None:
            args.rate = single_targets(result)[0]
        phases = shadow_phases if args.shadow else serve_phases
        try:
            result |= asyncio.run(phases(args, run, frame))
        except (RuntimeError, OSError, asyncio.IncompleteReadError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
    result["targets_met"] = targets(result)
    report(result)
    print(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
