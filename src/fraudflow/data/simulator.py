"""A seeded, vectorised simulator of labelled payment transactions: fraudflow's default data.

The generative model follows the "transaction data simulator" of Le Borgne et al.,
*Reproducible Machine Learning for Credit Card Fraud Detection - Practical Handbook*
(Université Libre de Bruxelles, 2022), chapter 3, extended with a weekly rhythm, a
card-testing scenario and three scenarios whose signal lies in the structure of the data
(a card's sequence of events, the card-terminal graph) rather than in one row:

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
    common_point_of_compromise
                          a skimmed terminal leaks every card that pays there legitimately
                          during its window (``cpp_window_days``); 1-10 days after the window
                          closes each stolen card makes 2-5 extra payments within two days at
                          random other terminals, 1-4x its usual amount. The skimmed terminal's
                          own rows stay legitimate: the link is the cards' shared history.
    account_takeover      a card with at least 5 legitimate payments behind it changes
                          abruptly: extra rows at terminals at least 30 away from home, 9-15 h
                          away from its usual time of day, first a burst of 3-6 ordinary
                          amounts 1-10 minutes apart, then on the following days 1-3 payments
                          of 5-10x its usual amount at the same hours
    fraud_ring            4-8 cards and 2-4 colluding terminals, each in one ring only; for 21
                          days the ring's cards pay at the ring's terminals (extra rows, about
                          every other day per card, at the card's usual hours, 1-3x its amount)

Event counts scale with the number of terminals or customers, so the fraud rate (about
0.7%; 0.5% from the first four) does not depend on the size of the config. The rates of the
last three are ``SimulationConfig`` fields (0 turns a scenario off). They only add rows,
after the first four have labelled theirs, so turning them off gives the rows of the first
four unchanged. When several scenarios apply to a row it carries the last one in
``SCENARIOS`` order (the most specific); ``is_fraud`` is 1 when any applies.

``fraud_scenario`` names the scenario of every fraud row and is "" (never null) for every
legitimate row: a string column with no nulls, so filters and group-bys need no null case. It
is label detail, for evaluation only (``fraudflow.eval``), never a feature.

``simulate_with_truth`` also returns how the structural scenarios were made (skimmed terminals
and their windows, takeovers, ring members, locations): ground truth for tests and analysis.

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
    FRAUD_SCENARIO,
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
    "SimulationTruth",
    "simulate",
    "simulate_with_truth",
]

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
    "common_point_of_compromise",
    "account_takeover",
    "fraud_ring",
)
_LARGE, _TERMINAL, _CARD, _TESTING, _CPP, _ATO, _RING = (
    np.int8(k) for k in range(1, len(SCENARIOS) + 1)
)

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

# Common point of compromise: stolen cards are used this many days after the window closes,
# this many times, spread over this many seconds, at this amount / the card's mean amount.
_CPP_DELAY_DAYS, _CPP_USES, _CPP_SPREAD_SECONDS = (1, 10), (2, 5), 2 * _DAY_SECONDS
_CPP_AMOUNT_FACTOR = (1.0, 4.0)
# Account takeover: only a card with this many legitimate payments before the takeover day.
_ATO_MIN_HISTORY = 5
_ATO_MIN_DISTANCE = 30.0  # six legitimate radii: a terminal the card never uses
_ATO_CANDIDATES = 16  # random terminals tried per row to find one that far
_ATO_HOUR_SHIFT_SECONDS = (9 * 3600, 15 * 3600)  # from the card's preferred time of day
_ATO_BURST, _ATO_BURST_GAP_SECONDS, _ATO_BURST_FACTOR = (3, 6), (60, 600), (0.5, 1.5)
_ATO_LARGE, _ATO_LARGE_FACTOR, _ATO_JITTER_SECONDS = (1, 3), (5.0, 10.0), 1_800
# Fraud ring: members, colluding terminals, active days, payments per card per active day.
_RING_CARDS, _RING_TERMINALS, _RING_DAYS, _RING_TX_PER_CARD_DAY = (4, 8), (2, 4), 21, 0.5
_RING_AMOUNT_FACTOR = (1.0, 3.0)

_N_STAGES = 8


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


@dataclass(frozen=True)
class _Skimmed:
    """Skimmed terminals: each leaks the cards paying there in days [start, end)."""

    terminal: np.ndarray  # (E,)
    start: np.ndarray  # (E,) days since start_date
    end: np.ndarray  # (E,)


@dataclass(frozen=True)
class _Takeovers:
    card: np.ndarray  # (E,)
    second: np.ndarray  # (E,) seconds since start_date of the takeover's first fraud


@dataclass(frozen=True)
class _Rings:
    card: np.ndarray  # (M,) ring members
    card_ring: np.ndarray  # (M,) their ring
    terminal: np.ndarray  # (K,) colluding terminals
    terminal_ring: np.ndarray  # (K,) their ring


@dataclass(frozen=True)
class SimulationTruth:
    """How the structural scenarios were made: for tests and analysis, never a model input.

    Frames (times are UTC datetimes like ``timestamp``):
        skimmed         terminal_id, window_start, window_end: the terminal leaked every card
                        that paid there legitimately in [window_start, window_end)
        takeovers       customer_id, takeover: the time of the takeover's first fraud
        ring_cards      ring, customer_id
        ring_terminals  ring, terminal_id
        customers       customer_id, x, y, preferred_hour (home and usual time of day)
        terminals       terminal_id, x, y
    """

    skimmed: pl.DataFrame
    takeovers: pl.DataFrame
    ring_cards: pl.DataFrame
    ring_terminals: pl.DataFrame
    customers: pl.DataFrame
    terminals: pl.DataFrame


def simulate(
    cfg: SimulationConfig, *, progress: Callable[[int, int], None] | None = None
) -> pl.DataFrame:
    """Simulate ``cfg.n_days`` days of labelled transactions, sorted by timestamp.

    ``progress(done, total)``, when given, is called after each of the ``total`` stages.
    """
    return simulate_with_truth(cfg, progress=progress)[0]


def simulate_with_truth(
    cfg: SimulationConfig, *, progress: Callable[[int, int], None] | None = None
) -> tuple[pl.DataFrame, SimulationTruth]:
    """``simulate``, and how its structural scenarios were made."""
    # One stream per random stage. Spawned children are numbered, so the first six streams
    # (the first four scenarios) are the same however many stages follow them.
    rngs = np.random.default_rng(cfg.seed).spawn(9)
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
    # Last, so that their history is the final legitimate rows; they only add rows.
    cpp, skimmed = _common_point_of_compromise(rngs[6], cfg, customers, tx)
    ato, takeovers = _account_takeover(rngs[7], cfg, customers, terminals, tx)
    ring, rings = _fraud_rings(rngs[8], cfg, customers)
    tx = _concat(_concat(_concat(tx, cpp), ato), ring)
    step()
    frame = _to_frame(tx, cfg)
    step()
    return frame, _truth(cfg, customers, terminals, skimmed, takeovers, rings)


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


# --- structural scenarios ------------------------------------------------------------------


def _n_events(rng: np.random.Generator, expected: float, cap: int) -> int:
    return min(int(rng.poisson(expected)), cap)


def _common_point_of_compromise(
    rng: np.random.Generator, cfg: SimulationConfig, customers: _Customers, tx: _Tx
) -> tuple[_Tx, _Skimmed]:
    """Extra rows: the cards leaked by skimmed terminals, used days later at other terminals."""
    expected = cfg.cpp_rate_per_terminal_day * cfg.n_terminals * cfg.n_days
    # With one terminal there is no other terminal to use a stolen card at.
    n_events = _n_events(rng, expected, cfg.n_terminals if cfg.n_terminals > 1 else 0)
    terminal = rng.choice(cfg.n_terminals, size=n_events, replace=False)  # (E,)
    start = rng.integers(cfg.n_days, size=n_events)  # (E,)
    skimmed = _Skimmed(terminal=terminal, start=start, end=start + cfg.cpp_window_days)
    card, event = _leaked_cards(tx, skimmed, cfg.n_terminals)  # (L,), (L,)
    delay = rng.integers(_CPP_DELAY_DAYS[0], _CPP_DELAY_DAYS[1] + 1, len(card))
    uses = rng.integers(_CPP_USES[0], _CPP_USES[1] + 1, len(card))
    stolen, _ = _segments(uses)  # (R,) index into card
    first = (skimmed.end[event] + delay) * _DAY_SECONDS  # (L,)
    seconds = first[stolen] + rng.integers(_CPP_SPREAD_SECONDS, size=len(stolen))
    # Anywhere but the skimmed terminal: an offset of 1 .. T-1 from it.
    other = rng.integers(1, max(cfg.n_terminals, 2), size=len(stolen))
    where = (skimmed.terminal[event[stolen]] + other) % cfg.n_terminals
    factor = rng.uniform(*_CPP_AMOUNT_FACTOR, len(stolen))
    amount = _cents(customers.mean_amount[card[stolen]] * factor)
    rows = _rows(seconds, card[stolen], where, amount, _CPP)
    return _keep(rows, rows.day < cfg.n_days), skimmed


def _leaked_cards(tx: _Tx, skimmed: _Skimmed, n_terminals: int) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct (card, event) where the card paid legitimately at the event's skimmed
    terminal during its window, sorted by event then card: (L,) cards and (L,) events."""
    event_of = np.full(n_terminals, -1, dtype=np.int64)
    event_of[skimmed.terminal] = np.arange(len(skimmed.terminal))
    event = event_of[tx.terminal]  # (N,)
    hit = np.flatnonzero((event >= 0) & (tx.scenario == 0))
    e, day = event[hit], tx.day[hit]
    hit = hit[(day >= skimmed.start[e]) & (day < skimmed.end[e])]
    pairs = np.unique(np.stack([event[hit], tx.customer[hit]]), axis=1)  # (2, L)
    return pairs[1], pairs[0]


def _account_takeover(
    rng: np.random.Generator,
    cfg: SimulationConfig,
    customers: _Customers,
    terminals: _Terminals,
    tx: _Tx,
) -> tuple[_Tx, _Takeovers]:
    """Extra rows: per taken-over card, a burst far from home at new hours, then large ones."""
    expected = cfg.ato_rate_per_card_day * cfg.n_customers * cfg.n_days
    n_events = _n_events(rng, expected, cfg.n_customers)
    card = rng.choice(cfg.n_customers, size=n_events, replace=False)  # (E,)
    day = rng.integers(cfg.n_days, size=n_events)  # (E,)
    history = _legit_rows_before(tx, card, day, cfg.n_days) >= _ATO_MIN_HISTORY
    card, day = card[history], day[history]
    shift = rng.uniform(*_ATO_HOUR_SHIFT_SECONDS, len(card))
    start = day * _DAY_SECONDS + (customers.centre_second[card] + shift).astype(np.int64)
    n_burst = rng.integers(_ATO_BURST[0], _ATO_BURST[1] + 1, len(card))  # (E,)
    n_large = rng.integers(_ATO_LARGE[0], _ATO_LARGE[1] + 1, len(card))  # (E,)
    event, pos = _segments(n_burst + n_large)  # (R,), (R,)
    burst = pos < n_burst[event]
    offset = np.where(burst, _ato_burst_offsets(rng, pos, burst, event), 0)
    # Large ones on the following days at the burst's hours, give or take half an hour.
    jitter = rng.integers(-_ATO_JITTER_SECONDS, _ATO_JITTER_SECONDS + 1, len(pos))
    offset = np.where(burst, offset, (pos - n_burst[event] + 1) * _DAY_SECONDS + jitter)
    factor = np.where(
        burst,
        rng.uniform(*_ATO_BURST_FACTOR, len(pos)),
        rng.uniform(*_ATO_LARGE_FACTOR, len(pos)),
    )
    where, found = _far_terminals(rng, customers, terminals, card[event])
    amount = _cents(customers.mean_amount[card[event]] * factor)
    rows = _rows(start[event] + offset, card[event], where, amount, _ATO)
    return _keep(rows, found & (rows.day < cfg.n_days)), _Takeovers(card=card, second=start)


def _legit_rows_before(tx: _Tx, card: np.ndarray, day: np.ndarray, n_days: int) -> np.ndarray:
    """(E,) legitimate rows of each card on days before its ``day``."""
    legit = tx.scenario == 0
    keys = np.sort(tx.customer[legit] * n_days + tx.day[legit])  # card-major, then day
    return np.searchsorted(keys, card * n_days + day) - np.searchsorted(keys, card * n_days)


def _ato_burst_offsets(
    rng: np.random.Generator, pos: np.ndarray, burst: np.ndarray, event: np.ndarray
) -> np.ndarray:
    """Seconds since the takeover of each burst row: 1 to 10 minutes between rows."""
    gap = rng.integers(_ATO_BURST_GAP_SECONDS[0], _ATO_BURST_GAP_SECONDS[1] + 1, len(pos))
    gap = np.where(burst & (pos > 0), gap, 0)
    return _segment_cumsum(gap.astype(np.float64), event).astype(np.int64)


def _far_terminals(
    rng: np.random.Generator, customers: _Customers, terminals: _Terminals, card: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(R,) a random terminal at least ``_ATO_MIN_DISTANCE`` from each card's home, and (R,)
    whether one was found among ``_ATO_CANDIDATES`` tries (a small world may have none)."""
    candidate = rng.integers(len(terminals.x), size=(len(card), _ATO_CANDIDATES))  # (R, K)
    dx = terminals.x[candidate] - customers.x[card, None]  # (R, K)
    dy = terminals.y[candidate] - customers.y[card, None]  # (R, K)
    far = dx * dx + dy * dy >= _ATO_MIN_DISTANCE**2  # (R, K)
    first = far.argmax(axis=1)  # (R,) the first far candidate, or 0 when none is
    return candidate[np.arange(len(card)), first], far.any(axis=1)


def _fraud_rings(
    rng: np.random.Generator, cfg: SimulationConfig, customers: _Customers
) -> tuple[_Tx, _Rings]:
    """Extra rows: ring cards paying repeatedly at their ring's colluding terminals."""
    n_rings = int(rng.poisson(cfg.ring_rate_per_card_day * cfg.n_customers * cfg.n_days))
    n_cards = rng.integers(_RING_CARDS[0], _RING_CARDS[1] + 1, n_rings)  # (G,)
    n_terminals = rng.integers(_RING_TERMINALS[0], _RING_TERMINALS[1] + 1, n_rings)  # (G,)
    # Each card and terminal is in one ring at most: as many rings as the world can hold.
    fits = (np.cumsum(n_cards) <= cfg.n_customers) & (np.cumsum(n_terminals) <= cfg.n_terminals)
    n_rings = int(np.count_nonzero(fits))  # cumulative sums grow, so the fits are a prefix
    n_cards, n_terminals = n_cards[:n_rings], n_terminals[:n_rings]
    rings = _Rings(
        card=rng.choice(cfg.n_customers, size=int(n_cards.sum()), replace=False),
        card_ring=np.repeat(np.arange(n_rings), n_cards),
        terminal=rng.choice(cfg.n_terminals, size=int(n_terminals.sum()), replace=False),
        terminal_ring=np.repeat(np.arange(n_rings), n_terminals),
    )
    start = rng.integers(cfg.n_days, size=n_rings)  # (G,)
    per_card = rng.poisson(_RING_TX_PER_CARD_DAY * _RING_DAYS, len(rings.card))  # (M,)
    member, _ = _segments(per_card)  # (R,) index into rings.card
    ring = rings.card_ring[member]
    card = rings.card[member]
    day = start[ring] + rng.integers(_RING_DAYS, size=len(member))
    second = _time_of_day(rng, customers.centre_second[card])
    first_terminal = np.cumsum(n_terminals) - n_terminals  # (G,)
    pick = (rng.random(len(member)) * n_terminals[ring]).astype(np.int64)
    where = rings.terminal[first_terminal[ring] + pick]
    factor = rng.uniform(*_RING_AMOUNT_FACTOR, len(member))
    amount = _cents(customers.mean_amount[card] * factor)
    rows = _rows(day * _DAY_SECONDS + second, card, where, amount, _RING)
    return _keep(rows, rows.day < cfg.n_days), rings


def _rows(
    seconds: np.ndarray,
    customer: np.ndarray,
    terminal: np.ndarray,
    amount: np.ndarray,
    code: np.int8,
) -> _Tx:
    """Fraud rows of one scenario from seconds since start_date."""
    day, second = np.divmod(seconds.astype(np.int64), _DAY_SECONDS)
    return _Tx(
        day=day,
        second=second,
        customer=customer.astype(np.int64),
        terminal=terminal.astype(np.int64),
        amount=amount,
        scenario=np.full(len(day), code, dtype=np.int8),
    )


def _keep(tx: _Tx, mask: np.ndarray) -> _Tx:
    return _Tx(*(getattr(tx, f)[mask] for f in _TX_FIELDS))


# --- assembly ------------------------------------------------------------------------------


_TX_FIELDS = ("day", "second", "customer", "terminal", "amount", "scenario")


def _concat(a: _Tx, b: _Tx) -> _Tx:
    return _Tx(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in _TX_FIELDS))


def _epoch_seconds(cfg: SimulationConfig) -> int:
    return int(datetime.combine(cfg.start_date, time(), tzinfo=UTC).timestamp())


def _datetimes(seconds: np.ndarray) -> pl.Series:
    return pl.Series(seconds.astype(np.int64) * 1_000_000).cast(pl.Datetime("us", "UTC"))


def _to_frame(tx: _Tx, cfg: SimulationConfig) -> pl.DataFrame:
    seconds = _epoch_seconds(cfg) + tx.day * _DAY_SECONDS + tx.second
    # Stable sort: equal timestamps keep generation order, itself fixed by the config.
    order = np.argsort(seconds, kind="stable")
    labels = pl.Series(FRAUD_SCENARIO, ["", *SCENARIOS], dtype=pl.String)
    return pl.DataFrame(
        {
            TRANSACTION_ID: np.arange(len(order), dtype=np.int64),
            TIMESTAMP: _datetimes(seconds[order]),
            CUSTOMER_ID: tx.customer[order].astype(np.int64),
            TERMINAL_ID: tx.terminal[order].astype(np.int64),
            AMOUNT: tx.amount[order].astype(np.float64),
            IS_FRAUD: (tx.scenario[order] > 0).astype(np.int8),
            FRAUD_SCENARIO: labels.gather(tx.scenario[order].astype(np.int64)),
        }
    )


def _truth(
    cfg: SimulationConfig,
    customers: _Customers,
    terminals: _Terminals,
    skimmed: _Skimmed,
    takeovers: _Takeovers,
    rings: _Rings,
) -> SimulationTruth:
    epoch = _epoch_seconds(cfg)
    return SimulationTruth(
        skimmed=pl.DataFrame(
            {
                TERMINAL_ID: skimmed.terminal.astype(np.int64),
                "window_start": _datetimes(epoch + skimmed.start * _DAY_SECONDS),
                "window_end": _datetimes(epoch + skimmed.end * _DAY_SECONDS),
            }
        ),
        takeovers=pl.DataFrame(
            {
                CUSTOMER_ID: takeovers.card.astype(np.int64),
                "takeover": _datetimes(epoch + takeovers.second),
            }
        ),
        ring_cards=pl.DataFrame({"ring": rings.card_ring, CUSTOMER_ID: rings.card}).cast(pl.Int64),
        ring_terminals=pl.DataFrame(
            {"ring": rings.terminal_ring, TERMINAL_ID: rings.terminal}
        ).cast(pl.Int64),
        customers=pl.DataFrame(
            {
                CUSTOMER_ID: np.arange(cfg.n_customers, dtype=np.int64),
                "x": customers.x,
                "y": customers.y,
                "preferred_hour": customers.centre_second / 3600.0,
            }
        ),
        terminals=pl.DataFrame(
            {
                TERMINAL_ID: np.arange(cfg.n_terminals, dtype=np.int64),
                "x": terminals.x,
                "y": terminals.y,
            }
        ),
    )
