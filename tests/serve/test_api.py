"""Every route of the decision service, on real loopback HTTP with the real app.

The server is uvicorn in a thread of the test process (``LiveServer``) on a free 127.0.0.1
port; the client is httpx. The helpers are in tests/helpers/service.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fraudflow.features.online import StateStore
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions, read_labels
from fraudflow.serve.scoring import Engine, load_engine
from tests.helpers.service import (
    ADMIN,
    ADMIN_KEY,
    AUTH,
    CLIENT_KEY,
    SMALL_SIM,
    LiveServer,
    copy_of_run,
    metric_value,
    settings_for,
    simulate_and_train,
    transaction,
    wait_ready,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("api"), SMALL_SIM)
    return run


# --- decisions ----------------------------------------------------------------------------


def test_decision_happy_path(client: httpx.Client, tmp_path: Path) -> None:
    tx = transaction(1, extra_field="ignored")
    response = client.post("/v1/decisions", json=tx, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"transaction_id", "score", "decision", "reasons", "model_version"}
    assert body["transaction_id"] == "tx-1" and 0.0 <= body["score"] <= 1.0
    assert body["decision"] in ("approve", "review", "block")
    features = [r for r in body["reasons"] if r["kind"] == "feature"]
    assert len(features) == 3
    fields = {"kind", "name", "detail", "value", "contribution"}
    assert all(set(r) == fields for r in body["reasons"])
    magnitudes = [abs(r["contribution"]) for r in features]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert body["model_version"].startswith("gbdt-")
    audit = read_decisions(tmp_path / "data" / "audit.db")
    assert audit["transaction_id"].to_list() == ["tx-1"]
    assert audit["score"][0] == body["score"]


def test_numeric_ids_and_offsets_are_accepted(client: httpx.Client) -> None:
    tx = transaction(2, transaction_id=77, customer_id=5, timestamp="2026-03-01T14:00:00+02:00")
    response = client.post("/v1/decisions", json=tx, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["transaction_id"] == 77


def test_idempotent_replay_counts_state_once(client: httpx.Client, tmp_path: Path) -> None:
    first = client.post("/v1/decisions", json=transaction(1), headers=AUTH)
    again = client.post("/v1/decisions", json=transaction(1, amount=9999.0), headers=AUTH)
    assert again.status_code == 200 and again.content == first.content
    second = client.post("/v1/decisions", json=transaction(2), headers=AUTH)
    assert second.status_code == 200
    audit = read_decisions(tmp_path / "data" / "audit.db")
    assert audit["transaction_id"].to_list() == ["tx-1", "tx-2"]
    # tx-2 saw exactly one earlier transaction of the customer, not two.
    assert audit["customer__count__1d"].to_list() == [1.0, 2.0]


def test_concurrent_duplicates_get_one_decision(client: httpx.Client, tmp_path: Path) -> None:
    results: list[bytes] = []

    def post() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as own:
            results.append(own.post("/v1/decisions", json=transaction(5), headers=AUTH).content)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert read_decisions(tmp_path / "data" / "audit.db").height == 1


def test_missing_or_wrong_key_is_401(client: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": CLIENT_KEY}):
        response = client.post("/v1/decisions", json=transaction(1), headers=headers)
        assert response.status_code == 401
        assert response.json() == {"detail": "missing or invalid API key"}
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_direct_routes_answer_posts_and_leave_the_rest_to_fastapi(
    client: httpx.Client,
) -> None:
    for path in ("/v1/decisions", "/v1/decisions/batch", "/v1/labels"):
        assert client.get(path, headers=AUTH).status_code == 405  # FastAPI's answer
    answer = client.post("/v1/decisions", json=transaction(77), headers=AUTH)
    assert answer.headers["content-type"] == "application/json"
    assert int(answer.headers["content-length"]) == len(answer.content)
    body = json.dumps(transaction(78)).encode()
    chunks = iter([body[:20], body[20:]])  # a body in two chunks (no Content-Length)
    streamed = client.post("/v1/decisions", content=chunks, headers=AUTH | _JSON)
    assert streamed.status_code == 200 and streamed.json()["transaction_id"] == "tx-78"


def test_admin_key_is_a_client_key(client: httpx.Client) -> None:
    assert client.post("/v1/decisions", json=transaction(1), headers=ADMIN).status_code == 200


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"amount": -1}, "amount"),
        ({"amount": "ten"}, "amount"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"timestamp": 1767225600}, "timestamp"),
        ({"customer_id": None}, "customer_id"),
        ({"transaction_id": ""}, "transaction_id"),
    ],
)
def test_bad_transaction_is_422_with_the_field(
    client: httpx.Client, tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/decisions", json=transaction(1, **change), headers=AUTH)
    assert response.status_code == 422
    assert any(e["loc"][:2] == ["body", field] for e in response.json()["detail"])
    assert read_decisions(tmp_path / "data" / "audit.db").height == 0


def test_missing_field_and_bad_json_are_422(client: httpx.Client) -> None:
    tx = transaction(1)
    del tx["amount"]
    response = client.post("/v1/decisions", json=tx, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "amount"]
    bad = client.post("/v1/decisions", content=b"{not json", headers=AUTH | _JSON)
    assert bad.status_code == 422


_JSON = {"Content-Type": "application/json"}


def test_oversized_bodies_are_413_and_change_nothing(client: httpx.Client, tmp_path: Path) -> None:
    big = transaction(1, padding="x" * (1024 * 1024))
    assert client.post("/v1/decisions", json=big, headers=AUTH).status_code == 413
    many = {"transactions": [transaction(i, padding="x" * 2000) for i in range(9000)]}
    assert client.post("/v1/decisions/batch", json=many, headers=AUTH).status_code == 413
    chunks = (b"x" * 65536 for _ in range(20))  # no Content-Length: counted as it streams
    streamed = client.post("/v1/decisions", content=chunks, headers=AUTH | _JSON)
    assert streamed.status_code == 413
    assert read_decisions(tmp_path / "data" / "audit.db").height == 0
    # The same id is still new to the state.
    assert client.post("/v1/decisions", json=transaction(1), headers=AUTH).status_code == 200


# --- batch --------------------------------------------------------------------------------


def test_batch_equals_one_by_one(run_dir: Path, tmp_path: Path) -> None:
    txs = [transaction(i, customer_id=f"c{i % 4}") for i in range(40)]
    txs[10], txs[11] = txs[11], txs[10]  # out of order: the batch sorts by timestamp
    txs[20]["timestamp"] = txs[21]["timestamp"]  # a tie keeps request order
    ordered = sorted(range(len(txs)), key=lambda i: datetime.fromisoformat(txs[i]["timestamp"]))
    app = create_app(settings_for(run_dir, tmp_path / "one"))
    with LiveServer(app) as live, live.client(headers=AUTH) as c:
        wait_ready(c)
        singles = {i: c.post("/v1/decisions", json=txs[i]).json() for i in ordered}
    app = create_app(settings_for(run_dir, tmp_path / "batch"))
    with LiveServer(app) as live, live.client(headers=AUTH) as c:
        wait_ready(c)
        response = c.post("/v1/decisions/batch", json={"transactions": [*txs, txs[3]]})
    assert response.status_code == 200, response.text
    batch = response.json()["decisions"]
    assert [d["transaction_id"] for d in batch] == [t["transaction_id"] for t in txs] + ["tx-3"]
    for i, decision in enumerate(batch[:-1]):
        assert decision["decision"] == singles[i]["decision"]
        assert decision["score"] == pytest.approx(singles[i]["score"], abs=1e-9)
        assert decision["reasons"] == singles[i]["reasons"]
    assert batch[-1] == batch[3]  # a repeat inside the batch: the first answer


def test_batch_is_validated_whole_before_anything_is_applied(
    client: httpx.Client, tmp_path: Path
) -> None:
    txs = [transaction(i) for i in range(5)]
    txs[4]["amount"] = -3
    response = client.post("/v1/decisions/batch", json={"transactions": txs}, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "transactions", 4, "amount"]
    assert read_decisions(tmp_path / "data" / "audit.db").height == 0
    too_many = {"transactions": [transaction(i) for i in range(10_001)]}
    assert client.post("/v1/decisions/batch", json=too_many, headers=AUTH).status_code == 422


def test_batch_replays_known_transactions(client: httpx.Client) -> None:
    single = client.post("/v1/decisions", json=transaction(1), headers=AUTH).json()
    body = {"transactions": [transaction(1), transaction(2)]}
    batch = client.post("/v1/decisions/batch", json=body, headers=AUTH).json()["decisions"]
    assert batch[0] == single and batch[1]["transaction_id"] == "tx-2"


# --- labels -------------------------------------------------------------------------------


def test_labels_feed_the_delayed_features_and_are_stored(
    client: httpx.Client, tmp_path: Path
) -> None:
    client.post("/v1/decisions", json=transaction(1, terminal_id="T"), headers=AUTH)
    label = {"transaction_id": "tx-1", "is_fraud": 1, "reported_at": "2026-03-02T00:00:00Z"}
    response = client.post("/v1/labels", json=label, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"transaction_id": "tx-1", "is_fraud": True, "applied": True}
    unknown_label = {"transaction_id": "nope", "is_fraud": 0}
    unknown = client.post("/v1/labels", json=unknown_label, headers=AUTH)
    assert unknown.json() == {"transaction_id": "nope", "is_fraud": False, "applied": False}
    # Eight days later the label is known (delay 7 days): the terminal's fraud rate counts it.
    later = (datetime(2026, 3, 1, 12, tzinfo=UTC) + timedelta(days=8)).isoformat()
    tx = transaction(2, terminal_id="T", timestamp=later)
    assert client.post("/v1/decisions", json=tx, headers=AUTH).status_code == 200
    audit = read_decisions(tmp_path / "data" / "audit.db")
    assert audit["terminal__fraud_rate__30d"].to_list() == [0.0, 1.0]
    labels = read_labels(tmp_path / "data" / "audit.db")
    assert labels["transaction_id"].to_list() == ["tx-1", "nope"]
    assert labels["applied"].to_list() == [True, False]
    assert labels["reported_at"][0] == datetime(2026, 3, 2, tzinfo=UTC)


def test_bad_label_is_422(client: httpx.Client) -> None:
    for body in ({"transaction_id": "x", "is_fraud": 2}, {"transaction_id": "x"}):
        assert client.post("/v1/labels", json=body, headers=AUTH).status_code == 422
    assert client.post("/v1/labels", json={"transaction_id": "x", "is_fraud": 1}).status_code == 401


def test_key_is_checked_before_the_body(client: httpx.Client) -> None:
    response = client.post("/v1/decisions", json={"amount": -1})
    assert response.status_code == 401


# --- health, readiness, metrics -----------------------------------------------------------


def _loading_until(release: threading.Event) -> Callable[[Path, StateStore], Engine]:
    """A model loader that takes until ``release`` is set."""

    def slow_loader(run: Path, store: StateStore) -> Engine:
        release.wait(timeout=30)
        return load_engine(run, store=store, policy_path=None)

    return slow_loader


def test_readiness_waits_for_the_model(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request waits this long for a loading model before its 503.
    monkeypatch.setattr("fraudflow.serve.service.READY_WAIT_SECONDS", 0.3)
    release = threading.Event()
    app = create_app(settings_for(run_dir, tmp_path), loader=_loading_until(release))
    with LiveServer(app) as live, live.client() as c:
        _readiness_while_loading(c, release)


def _readiness_while_loading(c: httpx.Client, release: threading.Event) -> None:
    try:
        assert c.get("/healthz").json() == {"status": "ok"}
        loading = c.get("/readyz")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        early = c.post("/v1/decisions", json=transaction(1), headers=AUTH)
        assert early.status_code == 503 and early.json() == {"detail": "model not loaded"}
        assert metric_value(c.get("/metrics").text, "fraudflow_model_loaded") == 0
    finally:
        release.set()
    wait_ready(c)
    ready = c.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model_version"].startswith("gbdt-")
    assert metric_value(c.get("/metrics").text, "fraudflow_model_loaded") == 1
    assert c.post("/v1/decisions", json=transaction(1), headers=AUTH).status_code == 200


def test_a_broken_model_keeps_the_service_unready(run_dir: Path, tmp_path: Path) -> None:
    def broken(run: Path, store: StateStore) -> Engine:
        raise RuntimeError("corrupt bundle")

    app = create_app(settings_for(run_dir, tmp_path), loader=broken)
    with LiveServer(app) as live, live.client() as c:
        deadline = time.monotonic() + 10
        while (r := c.get("/readyz")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.status_code == 503 and r.json() == {"status": "failed"}
        assert c.get("/healthz").status_code == 200


def test_metrics_names_and_values(run_dir: Path, tmp_path: Path) -> None:
    settings = settings_for(run_dir, tmp_path, psi_interval_seconds=0.001)
    with LiveServer(create_app(settings)) as live, live.client() as c:
        wait_ready(c)
        txs = [transaction(i, customer_id=f"c{i % 7}") for i in range(150)]
        assert c.post("/v1/decisions/batch", json={"transactions": txs}, headers=AUTH).is_success
        single = c.post("/v1/decisions", json=transaction(500), headers=AUTH).json()
        c.post("/v1/decisions", json=transaction(501))  # 401
        text = c.get("/metrics").text
    decided = sum(
        metric_value(text, "fraudflow_decisions_total", decision=d)
        for d in ("approve", "review", "block")
    )
    assert decided == 151
    assert metric_value(text, "fraudflow_score_count") == 151
    route = "/v1/decisions"
    assert metric_value(text, "fraudflow_requests_total", route=route, status="200") == 1
    assert metric_value(text, "fraudflow_requests_total", route=route, status="401") == 1
    assert metric_value(text, "fraudflow_errors_total", kind="auth") == 1
    assert metric_value(text, "fraudflow_decision_latency_seconds_count", route=route) == 2
    batch_route = "/v1/decisions/batch"
    assert metric_value(text, "fraudflow_decision_latency_seconds_count", route=batch_route) == 1
    # One store transaction per batch: the batch's 150 events, then the single one.
    applies = metric_value(text, "fraudflow_state_store_latency_seconds_count", operation="apply")
    assert applies == 2
    # One durable audit commit per decided group: the batch, then the single decision.
    assert metric_value(text, "fraudflow_audit_commit_seconds_count") == 2
    version = single["model_version"]
    assert metric_value(text, "fraudflow_model_info", model_version=version) == 1
    assert metric_value(text, "fraudflow_model_loaded") == 1
    psi = metric_value(text, "fraudflow_score_psi")
    assert psi > 0 and psi == psi  # computed (not NaN): 150 scores reached the window minimum
    assert CLIENT_KEY not in text and ADMIN_KEY not in text and "tx-" not in text


# --- reload -------------------------------------------------------------------------------


def test_reload_needs_an_admin_key(client: httpx.Client) -> None:
    assert client.post("/v1/admin/reload").status_code == 401
    forbidden = client.post("/v1/admin/reload", headers=AUTH)
    assert forbidden.status_code == 403
    assert forbidden.json() == {"detail": "this API key may not use admin routes"}


def test_reload_swaps_the_model(client: httpx.Client, run_dir: Path, tmp_path: Path) -> None:
    before = client.get("/readyz").json()["model_version"]
    same = client.post("/v1/admin/reload", headers=ADMIN)
    assert same.status_code == 200
    assert same.json() == {"model_version": before, "previous_model_version": before,
                           "run": str(run_dir), "shadow": []}  # fmt: skip
    newer = copy_of_run(run_dir, tmp_path / "newer")
    response = client.post("/v1/admin/reload", json={"run": str(newer)}, headers=ADMIN)
    assert response.status_code == 200, response.text
    after = response.json()["model_version"]
    assert after != before and client.get("/readyz").json()["model_version"] == after
    decided = client.post("/v1/decisions", json=transaction(1), headers=AUTH).json()
    assert decided["model_version"] == after
    text = client.get("/metrics").text
    assert metric_value(text, "fraudflow_model_info", model_version=after) == 1
    assert f'model_version="{before}"' not in text


def test_reload_of_a_bad_run_keeps_the_old_model(client: httpx.Client, tmp_path: Path) -> None:
    before = client.get("/readyz").json()["model_version"]
    response = client.post("/v1/admin/reload", json={"run": str(tmp_path / "nope")}, headers=ADMIN)
    assert response.status_code == 400
    assert response.json() == {"detail": "run refused: the run folder does not exist"}
    assert client.get("/readyz").json()["model_version"] == before
    assert metric_value(client.get("/metrics").text, "fraudflow_errors_total", kind="reload") == 1


def test_reload_under_load_fails_no_request(
    server: LiveServer, run_dir: Path, tmp_path: Path
) -> None:
    newer = copy_of_run(run_dir, tmp_path / "newer")
    stop = threading.Event()
    statuses: list[int] = []
    versions: set[str] = set()

    def hammer() -> None:
        with server.client(headers=AUTH) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/v1/decisions", json=transaction(i, customer_id=f"h{i % 50}"))
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["model_version"])
                i += 1

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    with server.client(headers=ADMIN) as admin:
        for run in (newer, run_dir, newer):
            time.sleep(0.15)
            assert admin.post("/v1/admin/reload", json={"run": str(run)}).status_code == 200
    time.sleep(0.15)
    stop.set()
    for t in threads:
        t.join()
    assert len(statuses) > 50 and set(statuses) == {200}
    assert len(versions) == 2


def test_a_failing_state_store_is_503(run_dir: Path, tmp_path: Path) -> None:
    settings = settings_for(run_dir, tmp_path, state="redis://127.0.0.1:1/0")  # nothing listens
    with LiveServer(create_app(settings)) as live, live.client(headers=AUTH) as c:
        wait_ready(c)
        response = c.post("/v1/decisions", json=transaction(1))
        assert response.status_code == 503
        assert response.json() == {"detail": "feature state store unavailable"}
        assert response.headers["retry-after"] == "1"
        label = c.post("/v1/labels", json={"transaction_id": "tx-1", "is_fraud": 1})
        assert label.status_code == 503
        text = c.get("/metrics").text
    assert metric_value(text, "fraudflow_errors_total", kind="state_store") == 2
    assert read_decisions(tmp_path / "audit.db").height == 0


def test_a_request_during_a_short_load_waits_instead_of_failing(
    run_dir: Path, tmp_path: Path
) -> None:
    release = threading.Event()
    app = create_app(settings_for(run_dir, tmp_path), loader=_loading_until(release))
    with LiveServer(app) as live, live.client() as c:
        threading.Timer(0.5, release.set).start()
        early = c.post("/v1/decisions", json=transaction(1), headers=AUTH)
        assert early.status_code == 200, early.text


def test_openapi_documents_the_direct_routes(run_dir: Path, tmp_path: Path) -> None:
    """The decision routes bypass FastAPI's request handling, not its documentation."""
    paths = create_app(settings_for(run_dir, tmp_path)).openapi()["paths"]
    bodies = {
        "/v1/decisions": "TransactionIn",
        "/v1/decisions/batch": "DecisionBatchIn",
        "/v1/labels": "LabelIn",
    }
    for path, model in bodies.items():
        post = paths[path]["post"]
        schema = post["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(f"/{model}")
        assert "422" in post["responses"]
