"""Shared helpers of the decision service's tests: a live server on real loopback HTTP (uvicorn
in a thread of the test process, on a free 127.0.0.1 port; httpx as the client), a trained
run, settings, transactions and metric reading."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from fraudflow.artifacts import seal_bundle
from fraudflow.config import FeatureConfig, RunConfig, SimulationConfig, TrainConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import build_features, write_feature_table
from fraudflow.serve.settings import ServeSettings
from fraudflow.train import train_run

CLIENT_KEY, ADMIN_KEY = "client-key-123", "admin-key-456"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


# --- shared helpers -----------------------------------------------------------------------


def simulate_and_train(
    folder: Path, sim: SimulationConfig, *, model: str = "gbdt"
) -> tuple[pl.DataFrame, Path]:
    """A raw log, its feature table and a run trained on it: (raw log, run folder)."""
    raw = simulate(sim)
    cfg = FeatureConfig()
    write_feature_table(build_features(raw, cfg), folder / "features.parquet", cfg)
    run = folder / f"run-{model}"
    train_run(folder / "features.parquet", run, RunConfig(train=TrainConfig(model=model, epochs=2)))
    return raw, run


def settings_for(run: Path, data_dir: Path, **extra: Any) -> ServeSettings:
    fields: dict[str, Any] = {
        "run": run,
        "data_dir": data_dir,
        "api_keys": SecretStr(CLIENT_KEY),
        "admin_keys": SecretStr(ADMIN_KEY),
    }
    return ServeSettings(**(fields | extra))


class LiveServer:
    """uvicorn serving ``app`` in a thread, on a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert self._thread.is_alive(), "the server thread died"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


def wait_ready(client: httpx.Client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the service never became ready"
        time.sleep(0.02)


def transaction(i: int, **change: Any) -> dict[str, Any]:
    at = datetime(2026, 3, 1, 12, tzinfo=UTC) + timedelta(minutes=i)
    tx = {
        "transaction_id": f"tx-{i}",
        "timestamp": at.isoformat(),
        "customer_id": "c1",
        "terminal_id": f"t{i % 3}",
        "amount": 20.0 + i,
    }
    return tx | change


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, rest = sample.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and found == want:
            return float(value)
    return 0.0


# --- fixtures -----------------------------------------------------------------------------

SMALL_SIM = SimulationConfig(n_customers=150, n_terminals=300, n_days=60, seed=3)


def copy_of_run(run_dir: Path, dest: Path) -> Path:
    """The same model under another version: the bundle's meta gains a harmless key (and
    the bundle's recorded hashes follow, as a retrained run's would)."""
    shutil.copytree(run_dir, dest)
    meta_path = dest / "model" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"note": "retrained"}))
    seal_bundle(dest)
    return dest
