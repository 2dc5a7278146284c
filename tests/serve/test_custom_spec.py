"""A model trained on a custom feature spec, served end to end on loopback HTTP: requests
carry the spec's extra column, labels reach later decisions' features, reloads between specs
keep the history, and a spec the service cannot serve is refused at start and at reload."""

import json
import random
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from fraudflow.artifacts import seal_bundle
from fraudflow.config import FeatureConfig, RunConfig, TrainConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import build_features, parse_spec, write_feature_table
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions
from fraudflow.serve.schemas import TransactionIn
from fraudflow.serve.service import DecisionService
from fraudflow.train import train_run
from tests.helpers.redis_server import REDIS_SERVER, needs_redis, redis_server
from tests.helpers.service import (
    ADMIN,
    AUTH,
    SMALL_SIM,
    LiveServer,
    metric_value,
    settings_for,
    simulate_and_train,
    wait_ready,
)

SPEC = {
    "label_delay": "7d",
    "aggregate": [
        {"name": "customer__count", "by": ["customer_id"], "fn": "count", "windows": ["1d", "7d"]},
        {"name": "card_channel__count", "by": ["customer_id", "channel"], "fn": "count",
         "windows": ["1d", "last 3"]},
        {"name": "customer__channels", "by": ["customer_id"], "fn": "count_distinct",
         "of": "channel", "windows": ["7d"]},
        {"name": "customer__ecom_mean", "by": ["customer_id"], "fn": "mean", "of": "amount",
         "where": 'channel == "ecom"', "windows": ["7d"], "default": 0.0},
        {"name": "customer__fraud", "by": ["customer_id"], "fn": "fraud_count",
         "windows": ["30d"]},
    ],
    "derive": [{"name": "tx__log_amount", "expr": "log1p(amount)"}],
}  # fmt: skip
FRAUDS = "customer__fraud__30d"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run on the custom spec (the simulated log plus a ``channel`` column), and one on
    the default spec."""
    folder = tmp_path_factory.mktemp("custom")
    rng = random.Random(0)
    raw = simulate(SMALL_SIM)
    raw = raw.with_columns(
        pl.Series("channel", [rng.choice(["ecom", "pos"]) for _ in range(raw.height)])
    )
    spec, cfg = parse_spec(SPEC), FeatureConfig()
    write_feature_table(build_features(raw, spec), folder / "features.parquet", cfg, spec=spec)
    custom = folder / "run-custom"
    train_run(folder / "features.parquet", custom, RunConfig(train=TrainConfig(model="gbdt")))
    _, default = simulate_and_train(folder / "default", SMALL_SIM)
    return {"custom": custom, "default": default}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    if REDIS_SERVER is None:
        yield None
        return
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def _tx(i: int, days: float, **change: Any) -> dict[str, Any]:
    at = datetime(2026, 3, 1, 12, tzinfo=UTC) + timedelta(days=days)
    tx = {"transaction_id": f"tx-{i}", "timestamp": at.isoformat(), "customer_id": "c1",
          "terminal_id": "t1", "amount": 20.0 + i, "channel": "ecom"}  # fmt: skip
    return tx | change


def _state(kind: str, redis_url: str | None) -> dict[str, Any]:
    return {} if kind == "sqlite" else {"state": redis_url}


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=needs_redis)])
def test_a_custom_spec_is_served_with_its_extra_column(
    kind: str, runs: dict[str, Path], tmp_path: Path, redis_url: str | None
) -> None:
    settings = settings_for(runs["custom"], tmp_path / "data", **_state(kind, redis_url))
    with LiveServer(create_app(settings)) as live, live.client() as client:
        wait_ready(client)
        no_column = {k: v for k, v in _tx(0, 0).items() if k != "channel"}
        missing = client.post("/v1/decisions", json=no_column, headers=AUTH)
        assert missing.status_code == 422
        assert missing.json() == {
            "detail": "missing column 'channel': the model's feature spec reads it"
        }
        batch = {"transactions": [_tx(1, 0), no_column | {"transaction_id": "tx-2"}]}
        refused = client.post("/v1/decisions/batch", json=batch, headers=AUTH)
        assert refused.status_code == 422
        assert "transactions[1]: missing column 'channel'" in refused.json()["detail"]
        # Nothing of the refused batch was applied: tx-1 is decided fresh now.
        first = client.post("/v1/decisions", json=_tx(1, 0), headers=AUTH)
        assert first.status_code == 200, first.text
        several = {"transactions": [_tx(2, 0.1, channel="pos"), _tx(3, 0.2)]}
        assert client.post("/v1/decisions/batch", json=several, headers=AUTH).status_code == 200
        label = client.post("/v1/labels", json={"transaction_id": "tx-1", "is_fraud": True},
                            headers=AUTH)  # fmt: skip
        assert label.json()["applied"] is True
        later = client.post("/v1/decisions", json=_tx(4, 8), headers=AUTH)
        assert later.status_code == 200, later.text
        # Reloads to the default spec and back keep the state: the label still counts.
        for run in ("default", "custom"):
            reload = client.post("/v1/admin/reload", json={"run": str(runs[run])}, headers=ADMIN)
            assert reload.status_code == 200, reload.text
        last = client.post("/v1/decisions", json=_tx(5, 9, channel="pos"), headers=AUTH)
        assert last.status_code == 200, last.text
        metrics = client.get("/metrics").text  # the spec engine's store calls are timed too
        name = "fraudflow_state_store_latency_seconds_count"
        assert metric_value(metrics, name, operation="apply") >= 4
        assert metric_value(metrics, name, operation="set_label") == 1
    decisions = read_decisions(settings.audit_path).sort("timestamp")
    assert decisions["transaction_id"].to_list() == [f"tx-{i}" for i in range(1, 6)]
    assert decisions[FRAUDS].to_list() == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert decisions["customer__channels__7d"].to_list() == [1.0, 2.0, 2.0, 1.0, 2.0]
    assert decisions["card_channel__count__last3"].to_list() == [1.0, 1.0, 2.0, 3.0, 2.0]
    assert decisions["channel"].to_list() == ["ecom", "pos", "ecom", "ecom", "pos"]


def _categorical(run: Path, dest: Path) -> Path:
    """The run with a feature spec whose row column ``channel`` is categorical, without the
    codes training stores for one: a bundle the service cannot serve."""
    shutil.copytree(run, dest)
    meta_path = dest / "model" / "meta.json"
    meta = json.loads(meta_path.read_text())
    spec = meta["feature_spec"] | {"column": [{"name": "channel", "kind": "categorical"}]}
    spec = spec | {"features": [*meta["features"], "channel"]}
    meta |= {"feature_spec": spec, "feature_spec_hash": None, "features": spec["features"]}
    meta_path.write_text(json.dumps(meta))
    seal_bundle(dest)
    return dest


def test_a_spec_the_service_cannot_serve_is_refused_at_start_and_at_reload(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    refused = _categorical(runs["custom"], tmp_path / "categorical")
    start = LiveServer(create_app(settings_for(refused, tmp_path / "a")))
    with start as live, live.client() as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").json()["status"] == "loading":
            assert time.monotonic() < deadline, "the service never finished loading"
            time.sleep(0.05)
        assert client.get("/readyz").json() == {"status": "failed"}
    serving = LiveServer(create_app(settings_for(runs["custom"], tmp_path / "b")))
    with serving as live, live.client() as client:
        wait_ready(client)
        reload = client.post("/v1/admin/reload", json={"run": str(refused)}, headers=ADMIN)
        assert reload.status_code == 400
        assert reload.json() == {
            "detail": "run refused: its features are not the ones this build computes"
        }


def test_an_orphan_of_a_custom_spec_is_decided_again_as_it_would_have_been(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """A transaction in the state without a recorded decision (a crash between the state
    update and the audit commit): its retry is decided from the state, extra column included,
    as it would have been."""
    txs = [_tx(i, i / 24, channel=["ecom", "pos"][i % 2]) for i in range(8)]
    first = create_app(settings_for(runs["custom"], tmp_path / "a"))
    with LiveServer(first) as live, live.client(headers=AUTH) as c:
        wait_ready(c)
        expected = [c.post("/v1/decisions", json=tx).content for tx in txs]
    app = create_app(settings_for(runs["custom"], tmp_path / "b", duplicate_wait_seconds=0.2))
    with LiveServer(app) as live, live.client(headers=AUTH) as c:
        wait_ready(c)
        before = [c.post("/v1/decisions", json=tx).content for tx in txs[:4]]
        service: DecisionService = app.state.service
        assert service.engine is not None
        orphan = TransactionIn.model_validate(txs[4])
        stored = service.engine.record([orphan.event()], [orphan.model_extra or {}])
        assert stored.fresh.tolist() == [True]
        after = [c.post("/v1/decisions", json=tx).content for tx in txs[5:]]
        retried = c.post("/v1/decisions", json=txs[4])
        assert retried.status_code == 200, retried.text
    assert [*before, retried.content, *after] == expected
