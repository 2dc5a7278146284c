"""Card histories: known answers, padding, and the point-in-time trap."""

import numpy as np
import pytest

from fraudflow.errors import DataError
from fraudflow.features.sequences import PADDING, card_histories

CARDS = np.array([1, 2, 1, 1, 2])
SECONDS = np.array([0.0, 1.0, 2.0, 5.0, 9.0])


def test_each_row_gets_its_cards_last_events_ending_with_itself() -> None:
    history, gaps = card_histories(CARDS, SECONDS, 3)
    assert history.tolist() == [
        [-1, -1, 0],  # a card's first transaction: itself, padded on the left
        [-1, -1, 1],
        [-1, 0, 2],
        [0, 2, 3],
        [-1, 1, 4],
    ]
    # Seconds to the current event, then since the card's previous event.
    seconds = np.expm1(gaps.astype(np.float64))
    np.testing.assert_allclose(seconds[3], [[5, 0], [3, 2], [0, 3]], rtol=1e-6)
    np.testing.assert_allclose(seconds[4], [[0, 0], [8, 0], [0, 8]], rtol=1e-6)
    assert (gaps[history == PADDING] == 0).all()


def test_a_longer_history_keeps_only_the_last_events() -> None:
    cards = np.zeros(6, dtype=np.int64)
    history, _ = card_histories(cards, np.arange(6.0), 2)
    assert history.tolist() == [[-1, 0], [0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]


def test_equal_timestamps_keep_arrival_order() -> None:
    history, _ = card_histories(np.array([7, 7, 7]), np.array([3.0, 3.0, 3.0]), 3)
    assert history.tolist() == [[-1, -1, 0], [-1, 0, 1], [0, 1, 2]]


def test_a_later_event_changes_no_earlier_rows_history() -> None:
    rng = np.random.default_rng(0)
    cards = rng.integers(0, 20, size=400)
    seconds = np.sort(rng.uniform(0, 1e6, size=400))
    history, gaps = card_histories(cards, seconds, 8)
    later = cards.copy()
    later[300:] = rng.integers(0, 20, size=100)  # other cards, and more rows after them
    later_seconds = seconds.copy()
    later_seconds[300:] += 50.0
    h2, g2 = card_histories(np.r_[later, [3, 4]], np.r_[later_seconds, [2e6, 2e6]], 8)
    np.testing.assert_array_equal(h2[:300], history[:300])
    np.testing.assert_array_equal(g2[:300], gaps[:300])
    assert (history[np.arange(400), -1] == np.arange(400)).all()
    assert (history < np.arange(400)[:, None] + 1).all()  # never a later row


def test_rows_out_of_time_order_are_refused() -> None:
    with pytest.raises(DataError, match="row 2 is earlier than the row before it"):
        card_histories(np.array([1, 1, 1]), np.array([0.0, 5.0, 4.0]), 2)
