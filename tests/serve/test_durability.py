"""State and audit durability: what one bad event, a lost audit commit or a failing disk or
Redis must not cost (issue 14).

Each test drives the real app on loopback HTTP (``LiveServer``); faults are real: a
transaction stored behind the HTTP validation, a full or read-only file system, a Redis
server killed mid-stream.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fraudflow.features.online import Event, epoch_us
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions
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
