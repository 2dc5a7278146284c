"""State and audit durability: what one bad event, a lost audit commit or a failing disk or
Redis must not cost (issue 14).

Each test drives the real app on loopback HTTP (``LiveServer``); faults are real: a
transaction stored behind the HTTP validation, a full or read-only file system, a Redis
server killed mid-stream.
"""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fraudflow.features.online import Event, epoch_us
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions
from fraudflow.serve.schemas import TransactionIn
from fraudflow.serve.service import DecisionService
from tests.serve.test_api import (
    AUTH,
    SMALL_SIM,
    LiveServer,
    settings_for,
    simulate_and_train,
    transaction,
    wait_ready,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("durability"), SMALL_SIM)
    return run


def _state_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT transaction_id FROM transactions ORDER BY seq").fetchall()
    return [tid for (tid,) in rows]


# --- defect 1: one far-future timestamp -----------------------------------------------------


def test_one_far_future_event_forgets_nothing(run_dir: Path, tmp_path: Path) -> None:
    """Ten transactions of a card, then one dated 9999-12-31 for another card, stored behind
    the request validation (straight into the engine's state path): the first card's
    transactions stay, their replays answer the recorded decisions, their labels apply."""
    app = create_app(settings_for(run_dir, tmp_path))
    with LiveServer(app) as live, live.client(headers=AUTH) as c:
        wait_ready(c)
        first = [c.post("/v1/decisions", json=transaction(i)) for i in range(10)]
        assert [r.status_code for r in first] == [200] * 10
        service: DecisionService = app.state.service
        assert service.engine is not None
        far = datetime(9999, 12, 31, tzinfo=UTC)
        rows = service.engine.record([Event("far", epoch_us(far), "c2", "t9", 5.0)])
        assert rows.fresh.tolist() == [True]
        assert _state_ids(tmp_path / "state.db") == [f"tx-{i}" for i in range(10)] + ["far"]
        replays = [c.post("/v1/decisions", json=transaction(i)) for i in range(10)]
        assert [r.content for r in replays] == [r.content for r in first]
        labels = [
            c.post("/v1/labels", json={"transaction_id": f"tx-{i}", "is_fraud": i % 2}).json()
            for i in range(10)
        ]
        assert [label["applied"] for label in labels] == [True] * 10
    assert read_decisions(tmp_path / "audit.db")["transaction_id"].to_list() == [
        f"tx-{i}" for i in range(10)
    ]


# --- defect 3: orphans (in the state, no decision recorded) ---------------------------------


def _orphan(app: FastAPI, tx: dict[str, Any]) -> None:
    """Store ``tx`` in the feature state only, as a crash between the state update and the
    audit commit leaves it."""
    service: DecisionService = app.state.service
    assert service.engine is not None
    event = TransactionIn.model_validate(tx).event()
    assert service.engine.record([event]).fresh.tolist() == [True]


def test_an_orphan_is_decided_again_as_it_would_have_been(run_dir: Path, tmp_path: Path) -> None:
    txs = [transaction(i, terminal_id="t1") for i in range(10)]
    first = create_app(settings_for(run_dir, tmp_path / "a"))
    with LiveServer(first) as live, live.client(headers=AUTH) as c:
        wait_ready(c)
        expected = [c.post("/v1/decisions", json=tx).content for tx in txs]
    app = create_app(settings_for(run_dir, tmp_path / "b", duplicate_wait_seconds=0.2))
    with LiveServer(app) as live, live.client(headers=AUTH) as c:
        wait_ready(c)
        before = [c.post("/v1/decisions", json=tx).content for tx in txs[:5]]
        _orphan(app, txs[5])
        after = [c.post("/v1/decisions", json=tx).content for tx in txs[6:]]
        retried = c.post("/v1/decisions", json=txs[5])
        assert retried.status_code == 200, retried.text
        replayed = c.post("/v1/decisions", json=txs[5]).content
    assert [*before, retried.content, *after] == expected
    assert replayed == retried.content
    audit = read_decisions(tmp_path / "b" / "audit.db")
    assert sorted(audit["transaction_id"]) == sorted(tx["transaction_id"] for tx in txs)


def test_retries_of_orphans_hold_up_no_other_request(run_dir: Path, tmp_path: Path) -> None:
    """Ten orphans retried at once each wait for another process to record them (it never
    will); a fresh decision meanwhile answers at once, and each retry then completes."""
    wait = 2.0
    app = create_app(settings_for(run_dir, tmp_path, duplicate_wait_seconds=wait))
    with LiveServer(app) as live, live.client(headers=AUTH) as c:
        wait_ready(c)
        orphans = [transaction(i, customer_id=f"o{i}") for i in range(10)]
        for tx in orphans:
            _orphan(app, tx)
        with ThreadPoolExecutor(len(orphans)) as pool:
            started = time.monotonic()
            retries = [pool.submit(_post, live.url, tx) for tx in orphans]
            time.sleep(0.3)  # the retries are waiting now
            fresh = c.post("/v1/decisions", json=transaction(50))
            fresh_seconds = time.monotonic() - started - 0.3
            answers = [r.result() for r in retries]
        assert fresh.status_code == 200 and fresh_seconds < 0.5, fresh_seconds
        assert [status for status, _ in answers] == [200] * len(orphans)
        replays = [c.post("/v1/decisions", json=tx).content for tx in orphans]
        assert replays == [body for _, body in answers]
    audit = read_decisions(tmp_path / "audit.db")
    assert len(audit) == len(orphans) + 1


def _post(url: str, tx: dict[str, Any]) -> tuple[int, bytes]:
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        response = c.post("/v1/decisions", json=tx)
    return response.status_code, response.content
