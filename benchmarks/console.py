"""Benchmark: the review console's pages with 100,000 open cases, on loopback.

A scratch folder gets a case store with ``--cases`` open review cases over ``--cards`` cards
and the matching decisions in the audit log (each case's own, plus as many approved ones of
the same cards, so each card has a month of history), 2% of them labelled fraud; the case
pages' history is followed from the audit log into the case store before the clock starts,
as the service does in the background. Then the real server (``python -m fraudflow serve
--run RUN --data-dir SCRATCH``) serves it, one worker, and one signed-in analyst (httpx, one
keep-alive connection) reads, one request at a time:

* the queue page (``GET /console/queue``: counts, the first page of the highest-priority open
  cases) ``--requests`` times;
* case pages (``GET /console/cases/{id}`` of random cases: the case, its reasons in words, the
  card's last 30 days with the chart, the terminal's known frauds, the card's earlier cases;
  each view is also written to the audit trail) ``--requests`` times.

Reported: p50/p95/p99 milliseconds per page, against the targets (queue p95 <= 200 ms, case
page p95 <= 100 ms), and the ratio p95 / target. Timings are wall-clock on whatever else the
machine is doing. Without ``--run`` a small LightGBM run is built first (the server needs a
model to start; the pages do not use it). The last line printed is a JSON object.

Run from the repository root:

    .venv/bin/python benchmarks/console.py [--run RUN_DIR] [--cases 100000] [--cards 10000]
        [--requests 300]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from fraudflow.config import FeatureConfig, RunConfig, SimulationConfig, TrainConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import build_features, write_feature_table
from fraudflow.serve.audit import AuditLog, DecisionRecord, LabelRecord, pack_features
from fraudflow.serve.cases import CaseIn, CaseStore
from fraudflow.serve.history import follow_audit
from fraudflow.serve.users import UserStore, users_path_for
from fraudflow.train import train_run

HOST = "127.0.0.1"
API_KEY = "bench-key"
PASSWORD = "benchmark password"
TARGET_QUEUE_P95_MS = 200.0
TARGET_CASE_P95_MS = 100.0
READY_TIMEOUT_SECONDS = 120.0
GROUP = 4_096  # decisions per audit commit, as the service's largest groups
DAY_US = 86_400 * 1_000_000
REASONS = (
    "score 0.7312 >= review threshold 0.5",
    "customer__amount_ratio__30d = 5.2 raised the fraud log-odds by 1.234",
    "terminal__fraud_rate__28d = 0.12 raised the fraud log-odds by 0.801",
)


def build_run(folder: Path) -> Path:
    """A small LightGBM run (the server needs one to start)."""
    sim = SimulationConfig(n_customers=300, n_terminals=600, n_days=60, seed=0)
    cfg = FeatureConfig()
    features = folder / "features.parquet"
    print(f"building a run in {folder} (simulate -> features -> gbdt)", flush=True)
    write_feature_table(build_features(simulate(sim), cfg), features, cfg)
    run = folder / "run"
    train_run(features, run, RunConfig(train=TrainConfig(model="gbdt")))
    return run


def fill(data: Path, *, cases: int, cards: int, seed: int = 0) -> None:
    """The audit log and the case store of the service's ``data`` folder: ``cases`` open
    review cases and 2 x ``cases`` decisions over the last 30 days, 2% labelled fraud; an
    analyst account."""
    rng = random.Random(seed)
    now = time.time_ns() // 1_000
    names = ("customer__amount_ratio__30d",)
    audit_path = data / "audit.db"  # as ``ServeSettings`` places them
    log = AuditLog(audit_path)
    store = CaseStore(data / "cases.db")
    opened: list[CaseIn] = []
    records: list[DecisionRecord | LabelRecord] = []
    for i in range(2 * cases):
        review = i % 2 == 0
        tid, card, terminal = f"tx-{i}", f"c{rng.randrange(cards)}", f"t{rng.randrange(cards)}"
        t_us = now - rng.randrange(30 * DAY_US)
        amount, score = round(rng.lognormvariate(3.5, 1.0), 2), rng.random()
        decision = "review" if review else "approve"
        body = json.dumps({"transaction_id": tid, "decision": decision, "reasons": []}).encode()
        records.append(DecisionRecord(
            tid, t_us, card, terminal, amount, score, score, decision, "bench", now,
            pack_features([1.0]), body, names,
        ))  # fmt: skip
        if rng.random() < 0.02:
            records.append(LabelRecord(tid, True, None, now, True))
        if review:
            opened.append(CaseIn(
                transaction_id=tid, customer_id=card, terminal_id=terminal, amount=amount,
                score=score, decision="review", reasons=REASONS, at_us=now - rng.randrange(DAY_US),
            ))  # fmt: skip
        if len(records) >= GROUP:
            log.submit(records).result()
            records = []
    log.submit(records).result()
    log.close()
    for start in range(0, len(opened), 10_000):
        store.open_cases(opened[start : start + 10_000])
    follow_audit(audit_path, store, now_us=now)
    store.close()
    users = UserStore(users_path_for(audit_path))
    users.add("ann", "analyst", PASSWORD, now)
    users.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(run: Path, port: int, scratch: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "fraudflow", "serve", "--run", str(run), "--port", str(port),
        "--data-dir", str(scratch / "data"),
    ]  # fmt: skip
    env = os.environ | {"FRAUDFLOW_API_KEYS": API_KEY, "FRAUDFLOW_LOG_LEVEL": "warning"}
    log = (scratch / "server.log").open("wb")
    return subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's own process group (it runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if client.get("/readyz").status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"the server was not ready in time:\n{log.read_text()}")


def sign_in(client: httpx.Client) -> None:
    page = client.get("/console/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None, page
    form = {"csrf": csrf.group(1), "username": "ann", "password": PASSWORD}
    response = client.post("/console/login", data=form)
    if response.status_code != 303:
        raise RuntimeError(f"sign-in failed: {response.status_code} {response.text[:300]}")


def timed(client: httpx.Client, paths: list[str], *, must_hold: str) -> list[float]:
    """Milliseconds per GET of each path, one after the other; each answer must be 200 and
    hold ``must_hold``."""
    times = []
    for path in paths:
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1e3)
        if response.status_code != 200 or must_hold not in response.text:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
    return times


def summary(times: list[float], target: float) -> dict[str, float]:
    q = statistics.quantiles(times, n=100, method="inclusive")
    p95 = q[94]
    return {
        "p50_ms": round(q[49], 2),
        "p95_ms": round(p95, 2),
        "p99_ms": round(q[98], 2),
        "target_p95_ms": target,
        "ratio_to_target": round(p95 / target, 3),
    }


def measure(args: argparse.Namespace, run: Path, scratch: Path) -> dict[str, Any]:
    started = time.perf_counter()
    fill(scratch / "data", cases=args.cases, cards=args.cards)
    print(f"filled {args.cases:,} open cases and {2 * args.cases:,} decisions in "
          f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    port = free_port()
    proc = start_server(run, port, scratch)
    try:
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=60) as client:
            wait_ready(client, proc, scratch / "server.log")
            sign_in(client)
            rng = random.Random(1)
            warm = [f"/console/cases/{rng.randrange(1, args.cases + 1)}" for _ in range(20)]
            timed(client, ["/console/queue"] * 5 + warm, must_hold="</html>")
            queue = timed(client, ["/console/queue"] * args.requests, must_hold="Take next")
            ids = [rng.randrange(1, args.cases + 1) for _ in range(args.requests)]
            paths = [f"/console/cases/{i}" for i in ids]
            case = timed(client, paths, must_hold='id="card-history"')
    finally:
        stop_server(proc)
    return {
        "benchmark": "console",
        "open_cases": args.cases,
        "decisions": 2 * args.cases,
        "cards": args.cards,
        "requests": args.requests,
        "queue_page": summary(queue, TARGET_QUEUE_P95_MS),
        "case_page": summary(case, TARGET_CASE_P95_MS),
    }


def report(result: dict[str, Any]) -> None:
    for page in ("queue_page", "case_page"):
        r = result[page]
        met = "met" if r["p95_ms"] <= r["target_p95_ms"] else "NOT met"
        print(
            f"{page.replace('_', ' ')}: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, "
            f"p99 {r['p99_ms']:.1f} ms; p95 / target {r['ratio_to_target']:.2f} "
            f"(<= {r['target_p95_ms']:.0f} ms: {met})"
        )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a run to serve (default: build a small one)")
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fraudflow-console-bench-") as tmp:
        scratch = Path(tmp)
        run = args.run if args.run is not None else build_run(scratch)
        report(measure(args, run, scratch))


if __name__ == "__main__":
    main()
