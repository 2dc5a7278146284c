"""The sequence transformer served: the cards' histories in each store, the online sequence
inputs equal to the batch ones, and the service's scores equal to the run's (1e-5), replayed
over real loopback HTTP on SQLite and on a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from fraudflow.artifacts import load_bundle
from fraudflow.config import (
    FeatureConfig,
    ModelConfig,
    RunConfig,
    SimulationConfig,
    TrainConfig,
    TransformerConfig,
)
from fraudflow.data.schema import CUSTOMER_ID, TIMESTAMP, TRANSACTION_ID
from fraudflow.data.simulator import simulate
from fraudflow.features import build_features, write_feature_table
from fraudflow.features.online import Event
from fraudflow.inputs import FeatureInputs, build_arrays
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions
from fraudflow.serve.history_state import (
    HistoryStore,
    MemoryHistory,
    RedisHistory,
    SQLiteHistory,
    pack_head,
)
from fraudflow.serve.runcheck import verify_run
from fraudflow.serve.sequence_scoring import SequenceAttribution, SequenceHistory, sequence_table
from fraudflow.serve.state import tx_hash
from fraudflow.train import train_run
from tests.helpers.redis_cluster import needs_redis_cluster, redis_cluster
from tests.helpers.service import AUTH, LiveServer, settings_for, wait_ready
from tests.serve.test_parity import replay
from tests.serve.test_state import needs_redis, redis_url  # noqa: F401 (a fixture)

SIM = SimulationConfig(n_customers=80, n_terminals=160, n_days=60, seed=5)
LENGTH = 8
TINY = TransformerConfig(
    sequence_length=LENGTH, d_model=16, n_layers=1, n_heads=2, feedforward_dim=32
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, pl.DataFrame, Path]:
    """(raw log, feature table, a transformer run trained on it)."""
    folder = tmp_path_factory.mktemp("sequence")
    raw = simulate(SIM)
    cfg = FeatureConfig()
    table = build_features(raw, cfg)
    write_feature_table(table, folder / "features.parquet", cfg)
    run = folder / "run-transformer"
    config = RunConfig(
        train=TrainConfig(model="transformer", epochs=1, device="cpu", batch_size=1024),
        model=ModelConfig(transformer=TINY),
    )
    train_run(folder / "features.parquet", run, config)
    return raw, table, run


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster.url


STORES = ["memory", "sqlite", pytest.param("redis", marks=needs_redis)]
CLUSTER = pytest.param("redis-cluster", marks=needs_redis_cluster)


@pytest.fixture
def history(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    prefix = f"test-{uuid.uuid4().hex}:"
    made: HistoryStore
    if request.param == "memory":
        made = MemoryHistory()
    elif request.param == "sqlite":
        made = SQLiteHistory(tmp_path / "history.db")
    elif request.param == "redis":
        made = RedisHistory(request.getfixturevalue("redis_url"), prefix=prefix)
    else:
        made = RedisHistory(request.getfixturevalue("cluster_url"), prefix=prefix)
    yield made
    made.close()


def _record(t_us: int, tid: str, value: float) -> bytes:
    return pack_head(t_us, tx_hash(tid)) + np.float32(value).tobytes()


@pytest.mark.parametrize("history", [*STORES, CLUSTER], indirect=True)
def test_a_history_keeps_time_order_and_its_last_events_and_appends_once(
    history: HistoryStore,
) -> None:
    width, keep = 20, 3
    first = history.append(
        [("c:a/x", _record(10, "t1", 1.0)), ("c:a/x", _record(30, "t2", 2.0)),
         ("c:a/x", _record(20, "t3", 3.0)), ("c:b/x", _record(-5, "t4", 4.0))],
        width=width, keep=keep,
    )  # fmt: skip
    # A late event goes before the later ones: after t1, before t2.
    assert [a.position for a in first] == [0, 1, 1, 0]
    assert first[2].records == _record(10, "t1", 1.0) + _record(20, "t3", 3.0) + _record(
        30, "t2", 2.0
    )
    # Equal times: arrival order. A fourth event pushes out the oldest, after answering it.
    fourth = history.append([("c:a/x", _record(30, "t5", 5.0))], width=width, keep=keep)[0]
    assert fourth.position == 3 and len(fourth.records) == 4 * width
    # A retry appends nothing and answers where the event stands now.
    again = history.append([("c:a/x", _record(30, "t5", 5.0))], width=width, keep=keep)[0]
    assert again.position == 2
    assert again.records == fourth.records[width:]


def _events(table: pl.DataFrame) -> list[Event]:
    times = table[TIMESTAMP].dt.epoch("us").to_list()
    return [
        Event(str(tid), t, str(c), "m", 0.0)
        for tid, t, c in zip(table[TRANSACTION_ID], times, table[CUSTOMER_ID], strict=True)
    ]


@pytest.mark.parametrize("history", STORES, indirect=True)
def test_online_sequence_inputs_and_scores_equal_the_batch_ones(
    trained: tuple[pl.DataFrame, pl.DataFrame, Path], history: HistoryStore
) -> None:
    """The table's rows appended in its order (groups of 500, a retry of one group), each
    row's window from the store gives the batch's events, gaps and score."""
    _, table, run = trained
    bundle = load_bundle(run)
    table = table.head(3000)
    inputs = FeatureInputs(bundle.features, bundle.codes)
    assert bundle.standardizer is not None
    batch = build_arrays(bundle.inputs, table, inputs, bundle.standardizer)
    matrix = inputs.matrix(table)  # (N, F) float32
    online = SequenceHistory(history, features=bundle.features, length=LENGTH)
    attribution = SequenceAttribution(bundle)
    events, scores = _events(table), []
    for start in range(0, table.height, 500):
        part = slice(start, start + 500)
        windows = online.windows(events[part], matrix[part])
        if start == 1000:  # a retry of a card's newest event reads its window again
            last = slice(start + 499, start + 500)
            again = online.windows(events[last], matrix[last])
            n = int(windows.counts[-1])
            assert again.counts.tolist() == [n]
            np.testing.assert_array_equal(again.events, windows.events[len(windows.events) - n :])
        x = matrix[part]
        table_rows, history_rows, gaps, _ = sequence_table(x, windows, LENGTH)
        want = batch.take(torch.arange(table.height)[part])
        valid = want.rows["history"].numpy() >= 0
        np.testing.assert_array_equal(history_rows >= 0, valid)
        got_events = table_rows[np.clip(history_rows, 0, None)]  # (Q, T, F)
        want_events = matrix[np.clip(want.rows["history"].numpy(), 0, None)]
        np.testing.assert_array_equal(got_events[valid], want_events[valid])
        np.testing.assert_allclose(gaps, want.rows["gaps"].numpy(), rtol=0, atol=1e-6)
        scores.append(attribution(x, windows)[1])
    np.testing.assert_allclose(np.concatenate(scores), bundle.predict_frame(table), atol=1e-5)


def test_the_run_check_accepts_a_transformer_run(
    trained: tuple[pl.DataFrame, pl.DataFrame, Path],
) -> None:
    verify_run(trained[2], timeout_seconds=120)


def _assert_scores_match(audit_path: Path, run: Path) -> None:
    audit = read_decisions(audit_path)
    predictions = pl.read_parquet(run / "predictions.parquet").with_columns(
        pl.col(TRANSACTION_ID).cast(pl.String)
    )
    scored = predictions.join(audit, on=TRANSACTION_ID, suffix="_online")
    assert scored.height == predictions.height > 500
    for column in ("score", "raw_score"):
        gap = np.abs(scored[column].to_numpy() - scored[f"{column}_online"].to_numpy())
        assert gap.max() <= 1e-5, f"{column}: largest gap {gap.max()}"


def _serve_and_replay(run: Path, raw: pl.DataFrame, data_dir: Path, **extra: object) -> None:
    app = create_app(settings_for(run, data_dir, **extra))
    with LiveServer(app) as live, live.client(headers=AUTH) as client:
        wait_ready(client)
        replay(client, raw)
        # A retry of an answered transaction replays its answer and appends nothing.
        first = raw.sort(TIMESTAMP).row(0, named=True)
        tx = {"transaction_id": first[TRANSACTION_ID], "timestamp": first[TIMESTAMP].isoformat(),
              "customer_id": first[CUSTOMER_ID], "terminal_id": first["terminal_id"],
              "amount": first["amount"]}  # fmt: skip
        answer = client.post("/v1/decisions", json=tx)
        assert answer.status_code == 200
        features = [r for r in answer.json()["reasons"] if r["kind"] == "feature"]
        assert len(features) == 3 and all(np.isfinite(r["contribution"]) for r in features)


@pytest.mark.slow
def test_sqlite_service_scores_a_transformer_as_the_run(
    trained: tuple[pl.DataFrame, pl.DataFrame, Path], tmp_path: Path
) -> None:
    raw, _, run = trained
    _serve_and_replay(run, raw, tmp_path)
    _assert_scores_match(tmp_path / "audit.db", run)
    assert read_decisions(tmp_path / "audit.db").height == raw.height  # the retry replayed


@needs_redis
@pytest.mark.slow
def test_redis_service_scores_a_transformer_as_the_run(
    trained: tuple[pl.DataFrame, pl.DataFrame, Path],
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    raw, _, run = trained
    _serve_and_replay(run, raw, tmp_path, state=redis_url)
    _assert_scores_match(tmp_path / "audit.db", run)
