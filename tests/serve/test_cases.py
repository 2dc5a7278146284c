"""The review queue's case store: ordering, holds, verdicts, roles' actions, the audit trail.

Every test runs on both stores: a SQLite file, and a database of a real PostgreSQL server
(``cases_url``, tests/conftest.py).
"""

import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudflow.errors import DataError
from fraudflow.serve.cases import CaseFilter, CaseIn, CaseStore, Verdict

HOUR = 3_600 * 1_000_000
T0 = 1_780_000_000 * 1_000_000


def _decision(
    tx: str, score: float, amount: float, decision: str = "review", **kw: object
) -> CaseIn:
    return CaseIn(
        transaction_id=tx, customer_id=str(kw.get("card", "c1")), terminal_id="t1",
        amount=amount, score=score, decision=decision,
        reasons=tuple(kw.get("reasons", ("score 0.50 >= review threshold 0.30",))),  # type: ignore[arg-type]
        at_us=int(kw.get("at", T0)),  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture
def where(cases_url: str | None, tmp_path: Path) -> Path | str:
    return cases_url or tmp_path / "cases.db"


@pytest.fixture
def store(where: Path | str) -> Iterator[CaseStore]:
    store = CaseStore(where, sla_seconds=24 * 3_600, hold_seconds=15 * 60)
    yield store
    store.close()


def test_decisions_open_cases_once_in_priority_order(store: CaseStore) -> None:
    opened = store.open_cases([
        _decision("a", 0.5, 100.0),  # priority 50
        _decision("b", 0.9, 100.0),  # 90
        _decision("c", 0.9, 100.0, at=T0 + 1),  # 90, younger than b
        _decision("d", 0.2, 10.0, decision="approve"),  # no case
        _decision("e", 0.99, 10.0, decision="block"),  # confirm-only, 9.9
    ])  # fmt: skip
    assert opened == 4
    assert store.open_cases([_decision("a", 0.5, 100.0)]) == 0  # a replay opens nothing
    assert [c.transaction_id for c in store.queue(CaseFilter())] == ["b", "c", "a", "e"]
    assert store.queue(CaseFilter(min_amount=50))[-1].transaction_id == "a"
    e = store.queue(CaseFilter(max_amount=50))[0]
    assert e.confirm_only and e.decision == "block"
    assert store.counts(T0)["open"] == 4
    assert store.counts(T0 + 25 * HOUR)["overdue"] == 4  # due 24 h after opening


def _work_the_queue(where: Path | str, name: str, cases: int, start: object) -> list[str]:
    """An analyst with a store of its own (as another worker's or replica's): take ``cases``
    cases one after the other, each closed with a verdict; the transactions taken."""
    store = CaseStore(where)
    try:
        start.wait()  # type: ignore[attr-defined]
        taken = []
        for _ in range(cases):
            case = store.take_next(name, T0)
            assert case is not None
            taken.append(case.transaction_id)
            store.verdict(case.case_id, name, "not_fraud", "checked", T0)
        return taken
    finally:
        store.close()


def test_two_analysts_taking_next_at_once_get_different_cases(
    store: CaseStore, where: Path | str
) -> None:
    store.open_cases([_decision(f"tx{i}", 0.5 + i / 100, 100.0) for i in range(40)])
    taken: list[str] = []
    barrier = threading.Barrier(8)

    def analyst(name: str) -> None:
        taken.extend(_work_the_queue(where, name, 5, barrier))

    threads = [threading.Thread(target=analyst, args=(f"analyst{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 40 and len(set(taken)) == 40
    assert store.counts(T0)["closed"] == 40
    assert store.take_next("late", T0) is None


def test_analysts_in_several_processes_get_different_cases(
    store: CaseStore, where: Path | str
) -> None:
    store.open_cases([_decision(f"tx{i}", 0.5 + i / 100, 100.0) for i in range(12)])
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter, as a worker is
    with spawn.Manager() as manager:
        start = manager.Barrier(3)  # all three started before any takes a case
        with spawn.Pool(3) as pool:
            pending = [
                pool.apply_async(_work_the_queue, (where, f"analyst{i}", 4, start))
                for i in range(3)
            ]
            taken = [tx for result in pending for tx in result.get(timeout=120)]
    assert sorted(taken) == sorted(f"tx{i}" for i in range(12))


def test_analysts_whose_holds_lapsed_taking_next_at_once_never_fail(
    store: CaseStore, where: Path | str
) -> None:
    """Each round every hold has lapsed, so each analyst may take another's old case while
    giving back their own (in PostgreSQL: each row locked by the other's transaction). No
    call fails, and no case goes to two analysts in a round. (In PostgreSQL a call may find
    no case while all four are locked by the others' transactions of that instant.)"""
    store.open_cases([_decision(f"tx{i}", 0.5, 100.0) for i in range(4)])
    failures: list[BaseException] = []
    taken: dict[int, list[int]] = {}
    barrier = threading.Barrier(4)

    def analyst(name: str) -> None:
        own = CaseStore(where, hold_seconds=1)
        for round_ in range(1, 101):
            barrier.wait()
            try:
                case = own.take_next(name, T0 + round_ * 10_000_000)
            except BaseException as exc:
                failures.append(exc)
                continue
            if case is not None:
                taken.setdefault(round_, []).append(case.case_id)
        own.close()

    threads = [threading.Thread(target=analyst, args=(f"analyst{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert all(len(ids) == len(set(ids)) for ids in taken.values())
    assert sum(len(ids) for ids in taken.values()) > 100  # most calls found a case


def test_a_hold_lapses_and_the_case_goes_back_to_the_queue(store: CaseStore) -> None:
    store.open_cases([_decision("a", 0.9, 100.0), _decision("b", 0.5, 100.0)])
    first = store.take_next("ann", T0)
    assert first is not None and first.transaction_id == "a"
    assert store.take_next("bob", T0 + 60 * 1_000_000).transaction_id == "b"  # type: ignore[union-attr]
    assert store.take_next("cy", T0 + 120 * 1_000_000) is None  # both held
    lapsed = T0 + 16 * 60 * 1_000_000  # ann idle for 16 minutes, bob for 15
    assert store.take_next("cy", lapsed).transaction_id == "a"  # type: ignore[union-attr]
    # Skipping: bob takes next without a verdict; b goes back to the queue, for others.
    assert store.take_next("bob", lapsed) is None
    assert store.take_next("dee", lapsed).transaction_id == "b"  # type: ignore[union-attr]
    with pytest.raises(DataError, match="is not held by ann: take it first"):
        store.verdict(first.case_id, "ann", "fraud", "looks stolen", lapsed)


def test_the_holder_viewing_the_case_renews_the_hold_and_others_do_not(store: CaseStore) -> None:
    store.open_cases([_decision("a", 0.9, 100.0)])
    case = store.take_next("ann", T0)
    assert case is not None
    minute = 60 * 1_000_000
    assert store.view(case.case_id, "sue", T0 + 10 * minute).held_until_us == T0 + 15 * minute
    assert store.view(case.case_id, "ann", T0 + 10 * minute).held_until_us == T0 + 25 * minute
    assert store.take_next("bob", T0 + 20 * minute) is None  # still ann's
    with pytest.raises(DataError, match="case 99 does not exist"):
        store.view(99, "ann", T0)
    actions = [(e["user"], e["action"]) for e in store.events()]
    assert actions == [("ann", "take"), ("sue", "view"), ("ann", "view")]


def test_a_verdict_needs_the_hold_and_a_note_and_returns_the_label(store: CaseStore) -> None:
    store.open_cases([_decision("a", 0.9, 100.0)])
    case = store.take_next("ann", T0)
    assert case is not None
    with pytest.raises(DataError, match="a note is required"):
        store.verdict(case.case_id, "ann", "fraud", "  ", T0)
    with pytest.raises(DataError, match="is not held by bob"):
        store.verdict(case.case_id, "bob", "fraud", "mine", T0)
    assert store.verdict(case.case_id, "ann", "fraud", "card stolen", T0 + 5) == Verdict("a", True)
    closed = store.get(case.case_id)
    assert (closed.status, closed.outcome, closed.closed_by) == ("closed", "fraud", "ann")
    with pytest.raises(DataError, match="closed already"):
        store.verdict(case.case_id, "ann", "not_fraud", "oops", T0 + 6)
    assert store.take_next("ann", T0 + 7) is None


def test_escalation_reassignment_and_bulk_close(store: CaseStore) -> None:
    store.open_cases([_decision(x, 0.9, 100.0) for x in "abc"])
    case = store.take_next("ann", T0)
    assert case is not None
    store.escalate(case.case_id, "ann", "needs a supervisor", T0)
    assert store.get(case.case_id).status == "escalated"
    assert store.queue(CaseFilter(status="escalated"))[0].case_id == case.case_id
    store.reassign(case.case_id, "bob", by="sue", now_us=T0 + 1)
    assert store.get(case.case_id).held_by(T0 + 2) == "bob"
    ids = [c.case_id for c in store.queue(CaseFilter())]
    verdicts = store.bulk_close(ids, "not_fraud", "known merchant promotion", "sue", T0 + 3)
    assert sorted(v.transaction_id for v in verdicts) == ["a", "b", "c"]
    assert not any(v.is_fraud for v in verdicts)
    actions = [(e["user"], e["action"]) for e in store.events()]
    assert actions == [
        ("ann", "take"), ("ann", "escalate"), ("sue", "reassign"),
        ("sue", "bulk_close"), ("sue", "bulk_close"), ("sue", "bulk_close"),
    ]  # fmt: skip


def test_earlier_cases_of_the_card_and_filters(store: CaseStore) -> None:
    store.open_cases([
        _decision("old", 0.5, 10.0, card="c9", at=T0 - 48 * HOUR, reasons=("burst",)),
        _decision("new", 0.5, 10.0, card="c9", at=T0, reasons=("large_amount",)),
    ])  # fmt: skip
    assert [c.transaction_id for c in store.card_cases("c9", before_us=T0)] == ["old"]
    assert [c.transaction_id for c in store.queue(CaseFilter(rule="burst"))] == ["old"]
    assert [c.transaction_id for c in store.queue(CaseFilter(opened_before_us=T0 - HOUR))] == [
        "old"
    ]
