"""Online/offline parity: the service, fed a log's raw transactions (and each fraud label when
it becomes known), computes the batch features and reproduces the run's test scores.

The whole log is replayed (the test period's features need its 37 days of history): mostly
through the batch endpoint, the last transactions one request each. Labels are posted as the
batch rule makes them known: before the first transaction at t >= s + label delay. Only fraud
labels are posted; a transaction without a label counts as legitimate, as in batch.
"""

from __future__ import annotations

import heapq
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest
import redis

from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.data.schema import IS_FRAUD, TIMESTAMP, TRANSACTION_ID
from fraudflow.features import build_features, feature_names
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions
from fraudflow.serve.replay_record import COMPACT
from tests.helpers.service import AUTH, LiveServer, settings_for, simulate_and_train, wait_ready
from tests.serve.test_state import needs_redis, redis_url  # noqa: F401 (a fixture)

SIM = SimulationConfig(n_customers=80, n_terminals=160, n_days=60, seed=5)
CFG = FeatureConfig()
SINGLES = 150  # the last transactions, one request each
BATCH = 4000


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, Path]:
    return simulate_and_train(tmp_path_factory.mktemp("parity"), SIM)


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "transaction_id": row["transaction_id"],
        "timestamp": row[TIMESTAMP].isoformat(),
        "customer_id": row["customer_id"],
        "terminal_id": row["terminal_id"],
        "amount": row["amount"],
        "fraud_scenario": row["fraud_scenario"],  # an extra field: ignored
    }


def replay(client: httpx.Client, raw: pl.DataFrame) -> None:
    rows = raw.sort(TIMESTAMP, maintain_order=True).to_dicts()
    delay = timedelta(days=CFG.label_delay_days)
    due: list[tuple[Any, int, Any]] = []  # heap of (s + delay, arrival, transaction_id)
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        if batch:
            response = client.post("/v1/decisions/batch", json={"transactions": batch})
            assert response.status_code == 200, response.text
            batch.clear()

    for i, row in enumerate(rows):
        if due and due[0][0] <= row[TIMESTAMP]:
            flush()
            while due and due[0][0] <= row[TIMESTAMP]:
                label = {"transaction_id": heapq.heappop(due)[2], "is_fraud": 1}
                assert client.post("/v1/labels", json=label).json()["applied"]
        if i < len(rows) - SINGLES:
            batch.append(_json_row(row))
            if len(batch) == BATCH:
                flush()
        else:
            flush()
            assert client.post("/v1/decisions", json=_json_row(row)).status_code == 200
        if row[IS_FRAUD]:
            heapq.heappush(due, (row[TIMESTAMP] + delay, i, row[TRANSACTION_ID]))
    flush()


def assert_parity(audit_path: Path, raw: pl.DataFrame, run: Path) -> None:
    audit = read_decisions(audit_path)
    batch = build_features(raw, CFG).with_columns(pl.col(TRANSACTION_ID).cast(pl.String))
    assert audit.height == batch.height
    joined = batch.join(audit, on=TRANSACTION_ID, suffix="_online")
    assert joined.height == batch.height
    for name in feature_names(CFG):
        online, want = joined[f"{name}_online"].to_numpy(), joined[name].to_numpy()
        err = np.abs(online - want) / np.maximum(1.0, np.abs(want))
        i = int(err.argmax())
        assert err[i] <= 1e-6, f"{name}, row {i}: online {online[i]!r}, batch {want[i]!r}"
    predictions = pl.read_parquet(run / "predictions.parquet").with_columns(
        pl.col(TRANSACTION_ID).cast(pl.String)
    )
    scored = predictions.join(audit, on=TRANSACTION_ID, suffix="_online")
    assert scored.height == predictions.height > 500
    gap = np.abs(scored["score"].to_numpy() - scored["score_online"].to_numpy())
    assert gap.max() <= 1e-6, f"largest score gap {gap.max()}"


def _serve_and_replay(run: Path, raw: pl.DataFrame, data_dir: Path, **extra: Any) -> None:
    app = create_app(settings_for(run, data_dir, **extra))
    with LiveServer(app) as live, live.client(headers=AUTH) as client:
        wait_ready(client)
        replay(client, raw)


@pytest.mark.slow
def test_sqlite_service_matches_batch_features_and_run_scores(
    trained: tuple[pl.DataFrame, Path], tmp_path: Path
) -> None:
    raw, run = trained
    _serve_and_replay(run, raw, tmp_path)
    assert_parity(tmp_path / "audit.db", raw, run)


@needs_redis
@pytest.mark.slow
def test_redis_service_matches_batch_features_and_run_scores(
    trained: tuple[pl.DataFrame, Path],
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    raw, run = trained
    _serve_and_replay(run, raw, tmp_path, state=redis_url)
    assert_parity(tmp_path / "audit.db", raw, run)


@needs_redis
def test_redis_replicas_share_idempotency(
    trained: tuple[pl.DataFrame, Path],
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    """A retry that lands on another replica (own audit log, shared Redis) gets the same answer."""
    _, run = trained
    tx = {"transaction_id": "replica-1", "timestamp": "2026-03-01T10:00:00Z",
          "customer_id": "c", "terminal_id": "t", "amount": 42.0}  # fmt: skip
    answers = []
    for replica in ("a", "b"):
        app = create_app(settings_for(run, tmp_path / replica, state=redis_url))
        with LiveServer(app) as live, live.client(headers=AUTH) as client:
            wait_ready(client)
            answers.append(client.post("/v1/decisions", json=tx | {"amount": 1.0 + len(answers)}))
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].content == answers[1].content
    assert read_decisions(tmp_path / "a" / "audit.db").height == 1
    assert read_decisions(tmp_path / "b" / "audit.db").height == 0  # b only replayed a's answer
    with redis.Redis.from_url(redis_url) as client:
        stored = client.get("fraudflow:{t:replica-1}r")
    assert stored is not None and stored[0] & COMPACT  # the small form, rebuilt exactly
