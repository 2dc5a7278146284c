"""The review console on real loopback HTTP with the real app: sign-in, sessions, CSRF, roles,
taking cases, holds, verdicts reaching the online features.

Cases are opened in the console's case store (the one the service uses) for transactions the
service decided; accounts are made in its accounts store, as ``fraudflow users add`` does.
Every test runs twice (``cases_url``, tests/conftest.py): with the default SQLite files, and
with ``--cases`` naming a database of a real PostgreSQL server.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions, read_labels
from fraudflow.serve.cases import CaseFilter, CaseIn, CaseStore
from fraudflow.serve.console import now_us
from fraudflow.serve.service import DecisionService
from fraudflow.serve.settings import ServeSettings
from fraudflow.serve.users import UserStore, users_path_for
from tests.helpers.service import (
    ADMIN,
    AUTH,
    SMALL_SIM,
    LiveServer,
    metric_value,
    settings_for,
    simulate_and_train,
    transaction,
    wait_ready,
)

PASSWORD = "correct horse battery"
HOUR_US = 3_600 * 1_000_000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("console"), SMALL_SIM)
    return run


class Console:
    """A served app with its console's stores, and signed-in clients."""

    service: DecisionService

    def __init__(self, live: LiveServer, settings: ServeSettings) -> None:
        self.live = live
        self.settings = settings
        self.cases = CaseStore(settings.cases_target)
        self.users = UserStore(settings.cases or users_path_for(settings.audit_path))
        known = {u.username for u in self.users.list()}  # a server again on the same data
        for name, role in [("ann", "analyst"), ("bob", "analyst"), ("sue", "supervisor")]:
            if name not in known:
                self.users.add(name, role, PASSWORD, now_us())

        self._clients: list[httpx.Client] = []

    def client(self) -> httpx.Client:
        client = self.live.client()
        self._clients.append(client)  # closed when the server stops
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.cases.close()
        self.users.close()

    def sign_in(self, name: str, password: str = PASSWORD) -> httpx.Client:
        client = self.client()
        response = login(client, name, password)
        assert response.status_code == 303, response.text
        return client

    def open(self, *tx_ids: str, amount: float = 100.0, hours_ago: float = 0, **kw: Any) -> None:
        at = now_us() - int(hours_ago * HOUR_US)
        self.cases.open_cases([
            CaseIn(
                transaction_id=tx, customer_id=str(kw.get("card", "c1")), terminal_id="t1",
                amount=amount, score=0.5 + i / 100, decision="review",
                reasons=tuple(kw.get("reasons", ("amount 5.2x the card's 30-day mean",))),
                at_us=at,
            )
            for i, tx in enumerate(tx_ids)
        ])  # fmt: skip


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


def login(client: httpx.Client, name: str, password: str) -> httpx.Response:
    page = client.get("/console/login")
    assert page.status_code == 200
    form = {"csrf": csrf_of(page.text), "username": name, "password": password}
    return client.post("/console/login", data=form)


def post(client: httpx.Client, path: str, **form: Any) -> httpx.Response:
    """A console form POST with the session's CSRF token (read from the queue page)."""
    token = csrf_of(client.get("/console/queue").text)
    return client.post(path, data={"csrf": token, **form})


def take(client: httpx.Client) -> int:
    response = post(client, "/console/take")
    assert response.status_code == 303, response.text
    found = re.fullmatch(r"/console/cases/(\d+)", response.headers["location"])
    assert found is not None, response.headers["location"]
    return int(found.group(1))


def served(
    run_dir: Path, data: Path, cases_url: str | None = None, **extra: Any
) -> Iterator[Console]:
    """The app served with its data in ``data``, its console's cases and accounts there or in
    the PostgreSQL database ``cases_url``."""
    if cases_url is not None:
        extra["cases"] = cases_url
    settings = settings_for(run_dir, data, **extra)
    app = create_app(settings)
    with LiveServer(app) as live:
        with live.client() as client:
            wait_ready(client)
        console = Console(live, settings)
        console.service = app.state.service
        try:
            yield console
        finally:
            console.close()


@pytest.fixture
def console(run_dir: Path, tmp_path: Path, cases_url: str | None) -> Iterator[Console]:
    yield from served(run_dir, tmp_path / "data", cases_url)


# --- signing in ---------------------------------------------------------------------------


def test_sign_in_sets_a_strict_cookie_and_sign_out_ends_the_session(console: Console) -> None:
    with console.client() as client:
        assert client.get("/console/queue").headers["location"] == "/console/login"
        response = login(client, "ann", PASSWORD)
        assert response.status_code == 303 and response.headers["location"] == "/console/queue"
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
        assert "secure" not in cookie  # plain http here; https requests get Secure
        queue = client.get("/console/queue")
        assert queue.status_code == 200 and "ann (analyst)" in queue.text
        assert post(client, "/console/logout").status_code == 303
        assert client.get("/console/queue").status_code == 303  # back to the sign-in page
    actions = [(e["user"], e["action"]) for e in console.cases.events()]
    assert actions == [("ann", "login"), ("ann", "logout")]


def test_a_wrong_password_is_refused_with_401(console: Console) -> None:
    with console.client() as client:
        response = login(client, "ann", "not the password")
        assert response.status_code == 401
        assert "wrong user name or password" in response.text
        assert "fraudflow_console=" not in response.headers.get("set-cookie", "")
        assert login(client, "nobody", PASSWORD).status_code == 401
    assert [e["action"] for e in console.cases.events()] == ["login_refused"] * 2


def test_sign_in_is_throttled_after_five_failures(console: Console) -> None:
    with console.client() as client:
        for _ in range(5):
            assert login(client, "ann", "not the password").status_code == 401
        throttled = login(client, "ann", PASSWORD)  # the right one, now refused unchecked
        assert throttled.status_code == 429
        assert "too many failed sign-ins for this account: try again in 15 min" in throttled.text
        assert login(client, "bob", PASSWORD).status_code == 303  # other accounts unaffected


def test_a_post_without_the_csrf_token_is_403(console: Console) -> None:
    console.open("tx-a")
    client = console.sign_in("ann")
    assert client.post("/console/take").status_code == 403
    forged = client.post("/console/take", data={"csrf": "forged"})
    assert forged.status_code == 403 and "CSRF" in forged.text
    assert console.cases.get(1).assignee is None  # nothing was taken
    with console.client() as fresh:  # the sign-in form needs its own token too
        refused = fresh.post("/console/login", data={"username": "ann", "password": PASSWORD})
        assert refused.status_code == 403


def test_api_keys_do_not_open_the_console_nor_sessions_the_api(console: Console) -> None:
    with console.client() as client:
        assert client.get("/console/queue", headers=ADMIN).status_code == 303
        assert client.post("/console/take", headers=ADMIN).status_code == 401
    client = console.sign_in("sue")
    label = {"transaction_id": "tx-1", "is_fraud": 1}
    assert client.post("/v1/labels", json=label).status_code == 401
    assert client.post("/v1/decisions", json=transaction(1)).status_code == 401


# --- roles --------------------------------------------------------------------------------


def test_an_analyst_cannot_reassign(console: Console) -> None:
    console.open("tx-a")
    ann, sue = console.sign_in("ann"), console.sign_in("sue")
    case_id = take(ann)
    refused = post(ann, f"/console/cases/{case_id}/reassign", to_user="bob")
    assert refused.status_code == 403
    assert "needs the role admin or supervisor, however you are analyst" in refused.text
    assert console.cases.get(case_id).assignee == "ann"
    assert post(sue, f"/console/cases/{case_id}/reassign", to_user="bob").status_code == 303
    assert console.cases.get(case_id).assignee == "bob"


def test_an_analyst_cannot_bulk_close(console: Console) -> None:
    console.open("tx-a", "tx-b")
    ann, sue = console.sign_in("ann"), console.sign_in("sue")
    form = {"case_id": ["1", "2"], "outcome": "not_fraud", "note": "promotion"}
    assert post(ann, "/console/bulk-close", **form).status_code == 403
    assert console.cases.counts(now_us())["closed"] == 0
    assert "Bulk close" not in ann.get("/console/queue").text
    assert "Bulk close" in sue.get("/console/queue").text
    assert post(sue, "/console/bulk-close", **form).status_code == 303
    assert console.cases.counts(now_us())["closed"] == 2


def test_an_analyst_cannot_see_the_audit_page(console: Console) -> None:
    ann, sue = console.sign_in("ann"), console.sign_in("sue")
    refused = ann.get("/console/audit")
    assert refused.status_code == 403
    assert "Audit" not in ann.get("/console/queue").text.split("<main>")[0]
    page = sue.get("/console/audit")
    assert page.status_code == 200 and "login" in page.text


# --- working the queue --------------------------------------------------------------------


def test_two_analysts_taking_next_at_once_get_different_cases(console: Console) -> None:
    console.open(*(f"tx-{i}" for i in range(6)))
    clients = [console.sign_in(name) for name in ("ann", "bob", "sue")]
    tokens = [csrf_of(c.get("/console/queue").text) for c in clients]
    taken: list[str] = []
    barrier = threading.Barrier(len(clients))

    def press(client: httpx.Client, token: str) -> None:
        barrier.wait()
        response = client.post("/console/take", data={"csrf": token})
        taken.append(response.headers["location"])

    threads = [
        threading.Thread(target=press, args=pair) for pair in zip(clients, tokens, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 3 and len(set(taken)) == 3
    assert all(t.startswith("/console/cases/") for t in taken)


def test_a_lapsed_hold_goes_back_to_the_queue(
    run_dir: Path, tmp_path: Path, cases_url: str | None
) -> None:
    for console in served(run_dir, tmp_path / "data", cases_url, case_hold_seconds=1):
        console.open("tx-a")
        ann, bob = console.sign_in("ann"), console.sign_in("bob")
        case_id = take(ann)
        assert post(bob, "/console/take").headers["location"].startswith("/console/queue")
        time.sleep(1.2)  # ann idles past the hold
        assert take(bob) == case_id
        late = post(ann, f"/console/cases/{case_id}/verdict", outcome="fraud", note="stolen")
        assert late.status_code == 409 and "is not held by ann: take it first" in late.text


def test_the_queue_counts_filters_and_marks_overdue(console: Console) -> None:
    console.open("small", amount=10.0)
    console.open("big", amount=900.0, hours_ago=30, reasons=("terminal had 3 known frauds",))
    client = console.sign_in("ann")
    page = client.get("/console/queue").text
    assert '<strong id="count-open">2</strong>' in page
    assert page.count('<span class="badge overdue">overdue</span>') == 1
    assert page.index("#2") < page.index("#1")  # priority: score x amount
    only_small = client.get("/console/queue", params={"max_amount": "50"}).text
    assert "#1" in only_small and "#2" not in only_small
    by_rule = client.get("/console/queue", params={"rule": "terminal"}).text
    assert "#2" in by_rule and "#1" not in by_rule
    old = client.get("/console/queue", params={"min_age_hours": "24"}).text
    assert "#2" in old and "#1" not in old


def test_the_case_page_escapes_what_it_shows(console: Console) -> None:
    console.open("tx-<b>", reasons=("<script>alert(1)</script>",))
    client = console.sign_in("ann")
    case_id = take(client)
    page = client.get(f"/console/cases/{case_id}")
    assert page.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>" not in page.text
    assert "tx-&lt;b&gt;" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert client.get("/console/cases/999").status_code == 404


def test_escalation_needs_a_note_and_reaches_the_supervisors(console: Console) -> None:
    console.open("tx-a")
    ann = console.sign_in("ann")
    case_id = take(ann)
    no_note = post(ann, f"/console/cases/{case_id}/escalate", note="  ")
    assert no_note.status_code == 422 and "a note is required" in no_note.text
    assert post(ann, f"/console/cases/{case_id}/escalate", note="odd").status_code == 303
    sue = console.sign_in("sue")
    assert "#1" in sue.get("/console/queue", params={"status": "escalated"}).text
    actions = [e["action"] for e in console.cases.events(case_id=case_id)]
    assert actions == ["take", "escalate"]


def test_a_fraud_verdict_reaches_the_online_features(console: Console) -> None:
    with console.client() as api:
        tx = transaction(1, terminal_id="T")
        decided = api.post("/v1/decisions", json=tx, headers=AUTH)
        assert decided.status_code == 200
        console.open("tx-1")
        ann = console.sign_in("ann")
        case_id = take(ann)
        assert "tx-1" in ann.get(f"/console/cases/{case_id}").text
        verdict = post(
            ann, f"/console/cases/{case_id}/verdict", outcome="fraud", note="card reported stolen"
        )
        assert verdict.status_code == 303, verdict.text
        labels = read_labels(console.settings.audit_path)
        assert labels["transaction_id"].to_list() == ["tx-1"]
        assert labels["applied"].to_list() == [True]  # the feature state holds it
        # Eight days later (delay 7 days) the terminal's fraud rate counts the verdict.
        later = (datetime(2026, 3, 1, 12, tzinfo=UTC) + timedelta(days=8)).isoformat()
        tx2 = transaction(2, terminal_id="T", timestamp=later)
        assert api.post("/v1/decisions", json=tx2, headers=AUTH).status_code == 200
    audit = read_decisions(console.settings.audit_path)
    assert audit["terminal__fraud_rate__30d"].to_list() == [0.0, 1.0]
    closed = console.cases.get(case_id)
    assert (closed.outcome, closed.closed_by, closed.note) == (
        "fraud", "ann", "card reported stolen"
    )  # fmt: skip
    assert [e["action"] for e in console.cases.events()][-3:] == ["take", "view", "verdict"]


# --- decisions open cases -----------------------------------------------------------------

POLICY = """\
version: 1
thresholds: {review: 0.30, block: 0.90}
rules:
  - {name: large_amount, when: {feature: amount, above: 5000}, action: review}
  - {name: huge_amount, when: {feature: amount, above: 9000}, action: block}
"""


def test_review_and_block_decisions_open_cases(
    run_dir: Path, tmp_path: Path, cases_url: str | None
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    for console in served(run_dir, tmp_path / "data", cases_url, policy=policy):
        txs = [transaction(1, amount=12.0), transaction(2, amount=6000.0)]
        txs.append(transaction(3, amount=9500.0))
        with console.client() as api:
            response = api.post("/v1/decisions/batch", json={"transactions": txs}, headers=AUTH)
            assert response.status_code == 200, response.text
            again = api.post("/v1/decisions", json=txs[1], headers=AUTH)  # a replay: no new case
            assert again.status_code == 200
        decided = {d["transaction_id"]: d["decision"] for d in response.json()["decisions"]}
        assert decided["tx-2"] in ("review", "block") and decided["tx-3"] == "block"
        cases = {c.transaction_id: c for c in console.cases.queue(CaseFilter())}
        assert sorted(cases) == sorted(t for t, d in decided.items() if d != "approve")
        assert cases["tx-3"].confirm_only and cases["tx-3"].decision == "block"
        assert any("5000" in reason for reason in cases["tx-2"].reasons)
        ann = console.sign_in("ann")
        assert "tx-3" in ann.get(f"/console/cases/{take(ann)}").text  # score x amount: first


def test_without_the_console_no_case_is_opened(
    run_dir: Path, tmp_path: Path, cases_url: str | None
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    for console in served(run_dir, tmp_path / "data", cases_url, policy=policy, console=False):
        with console.client() as client:
            tx = transaction(1, amount=9500.0)
            assert client.post("/v1/decisions", json=tx, headers=AUTH).status_code == 200
            assert client.get("/console/login").status_code == 404
        assert console.cases.queue(CaseFilter()) == []


# --- metrics ------------------------------------------------------------------------------


def test_metrics_follow_the_queue_and_the_verdicts(console: Console) -> None:
    console.open("tx-1", "tx-2")
    console.open("tx-3", hours_ago=30)  # past the 24 h SLA
    with console.client() as scraper:
        before = scraper.get("/metrics").text
        assert metric_value(before, "fraudflow_cases_open") == 3
        assert metric_value(before, "fraudflow_cases_overdue") == 1
        assert (
            30 * 3_600
            <= metric_value(before, "fraudflow_cases_oldest_open_age_seconds")
            < 31 * 3_600
        )
        assert metric_value(before, "fraudflow_case_verdicts_total", outcome="fraud") == 0
        ann = console.sign_in("ann")
        first = take(ann)  # the highest priority: tx-2 (score 0.51 x 100)
        assert (
            post(ann, f"/console/cases/{first}/verdict", outcome="fraud", note="stolen").status_code
            == 303
        )
        sue = console.sign_in("sue")
        closed = post(sue, "/console/bulk-close", case_id=["3"], outcome="not_fraud", note="known")
        assert closed.status_code == 303, closed.text
        after = scraper.get("/metrics").text
    assert metric_value(after, "fraudflow_cases_open") == 1
    assert metric_value(after, "fraudflow_cases_overdue") == 0
    assert metric_value(after, "fraudflow_cases_oldest_open_age_seconds") < 60
    assert metric_value(after, "fraudflow_case_verdicts_total", outcome="fraud") == 1
    assert metric_value(after, "fraudflow_case_verdicts_total", outcome="not_fraud") == 1
    assert metric_value(after, "fraudflow_case_time_to_verdict_seconds_count") == 2
    # Case 3 opened 30 h before its verdict: in the 48 h bucket, not the 24 h one.
    day, two_days = (str(float(h * 3_600)) for h in (24, 48))
    assert metric_value(after, "fraudflow_case_time_to_verdict_seconds_bucket", le=day) == 1
    assert metric_value(after, "fraudflow_case_time_to_verdict_seconds_bucket", le=two_days) == 2


def test_a_service_whose_console_has_no_case_reports_no_case_gauges(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    assert "fraudflow_cases_open " not in text
    assert metric_value(text, "fraudflow_case_verdicts_total", outcome="fraud") == 0


# --- the case page ------------------------------------------------------------------------


def test_the_case_page_shows_the_cards_month_the_terminals_frauds_and_reasons_in_words(
    console: Console,
) -> None:
    reason = "customer__amount_ratio__30d = 5.2 raised the fraud log-odds by 1.234"
    # Opened first: the service's own case of tx-5, if any, would have other reasons.
    console.cases.open_cases([
        CaseIn(transaction_id="tx-5", customer_id="c1", terminal_id="T", amount=555.0,
               score=0.9, decision="review", reasons=(reason,), at_us=now_us())
    ])  # fmt: skip
    with console.client() as api:
        # Card c1: tx-1 (40 days earlier: out of the month), tx-2 and tx-3; card c2's tx-4 at
        # terminal T was fraud; tx-5 at T, by c1, is the case.
        txs = [
            transaction(1, terminal_id="A", amount=11.0, timestamp="2026-01-20T12:00:00+00:00"),
            transaction(2, terminal_id="A", amount=22.0),
            transaction(3, terminal_id="B", amount=33.0),
            transaction(4, terminal_id="T", customer_id="c2", amount=44.0),
            transaction(5, terminal_id="T", amount=555.0),
        ]
        for tx in txs:
            assert api.post("/v1/decisions", json=tx, headers=AUTH).status_code == 200
        label = {"transaction_id": "tx-4", "is_fraud": 1}
        assert api.post("/v1/labels", json=label, headers=AUTH).status_code == 200
    ann = console.sign_in("ann")
    page = ann.get(f"/console/cases/{take(ann)}").text
    history = _table(page, "card-history")
    assert [tx for tx in ("tx-1", "tx-2", "tx-3", "tx-4", "tx-5") if tx in history] == [
        "tx-2", "tx-3", "tx-5"
    ]  # fmt: skip
    assert "555.00" in history and "22.00" in history
    assert '<svg class="chart"' in page and page.count('<circle class="dot') == 3
    assert 'class="dot approve current"' in page or 'class="dot review current"' in page
    assert "tx-4" in _table(page, "terminal-frauds")
    assert "amount 5.2x the card&#39;s 30-day mean (raises the risk)" in page


def _table(page: str, table_id: str) -> str:
    found = re.search(f'<table class="cases" id="{table_id}">(.*?)</table>', page, re.S)
    assert found is not None, page
    return found.group(1)


# --- labels owed --------------------------------------------------------------------------


def test_a_verdict_whose_label_fails_is_retried_until_recorded(
    run_dir: Path, tmp_path: Path, cases_url: str | None
) -> None:
    data = tmp_path / "data"
    for console in served(run_dir, data, cases_url):
        with console.client() as api:
            assert api.post("/v1/decisions", json=transaction(1), headers=AUTH).status_code == 200
        console.open("tx-1", "tx-2")
        store = console.service._resources.store.inner  # type: ignore[union-attr]

        def failing(transaction_id: str, is_fraud: bool) -> bool:
            raise OSError("disk I/O error")

        store.set_label = failing  # type: ignore[method-assign]
        ann = console.sign_in("ann")
        first = take(ann)
        failed = post(ann, f"/console/cases/{first}/verdict", outcome="fraud", note="stolen")
        assert failed.status_code == 503 and "will be retried" in failed.text
        assert console.cases.get(first).outcome == "fraud"  # the verdict is kept
        assert [c for c, _ in console.cases.pending_labels()] == [first]
        assert not (
            console.settings.audit_path.is_file() and len(read_labels(console.settings.audit_path))
        )
    # A new server on the same data (the store works again) records it at start.
    for console in served(run_dir, data, cases_url):
        deadline = time.monotonic() + 20
        while console.cases.pending_labels() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert console.cases.pending_labels() == []
        labels = read_labels(console.settings.audit_path)
        assert labels["transaction_id"].to_list() == [console.cases.get(first).transaction_id]
        assert labels["is_fraud"].to_list() == [1]
        # The next verdict also retries: its label and no other is owed afterwards.
        ann = console.sign_in("ann")
        second = take(ann)
        assert (
            post(
                ann, f"/console/cases/{second}/verdict", outcome="not_fraud", note="ok"
            ).status_code
            == 303
        )
        assert console.cases.pending_labels() == []
