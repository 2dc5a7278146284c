"""The case pages' history: the audit log followed into the case store, by card and terminal;
the reasons in words and the amounts chart that the case page shows."""

from __future__ import annotations

from pathlib import Path

from fraudflow.serve.audit import AuditLog, DecisionRecord, LabelRecord, pack_features
from fraudflow.serve.cases import CaseStore, Decided
from fraudflow.serve.charts import amounts_chart
from fraudflow.serve.history import follow_audit
from fraudflow.serve.wording import in_words

DAY_US = 86_400 * 1_000_000
NOW_US = 1_767_225_600_000_000  # 2026-01-01


def decided(i: int, *, card: str = "c1", terminal: str = "t1", day: int = 0) -> DecisionRecord:
    return DecisionRecord(
        transaction_id=f"tx-{i}", t_us=NOW_US + day * DAY_US + i, customer_id=card,
        terminal_id=terminal, amount=10.0 * i, score=0.1 * i, raw_score=0.1, decision="approve",
        model_version="m", decided_at_us=NOW_US, packed_features=pack_features([1.0]),
        response=b'{"reasons": []}', feature_names=("f",),
    )  # fmt: skip


def ids(rows: list[Decided]) -> list[str]:
    return [r.transaction_id for r in rows]


def test_following_copies_each_decision_and_label_once(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.db")
    cases = CaseStore(tmp_path / "cases.db")
    records = [decided(1, day=-40), decided(2, day=-3), decided(3, card="c2"), decided(4)]
    audit.submit(records).result(timeout=10)
    assert follow_audit(tmp_path / "audit.db", cases, now_us=NOW_US) == 4
    assert follow_audit(tmp_path / "audit.db", cases, now_us=NOW_US) == 0  # nothing new
    assert ids(cases.card_history("c1", since_us=NOW_US - 30 * DAY_US)) == ["tx-2", "tx-4"]
    assert cases.decided("tx-3") == Decided("tx-3", "c2", "t1", NOW_US + 3, 30.0, 0.1 * 3,
                                            "approve", NOW_US, None)  # fmt: skip
    labels = [
        LabelRecord("tx-3", True, None, NOW_US, True),
        LabelRecord("tx-2", True, None, 1, True),
    ]
    audit.submit([*labels, LabelRecord("tx-2", False, None, 2, True)]).result(timeout=10)
    audit.submit([decided(5)._replace(decision="review")]).result(timeout=10)
    assert follow_audit(tmp_path / "audit.db", cases, now_us=NOW_US) == 1
    frauds = cases.terminal_frauds("t1", since_us=NOW_US - DAY_US)
    assert ids(frauds) == ["tx-3"]  # tx-2's latest label is not fraud
    assert cases.decided("tx-2").is_fraud == 0  # type: ignore[union-attr]
    assert cases.decided("tx-5").decision == "review"  # type: ignore[union-attr]
    audit.close()
    cases.close()


def test_a_log_made_anew_is_followed_from_its_start(tmp_path: Path) -> None:
    cases = CaseStore(tmp_path / "cases.db")
    first = AuditLog(tmp_path / "a" / "audit.db")
    first.submit([decided(1), decided(2)]).result(timeout=10)
    first.submit([decided(3)]).result(timeout=10)
    first.close()
    follow_audit(tmp_path / "a" / "audit.db", cases, now_us=NOW_US)
    # Another log at another path: its own cursor, from its first group.
    second = AuditLog(tmp_path / "b" / "audit.db")
    second.submit([decided(7)]).result(timeout=10)
    second.close()
    assert follow_audit(tmp_path / "b" / "audit.db", cases, now_us=NOW_US) == 1
    assert ids(cases.card_history("c1", since_us=0)) == ["tx-1", "tx-2", "tx-3", "tx-7"]
    cases.close()


def test_decisions_older_than_the_retention_are_forgotten(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.db")
    cases = CaseStore(tmp_path / "cases.db")
    audit.submit([decided(1)]).result(timeout=10)
    follow_audit(tmp_path / "audit.db", cases, now_us=NOW_US)
    audit.submit([decided(2)]).result(timeout=10)
    follow_audit(tmp_path / "audit.db", cases, now_us=NOW_US + 91 * DAY_US)
    assert ids(cases.card_history("c1", since_us=0)) == []  # both decided 91 days before
    audit.close()
    cases.close()


def test_reasons_in_words() -> None:
    words = {
        "customer__amount_ratio__30d = 5.2 raised the fraud log-odds by 1.234":
            "amount 5.2x the card's 30-day mean (raises the risk)",
        "terminal__known_fraud_count__7d = 3 raised the fraud log-odds by 0.2":
            "the terminal had 3 known frauds in its 7-day window (raises the risk)",
        "terminal__fraud_rate__28d = 0.25 raised the fraud log-odds by 0.5":
            "25% of the terminal's labelled 28-day window was fraud (raises the risk)",
        "customer__count__1h = 7 raised the fraud log-odds by 1":
            "7 transactions on the card in the last hour (raises the risk)",
        "customer__count__7d = 1 lowered the fraud log-odds by 1":
            "1 transaction on the card in the last 7 days (lowers the risk)",
        "customer__hours_since_prev = 0.1 lowered the fraud log-odds by 0.3":
            "6 min since the card's previous transaction (lowers the risk)",
        "tx__is_night = 1 raised the fraud log-odds by 0.3":
            "at night (00:00-06:00 UTC) (raises the risk)",
        "score 0.9512 >= block threshold 0.9": "score 0.951, at or over the block threshold 0.9",
        "amount 6000 > 5000": "amount 6000 > 5000",  # a rule's own words
        "merchant__thing__1d = 2 raised the fraud log-odds by 1":
            "merchant__thing__1d = 2 raised the fraud log-odds by 1",  # unknown: as it came
    }  # fmt: skip
    assert {detail: in_words(detail) for detail in words} == words


def test_the_chart_has_a_dot_per_transaction_and_escapes_its_text() -> None:
    rows = [
        Decided("<tx-1>", "c", "t", NOW_US, 10.0, 0.1, "approve", NOW_US, None),
        Decided("tx-2", "c", "t", NOW_US + DAY_US, 40.0, 0.9, "block", NOW_US, 1),
        Decided("tx-3", "c", "t", NOW_US + 4 * DAY_US, 20.0, 0.6, "review", NOW_US, None),
    ]
    svg = str(amounts_chart(rows, current="tx-3"))
    assert svg.count("<circle") == 3 and "<tx-1>" not in svg and "&lt;tx-1&gt;" in svg
    assert 'class="dot block fraud"' in svg and 'class="dot review current"' in svg
    # x from the first to the last time, y from 0 (bottom) to the largest amount (top).
    # The plot spans x 56..552 and y 128 (0) .. 8 (40, the largest); tx-2 is a quarter in.
    assert 'cx="56.0" cy="98.0"' in svg and 'cx="180.0" cy="8.0"' in svg
    assert 'cx="552.0" cy="68.0"' in svg
    assert str(amounts_chart([], current="x")) == ""


def test_a_cursor_only_moves_forward(tmp_path: Path) -> None:
    cases = CaseStore(tmp_path / "cases.db")
    assert cases.history_cursor("host:/audit.db:1:decisions") == 0
    for seq in (5, 3, 9):  # a slower follower's 3 comes after the 5
        cases.set_history_cursor("host:/audit.db:1:decisions", seq)
        assert cases.history_cursor("host:/audit.db:1:decisions") == max(5, seq)
    cases.close()
