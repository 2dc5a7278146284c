"""Each transaction's card history: where the card's previous events sit, point in time.

Rows come in arrival order: timestamp order, input order within equal timestamps, the order
of a feature table and the tie rule of the batch engine (``fraudflow.features.batch``). Row
i's history is the card's last ``length`` events up to and including i itself, the current one
last, padded on the left with -1. Only earlier rows are ever named, so a later event cannot
change an earlier row's history; the events' features are their own point-in-time ones,
label-delayed by the spec.

Gaps, per history slot: log1p of the seconds from the event to the current one, and log1p of
the seconds since the card's event before it (0 for a card's first event, and where padded).

Shape: cards (M,), seconds (M,) -> history (M, T) int64, gaps (M, T, 2) float32.
"""

from __future__ import annotations

import numpy as np

from fraudflow.errors import DataError

__all__ = ["PADDING", "card_histories", "history_gaps"]

PADDING = -1


def card_histories(
    cards: np.ndarray, seconds: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """The history and gaps of every row (see the module docstring)."""
    seconds = np.asarray(seconds, dtype=np.float64)
    if seconds.size and np.any(np.diff(seconds) < 0):
        first = int(np.flatnonzero(np.diff(seconds) < 0)[0]) + 1
        raise DataError(
            f"card histories need rows in time order, however row {first} is earlier than the "
            "row before it"
        )
    m = len(cards)
    # Stable: within a card, sorted positions keep arrival order.
    order = np.argsort(np.asarray(cards), kind="stable")
    sorted_cards = np.asarray(cards)[order]
    starts = np.r_[True, sorted_cards[1:] != sorted_cards[:-1]] if m else np.zeros(0, bool)
    first_of_card = np.maximum.accumulate(np.where(starts, np.arange(m), 0)) if m else starts
    rank = np.arange(m) - first_of_card  # earlier events of the same card
    previous = np.full(m, PADDING, dtype=np.int64)
    previous[order[rank > 0]] = order[np.flatnonzero(rank > 0) - 1]
    history = np.full((m, length), PADDING, dtype=np.int64)
    for lag in range(length):
        has = rank >= lag
        history[order[has], length - 1 - lag] = order[np.flatnonzero(has) - lag]
    return history, history_gaps(history, previous, seconds)


def history_gaps(history: np.ndarray, previous: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """The gaps (M, T, 2) of histories (M, T), each ending with its current event, over a
    table of events: ``previous`` (N,) each event's card's event before it (PADDING: none),
    ``seconds`` (N,) their times. The one formula of the batch inputs and the service's
    (``fraudflow.serve.sequence_scoring``)."""
    valid = history != PADDING
    events = np.where(valid, history, 0)  # (M, T)
    # The current event sits last in its history (the table's own row, in batch).
    to_current = np.log1p(np.maximum(seconds[history[:, -1:]] - seconds[events], 0.0))  # (M, T)
    # An event's gap since the card's event before it is the event's own: computed once per
    # row and gathered, rather than looked up again in every history that holds the event.
    has_previous = previous != PADDING
    own = np.where(has_previous, seconds - seconds[np.where(has_previous, previous, 0)], 0.0)
    since_previous = np.log1p(np.maximum(own, 0.0))[events]  # (M, T)
    gaps = np.stack([to_current, since_previous], axis=-1)  # (M, T, 2)
    return np.where(valid[..., None], gaps, 0.0).astype(np.float32)
