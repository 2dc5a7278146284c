"""A seeded, vectorised simulator of labelled payment transactions: fraudflow's default data.

The generative model follows the "transaction data simulator" of Le Borgne et al.,
*Reproducible Machine Learning for Credit Card Fraud Detection - Practical Handbook*
(Université Libre de Bruxelles, 2022), chapter 3, extended with a weekly rhythm and a
card-testing scenario:

- customers live at a home point of a 100 x 100 square, with a mean amount, an amount
  spread and a mean number of transactions per day; terminals have a location too;
- each customer pays at terminals within ``_RADIUS`` of home (the nearest few if none);
- daily counts are Poisson (so some customers are idle some days), scaled by a weekday
  factor; times of day are normal around a per-customer hour, truncated to the day.

Fraud scenarios (``SCENARIOS``), each with its own start and end dates:

    large_amount          every amount > 220 is fraud, over the whole period
    compromised_terminal  every 3 days ~2 terminals per 10k; all their rows for 28 days
    compromised_card      every 2 days ~4 cards per 5k; a third of their rows for 14 days,
                          amount x5 (card-not-present spending)
    card_testing          extra rows: 5-15 tiny payments seconds-to-minutes apart at 1-3
                          terminals anywhere, then within hours 1-3 large ones

Event counts scale with the number of terminals or customers, so the fraud rate (about
0.5%) does not depend on the size of the config. When several scenarios apply to a row it
carries the last one in ``SCENARIOS`` order (the most specific); ``is_fraud`` is 1 when any
applies.

Output shape: one row per transaction, columns ``SIMULATED_COLUMNS``, sorted by timestamp.
Timestamps have one-second resolution; equal timestamps keep generation order, which
depends only on the config, so the frame is identical for an identical config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time

import numpy as np
import polars as pl

from fraudflow.config import SimulationConfig
from fraudflow.data.schema import (
    AMOUNT,
    CUSTOMER_ID,
    IS_FRAUD,
    TERMINAL_ID,
    TIMESTAMP,
    TRANSACTION_ID,
)

__all__ = [
    "FRAUD_SCENARIO",
    "LARGE_AMOUNT_THRESHOLD",
    "SCENARIOS",
    "SIMULATED_COLUMNS",
    "simulate",
]

FRAUD_SCENARIO = "fraud_scenario"
SIMULATED_COLUMNS: tuple[str, ...] = (
    TRANSACTION_ID,
    TIMESTAMP,
    CUSTOMER_ID,
    TERMINAL_ID,
    AMOUNT,
    IS_FRAUD,
    FRAUD_SCENARIO,
)
# Label priority rises along this tuple; row code k > 0 means SCENARIOS[k - 1].
SCENARIOS: tuple[str, ...] = (
    "large_amount",
    "compromised_terminal",
    "compromised_card",
    "card_testing",
)
_LARGE, _TERMINAL, _CARD, _TESTING = (np.int8(k) for k in range(1, len(SCENARIOS) + 1))

LARGE_AMOUNT_THRESHOLD = 220.0

_SIDE = 100.0  # customers and terminals live in [0, _SIDE)^2
_RADIUS = 5.0  # a customer pays at terminals this close to home (the Handbook's r)
_FALLBACK_TERMINALS = 3  # used when no terminal lies within _RADIUS
_DAY_SECONDS = 86_400
# Mon..Sun: a Friday peak and quieter weekends, so features see a weekly pattern.
_WEEKDAY_FACTOR = np.array([1.0, 1.0, 1.0, 1.05, 1.15, 0.8, 0.6])
_HOUR_CENTRE, _HOUR_SPREAD = 13.0, 1.5  # per-customer preferred hour ~ N(13h, 1.5h)
_TIME_STD_SECONDS = 4.0 * 3600  # time of day ~ N(preferred hour, 4h), truncated to the day

_TERMINAL_EVERY_DAYS, _TERMINALS_PER_EVENT, _TERMINAL_DAYS = 3, 2.0 / 10_000, 28
_CARD_EVERY_DAYS, _CARDS_PER_EVENT, _CARD_DAYS = 2, 4.0 / 5_000, 14
_CARD_FRAUD_SHARE, _CARD_FRAUD_FACTOR = 1.0 / 3.0, 5.0
_TESTING_EVENTS_PER_CUSTOMER_DAY = 1.6e-4
_TESTING_SMALL, _TESTING_LARGE, _TESTING_TERMINALS = (5, 15), (1, 3), 3
_TESTING_LARGE_FACTOR = (3.0, 8.0)  # follow-up amount / the customer's mean amount

_N_STAGES = 7


@dataclass(frozen=True)
class _Customers:
    x: np.ndarray  # (C,)
    y: np.ndarray  # (C,)
    mean_amount: np.ndarray  # (C,)
    std_amount: np.ndarray  # (C,)
    tx_per_day: np.ndarray  # (C,)
    centre_second: np.ndarray  # (C,) preferred second of the day


@dataclass(frozen=True)
class _Terminals:
    x: np.ndarray  # (T,)
    y: np.ndarray  # (T,)


@dataclass(frozen=True)
class _Nearby:
    """Each customer's terminals as CSR: ``index[start[c]:start[c] + count[c]]``."""

    start: np.ndarray  # (C,)
    count: np.ndarray  # (C,)
    index: np.ndarray  # (sum of counts,)


@dataclass(frozen=True)
class _Tx:
    """Transactions as parallel arrays; ``amount`` and ``scenario`` are updated in place."""

    day: np.ndarray  # (N,) int64, days since start_date
    second: np.ndarray  # (N,) int64, seconds since midnight UTC
    customer: np.ndarray  # (N,) int64
    terminal: np.ndarray  # (N,) int64
    amount: np.ndarray  # (N,) float64, in cents precision
    scenario: np.ndarray  # (N,) int8, 0 legitimate, else 1 + index in SCENARIOS


def simulate(
    cfg: SimulationConfig, *, progress: Callable[[int, int], None] | None = None
) -> pl.DataFrame:
    """Simulate ``cfg.n_days`` days of labelled transactions, sorted by timestamp.

    ``progress(done, total)``, when given, is called after each of the ``total`` stages.
    """
    rngs = np.random.default_rng(cfg.seed).spawn(6)  # one stream per random stage
    step = _stepper(progress)
    customers = _make_customers(rngs[0], cfg.n_customers)
    terminals = _Terminals(*rngs[1].uniform(0.0, _SIDE, size=(2, cfg.n_terminals)))
    step()
    nearby = _nearby_terminals(customers, terminals)
    step()
    tx = _legit_transactions(rngs[2], cfg, customers, nearby)
    step()
    _compromise_cards(rngs[3], tx, cfg)
    step()
    tx = _concat(tx, _card_testing(rngs[4], cfg, customers))
    step()
    _compromise_terminals(rngs[5], tx, cfg)
    _flag_large_amounts(tx)
    step()
    frame = _to_frame(tx, cfg)
    step()
    return frame


def _stepper(progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, _N_STAGES)

    return step


# --- population ----------------------------------------------------------------------------


def _make_customers(rng: np.random.Generator, n: int) -> _Customers:
    x, y = rng.uniform(0.0, _SIDE, size=(2, n))
    mean_amount = rng.uniform(5.0, 100.0, n)
    tx_per_day = rng.uniform(0.0, 4.0, n)
    hour = np.clip(rng.normal(_HOUR_CENTRE, _HOUR_SPREAD, n), 8.0, 18.0)
    # The Handbook's spread: std = mean / 2, so amounts vary in proportion to their size.
    return _Customers(x, y, mean_amount, mean_amount / 2.0, tx_per_day, hour * 3600.0)


def _nearby_terminals(customers: _Customers, terminals: _Terminals) -> _Nearby:
    n_customers, n_terminals = len(customers.x), len(terminals.x)
    # Customers in chunks keep the (B, T) distance block near 16 MB at any config size.
    chunk = max(1, 2_000_000 // n_terminals)
    counts, indices = [], []
    for lo in range(0, n_customers, chunk):
        hi = min(lo + chunk, n_customers)
        dx = customers.x[lo:hi, None] - terminals.x[None, :]  # (B, T)
        dy = customers.y[lo:hi, None] - terminals.y[None, :]  # (B, T)
        mask = _within_or_nearest(dx * dx + dy * dy)
        counts.append(mask.sum(axis=1))
        indices.append(np.nonzero(mask)[1])  # row-major, so grouped by customer
    count = np.concatenate(counts)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return _Nearby(start=start, count=count, index=np.concatenate(indices))


def _within_or_nearest(dist2: np.ndarray) -> np.ndarray:
    """(B, T) mask of terminals within the radius, or the nearest few where there are none."""
    mask = dist2 <= _RADIUS**2
    lonely = np.flatnonzero(~mask.any(axis=1))
    if len(lonely):
        k = min(_FALLBACK_TERMINALS, dist2.shape[1])
        nearest = np.argpartition(dist2[lonely], k - 1, axis=1)[:, :k]  # (L, k)
        mask[lonely[:, None], nearest] = True
    return mask


# --- legitimate transactions ---------------------------------------------------------------


def _legit_transactions(
    rng: np.random.Generator, cfg: SimulationConfig, customers: _Customers, nearby: _Nearby
) -> _Tx:
    weekday = (cfg.start_date.weekday() + np.arange(cfg.n_days)) % 7
    rate = np.outer(_WEEKDAY_FACTOR[weekday], customers.tx_per_day)  # (D, C)
    cell = np.repeat(np.arange(rate.size), rng.poisson(rate).ravel())  # (N,) = d * C + c
    day, customer = np.divmod(cell, cfg.n_customers)
    pick = (rng.random(len(cell)) * nearby.count[customer]).astype(np.int64)
    return _Tx(
        day=day,
        second=_time_of_day(rng, customers.centre_second[customer]),
        customer=customer,
        terminal=nearby.index[nearby.start[customer] + pick],
        amount=_amounts(rng, customers.mean_amount[customer], customers.std_amount[customer]),
        scenario=np.zeros(len(cell), dtype=np.int8),
    )


def _time_of_day(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """Seconds since midnight ~ N(centre, 4h) truncated to the day by redrawing (no pile-ups)."""
    seconds = rng.normal(centre, _TIME_STD_SECONDS)
    outside = np.flatnonzero((seconds < 0) | (seconds >= _DAY_SECONDS))
    while len(outside):
        seconds[outside] = rng.normal(centre[outside], _TIME_STD_SECONDS)
        bad = (seconds[outside] < 0) | (seconds[outside] >= _DAY_SECONDS)
        outside = outside[bad]
    return seconds.astype(np.int64)


def _amounts(rng: np.random.Generator, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    amount = rng.normal(mean, std)
    # The Handbook redraws non-positive amounts uniformly in (0, 2 * mean).
    negative = np.flatnonzero(amount <= 0)
    amount[negative] = rng.uniform(0.0, 2.0 * mean[negative])
    return _cents(amount)


def _cents(amount: np.ndarray) -> np.ndarray:
    return np.maximum(np.round(amount, 2), 0.01)


# --- fraud scenarios ---------------------------------------------------------------------------


def _compromise_starts(
    rng: np.random.Generator, n_entities: int, n_days: int, every_days: int, per_event: float
) -> np.ndarray:
    """(E,) first compromised day of each entity, or -1; each entity is compromised at most once."""
    event_days = np.arange(rng.integers(every_days), n_days, every_days)
    days = np.repeat(event_days, rng.poisson(per_event * n_entities, len(event_days)))
    days = days[:n_entities]
    start = np.full(n_entities, -1, dtype=np.int64)
    start[rng.choice(n_entities, size=len(days), replace=False)] = days
    return start


def _in_window(start: np.ndarray, day: np.ndarray, length_days: int) -> np.ndarray:
    return (start >= 0) & (day >= start) & (day < start + length_days)


def _compromise_cards(rng: np.random.Generator, tx: _Tx, cfg: SimulationConfig) -> None:
    start = _compromise_starts(rng, cfg.n_customers, cfg.n_days, _CARD_EVERY_DAYS, _CARDS_PER_EVENT)
    window = _in_window(start[tx.customer], tx.day, _CARD_DAYS)
    hit = np.flatnonzero(window & (rng.random(len(tx.day)) < _CARD_FRAUD_SHARE))
    tx.amount[hit] = _cents(tx.amount[hit] * _CARD_FRAUD_FACTOR)
    tx.scenario[hit] = np.maximum(tx.scenario[hit], _CARD)


def _compromise_terminals(rng: np.random.Generator, tx: _Tx, cfg: SimulationConfig) -> None:
    start = _compromise_starts(
        rng, cfg.n_terminals, cfg.n_days, _TERMINAL_EVERY_DAYS, _TERMINALS_PER_EVENT
    )
    hit = np.flatnonzero(_in_window(start[tx.terminal], tx.day, _TERMINAL_DAYS))
    tx.scenario[hit] = np.maximum(tx.scenario[hit], _TERMINAL)


def _flag_large_amounts(tx: _Tx) -> None:
    hit = np.flatnonzero(tx.amount > LARGE_AMOUNT_THRESHOLD)
    tx.scenario[hit] = np.maximum(tx.scenario[hit], _LARGE)


def _card_testing(rng: np.random.Generator, cfg: SimulationConfig, customers: _Customers) -> _Tx:
    """Extra rows: per victim, small probes then large follow-ups, all on one day."""
    expected = _TESTING_EVENTS_PER_CUSTOMER_DAY * cfg.n_customers * cfg.n_days
    n_events = min(int(rng.poisson(expected)), cfg.n_customers)
    victim = rng.choice(cfg.n_customers, size=n_events, replace=False)  # (E,)
    n_small = rng.integers(_TESTING_SMALL[0], _TESTING_SMALL[1] + 1, n_events)  # (E,)
    n_large = rng.integers(_TESTING_LARGE[0], _TESTING_LARGE[1] + 1, n_events)  # (E,)
    event, pos = _segments(n_small + n_large)  # (N,), (N,)
    small = pos < n_small[event]
    offset = _segment_cumsum(_testing_gaps(rng, pos, n_small[event]), event)
    last = np.cumsum(n_small + n_large) - 1  # (E,) each event's final row
    begin = rng.uniform(0.0, _DAY_SECONDS - offset[last] - 1.0)  # whole burst within the day
    mean = customers.mean_amount[victim[event]]
    factor = rng.uniform(*_TESTING_LARGE_FACTOR, len(pos))
    return _Tx(
        day=rng.integers(cfg.n_days, size=n_events)[event],
        second=(begin[event] + offset).astype(np.int64),
        customer=victim[event],
        terminal=_testing_terminals(rng, cfg.n_terminals, event, small),
        amount=np.where(
            small, np.round(rng.uniform(0.5, 4.99, len(pos)), 2), _cents(mean * factor)
        ),
        scenario=np.full(len(pos), _TESTING, dtype=np.int8),
    )


def _testing_gaps(rng: np.random.Generator, pos: np.ndarray, n_small: np.ndarray) -> np.ndarray:
    """Seconds since the previous row of the event: probes 5 s to 3 min apart, the first
    follow-up 30 min to 4 h after the last probe, later follow-ups 2 to 60 min apart."""
    probe = rng.uniform(5.0, 180.0, len(pos))
    cash_out = rng.uniform(1_800.0, 14_400.0, len(pos))
    later = rng.uniform(120.0, 3_600.0, len(pos))
    gap = np.where(pos < n_small, probe, np.where(pos == n_small, cash_out, later))
    return np.where(pos == 0, 0.0, gap)


def _testing_terminals(
    rng: np.random.Generator, n_terminals: int, event: np.ndarray, small: np.ndarray
) -> np.ndarray:
    """Probes at 1-3 terminals per event, follow-ups at any terminal (home is irrelevant)."""
    n_events = int(event.max()) + 1 if len(event) else 0
    pool = rng.integers(n_terminals, size=(n_events, _TESTING_TERMINALS))  # (E, 3)
    used = rng.integers(1, _TESTING_TERMINALS + 1, n_events)  # (E,)
    column = (rng.random(len(event)) * used[event]).astype(np.int64)
    anywhere = rng.integers(n_terminals, size=len(event))
    return np.where(small, pool[event, column], anywhere)


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For back-to-back segments of these lengths: each row's segment and position in it."""
    segment = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths
    return segment, np.arange(len(segment)) - first[segment]


def _segment_cumsum(values: np.ndarray, segment: np.ndarray) -> np.ndarray:
    total = np.cumsum(values)
    before = np.concatenate([[0.0], total])[np.searchsorted(segment, segment)]
    return total - before


# --- assembly ------------------------------------------------------------------------------


def _concat(a: _Tx, b: _Tx) -> _Tx:
    fields = ("day", "second", "customer", "terminal", "amount", "scenario")
    return _Tx(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in fields))


def _to_frame(tx: _Tx, cfg: SimulationConfig) -> pl.DataFrame:
    epoch = int(datetime.combine(cfg.start_date, time(), tzinfo=UTC).timestamp())
    seconds = epoch + tx.day * _DAY_SECONDS + tx.second
    # Stable sort: equal timestamps keep generation order, itself fixed by the config.
    order = np.argsort(seconds, kind="stable")
    labels = pl.Series(FRAUD_SCENARIO, ["", *SCENARIOS], dtype=pl.String)
    return pl.DataFrame(
        {
            TRANSACTION_ID: np.arange(len(order), dtype=np.int64),
            TIMESTAMP: pl.Series(seconds[order] * 1_000_000).cast(pl.Datetime("us", "UTC")),
            CUSTOMER_ID: tx.customer[order].astype(np.int64),
            TERMINAL_ID: tx.terminal[order].astype(np.int64),
            AMOUNT: tx.amount[order].astype(np.float64),
            IS_FRAUD: (tx.scenario[order] > 0).astype(np.int8),
            FRAUD_SCENARIO: labels.gather(tx.scenario[order].astype(np.int64)),
        }
    )
