"""The online evaluator gives the batch features, one event at a time."""

import heapq
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import numpy as np
import polars as pl
import pytest

from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.data.schema import IS_FRAUD, TIMESTAMP, TRANSACTION_ID
from fraudflow.data.simulator import simulate
from fraudflow.errors import DataError
from fraudflow.features import build_features, feature_names
from fraudflow.features.online import Event, MemoryStore, OnlineFeatures, Watermark, Window
from tests.features.test_batch import CFG, TINY

SIM_CFG = FeatureConfig()  # the production windows: 1h/1d/7d/30d, terminals 1d/7d/30d, delay 7d
Row = dict[str, Any]


@cache
def simulated(n_customers: int = 200, n_terminals: int = 400, n_days: int = 45) -> pl.DataFrame:
    """45 days: longer than the 37-day retention, so replays also exercise pruning."""
    sim = SimulationConfig(n_customers=n_customers, n_terminals=n_terminals, n_days=n_days, seed=1)
    return simulate(sim)


def replay(
    frame: pl.DataFrame, cfg: FeatureConfig, online_for: Callable[[int], OnlineFeatures]
) -> list[dict[str, float]]:
    """Score the rows in batch arrival order through ``online_for(i)`` for the i-th event.

    Each label is reported as soon as the batch rule makes it known: before the first event
    at t >= s + delay.
    """
    delay = timedelta(days=cfg.label_delay_days)
    due: list[tuple[datetime, int, Any, int]] = []  # heap of (s + delay, arrival, id, label)
    out = []
    for i, row in enumerate(frame.sort(TIMESTAMP, maintain_order=True).iter_rows(named=True)):
        online = online_for(i)
        while due and due[0][0] <= row[TIMESTAMP]:
            _, _, transaction_id, label = heapq.heappop(due)
            online.record_label(transaction_id, label)
        out.append(online.features(row))
        heapq.heappush(due, (row[TIMESTAMP] + delay, i, row[TRANSACTION_ID], row[IS_FRAUD]))
    return out


def assert_matches_batch(
    rows: list[dict[str, float]], frame: pl.DataFrame, cfg: FeatureConfig
) -> None:
    """Every feature within 1e-6 of batch: absolute below 1, relative above."""
    batch = build_features(frame, cfg)
    names = feature_names(cfg)
    assert all(list(row) == names for row in rows)
    for name in names:
        online, want = np.array([row[name] for row in rows]), batch[name].to_numpy()
        err = np.abs(online - want) / np.maximum(1.0, np.abs(want))
        i = int(err.argmax())
        assert err[i] <= 1e-6, f"{name}, row {i}: online {online[i]!r}, batch {want[i]!r}"


def replay_in_groups(
    frame: pl.DataFrame, cfg: FeatureConfig, online: OnlineFeatures, sizes: list[int]
) -> list[dict[str, float]]:
    """``replay`` through ``features_many``, groups of the given sizes in turn; a group ends
    early where a label becomes due, since labels are reported between groups."""
    delay = timedelta(days=cfg.label_delay_days)
    rows = list(frame.sort(TIMESTAMP, maintain_order=True).iter_rows(named=True))
    due: list[tuple[datetime, int, Any, int]] = []
    out: list[dict[str, float]] = []
    start, turn = 0, 0
    while start < len(rows):
        while due and due[0][0] <= rows[start][TIMESTAMP]:
            _, _, transaction_id, label = heapq.heappop(due)
            online.record_label(transaction_id, label)
        end = start + 1
        while end < min(len(rows), start + sizes[turn % len(sizes)]):
            first_due = min((d[0] for d in due), default=None)
            if first_due is not None and first_due <= rows[end][TIMESTAMP]:
                break
            if rows[end][TIMESTAMP] >= rows[start][TIMESTAMP] + delay:  # its own labels
                break
            end += 1
        group = rows[start:end]
        features = online.features_many(group)
        assert all(f is not None for f in features)
        out += [f for f in features if f is not None]
        for i, row in enumerate(group, start):
            heapq.heappush(due, (row[TIMESTAMP] + delay, i, row[TRANSACTION_ID], row[IS_FRAUD]))
        start, turn = end, turn + 1
    return out


def _memory(cfg: FeatureConfig) -> OnlineFeatures:
    return OnlineFeatures(cfg=cfg, store=MemoryStore())


def test_tiny_table_equals_batch_exactly() -> None:
    online = _memory(CFG)
    rows = replay(TINY, CFG, lambda _: online)
    batch = build_features(TINY, CFG)
    for name in feature_names(CFG):
        assert [row[name] for row in rows] == batch[name].to_list(), name


def test_simulated_replay_matches_batch() -> None:
    online = _memory(SIM_CFG)
    assert_matches_batch(replay(simulated(), SIM_CFG, lambda _: online), simulated(), SIM_CFG)


def test_groups_equal_one_by_one() -> None:
    """features_many of groups small (numpy rows) and large (list rows) equals features one
    by one, hence batch."""
    online = _memory(SIM_CFG)
    grouped = replay_in_groups(simulated(), SIM_CFG, online, [1, 3, 15, 16, 17, 200, 1000])
    assert_matches_batch(grouped, simulated(), SIM_CFG)
    one = _memory(SIM_CFG)
    assert grouped == replay(simulated(), SIM_CFG, lambda _: one)


def test_a_group_skips_repeated_ids_and_sees_its_earlier_events() -> None:
    online = _memory(CFG)
    r0, r1, *_ = _tiny_rows()
    out = online.features_many([r0, r1, r0])
    assert out[2] is None and out[0] is not None and out[1] is not None
    assert out[1]["customer__count__1d"] == 2  # r1 sees r0, as one by one
    assert online.features_many([r1]) == [None]


def test_sums_stay_right_when_a_whole_history_is_forgotten_unasked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A history whose running sums lag (events stored by calls that asked nothing, as a
    mirror catching up) and is then forgotten whole starts its sums afresh."""
    monkeypatch.setattr("fraudflow.features.online._SWEEP_EVERY", 1)
    store, low = MemoryStore(), -(2**62)
    window = [Window("customer", 100, amounts=True)]

    def event(tx: str, t_us: int, amount: float) -> Event:
        return Event(tx, t_us, "C", "T", amount)

    store.apply_many([event("a", 1, 1.0), event("b", 2, 2.0)], window, forget_until_us=low)
    store.apply_many([event("c", 3, 4.0)], [], forget_until_us=low)  # its sum not asked
    store.apply_many([event("d", 1_000, 16.0)], [], forget_until_us=999)  # a, b, c go
    answers = store.apply_many([event("e", 1_001, 32.0)], window, forget_until_us=low)
    assert answers.count.tolist() == [[1]]
    assert answers.amount.tolist() == [[16.0]]


def _tiny_rows() -> list[Row]:
    return TINY.drop(IS_FRAUD).to_dicts()


def test_leakage_trap_labels_not_yet_known_change_nothing() -> None:
    online = _memory(CFG)
    *earlier, r4 = _tiny_rows()
    for row in earlier:
        online.features(row)
    before = online.peek(r4)
    # r4 is at day 1 10:45, delay 1d: only labels of transactions at <= day 0 10:45 are known.
    online.record_label("r3", 1)  # day 1 10:15: not yet known
    assert online.peek(r4) == before
    # The trap can spring: r1 (day 0 10:30) is known, at its card and at terminal X.
    online.record_label("r1", 1)
    sprung = online.peek(r4)
    assert (
        sprung["customer__known_fraud_count__7d"] == before["customer__known_fraud_count__7d"] + 1
    )
    assert sprung["terminal__fraud_rate__1d"] == pytest.approx(1 / 3)
    online.record_label("r1", 0)  # labels can be corrected: the latest wins
    assert online.peek(r4) == before


def test_peek_records_nothing() -> None:
    peeking, plain = _memory(CFG), _memory(CFG)
    for row in _tiny_rows():
        peeked = peeking.peek(row)
        assert peeking.peek(row) == peeked
        assert peeking.features(row) == peeked == plain.features(row)


def test_label_for_unknown_transaction_is_a_data_error() -> None:
    online = _memory(CFG)
    online.features(_tiny_rows()[0])
    with pytest.raises(DataError, match=r"cannot label transaction_id 'nope': expected a trans"):
        online.record_label("nope", 1)
    with pytest.raises(DataError, match="is_fraud must be 0 or 1, however got 2"):
        online.record_label("r0", 2)


def test_a_transaction_is_scored_once() -> None:
    online = _memory(CFG)
    row = _tiny_rows()[0]
    online.features(row)
    with pytest.raises(DataError, match="transaction_id 'r0' is already in the state store"):
        online.features(row)


def test_timestamp_forms_agree() -> None:
    at = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)
    forms = [at, "2026-03-02T10:30:00Z", "2026-03-02T12:30:00+02:00", "2026-03-02 10:30:00"]
    online = _memory(CFG)
    online.features({**_tiny_rows()[0], TIMESTAMP: at - timedelta(minutes=45)})
    row = _tiny_rows()[1]
    peeks = [online.peek({**row, TIMESTAMP: form}) for form in forms]
    assert all(p == peeks[0] for p in peeks)
    assert peeks[0]["customer__hours_since_prev"] == 0.75


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"amount": -1.0}, "`amount` must be finite and >= 0, however got -1.0"),
        ({"amount": "ten"}, "`amount` must be a number, however got 'ten'"),
        ({"timestamp": "yesterday"}, "`timestamp` must be an ISO 8601 date-time"),
        ({"timestamp": 1.5}, "`timestamp` must be a datetime or ISO 8601 string"),
        ({"customer_id": None}, r"however \['customer_id'\] are missing"),
    ],
)
def test_invalid_transactions_are_data_errors(change: Row, message: str) -> None:
    with pytest.raises(DataError, match=message):
        _memory(CFG).features({**_tiny_rows()[0], **change})


def test_old_events_are_forgotten() -> None:
    store = MemoryStore()
    online = OnlineFeatures(cfg=CFG, store=store)
    first, second = _tiny_rows()[:2]
    online.features(first)
    later = first[TIMESTAMP] + timedelta(days=60)  # past the 30-day retention (the gap cap)
    out = online.features({**second, TIMESTAMP: later})
    assert out["customer__hours_since_prev"] == 720
    assert out["customer__count__7d"] == 1  # itself only
    probe, everything = Event("probe", 2**62, "A", "X", 1.0), [Window("customer", 2**63)]
    with pytest.raises(DataError, match="'r0'"):
        online.record_label("r0", 1)
    assert online.prune(later + timedelta(days=60)) == 1
    assert store.read([probe], everything).count.tolist() == [[0]]


def test_the_watermark_moves_at_most_the_skew_per_group() -> None:
    day = 86_400_000_000
    now = [100 * day]
    mark = Watermark(max_skew_us=day, clock_us=lambda: now[0])
    assert mark.advance(50 * day) == 50 * day  # the first group sets it
    assert mark.advance(10**18) == 51 * day  # far ahead: one skew at most
    assert mark.advance(40 * day) == 51 * day  # late events move nothing
    assert mark.advance(51 * day + 5) == 51 * day + 5
    mark = Watermark(max_skew_us=day, clock_us=lambda: now[0])
    assert mark.advance(10**18) == 101 * day  # no history: the clock plus the skew


def test_a_far_future_event_does_not_make_the_state_forget() -> None:
    store = MemoryStore()
    online = OnlineFeatures(
        cfg=SIM_CFG, store=store, watermark=Watermark(max_skew_us=86_400_000_000)
    )
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    for i in range(10):
        online.features({"transaction_id": f"a{i}", "timestamp": t0 + timedelta(minutes=i),
                         "customer_id": "c1", "terminal_id": "t1", "amount": 10.0})  # fmt: skip
    online.features({"transaction_id": "far", "timestamp": datetime(9999, 12, 31, tzinfo=UTC),
                     "customer_id": "c2", "terminal_id": "t2", "amount": 1.0})  # fmt: skip
    for i in range(10):
        online.record_label(f"a{i}", True)  # refused if forgotten
    later = online.peek({"transaction_id": "b", "timestamp": t0 + timedelta(hours=1),
                         "customer_id": "c1", "terminal_id": "t1", "amount": 10.0})  # fmt: skip
    assert later["customer__count__1d"] == 11.0
