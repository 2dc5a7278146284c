"""The GNN's temporal neighbour sampling: known neighbourhoods, bounds, no look-ahead."""

import numpy as np
import pytest

from fraudflow.errors import ConfigError
from fraudflow.features.graph import Fanout, TransactionGraph, slot_gaps

DAY_US = 86_400 * 1_000_000

# A hand-built graph, in (timestamp, arrival) order; rows 2 and 3 share a timestamp.
#   row: 0  1  2  3  4  5
CARDS = np.array(["A", "B", "A", "C", "A", "B"])
TERMINALS = np.array(["X", "X", "Y", "Y", "X", "Y"])
TIMES = np.array([0, 1, 2, 2, 3, 4], dtype=np.int64) * DAY_US


def _graph() -> TransactionGraph:
    return TransactionGraph(CARDS, TERMINALS, TIMES)


def test_known_neighbourhood_most_recent_first() -> None:
    n = _graph().sample(np.array([4]), Fanout(hop1=2, hop2=2))
    # Card A before row 4: rows 2 (terminal Y) and 0 (terminal X).
    assert n.card_hop1.tolist() == [[2, 0]]
    # Terminal Y before row 4: rows 3, 2; terminal X: rows 1, 0.
    assert n.card_hop2.tolist() == [[[3, 2], [1, 0]]]
    # Terminal X before row 4: rows 1 (card B) and 0 (card A).
    assert n.terminal_hop1.tolist() == [[1, 0]]
    # Card B before row 4: row 1 only; card A: rows 2, 0.
    assert n.terminal_hop2.tolist() == [[[1, -1], [2, 0]]]


def test_equal_timestamps_follow_arrival_order() -> None:
    n = _graph().sample(np.array([2, 3]), Fanout(hop1=2, hop2=2))
    # Row 2 does not see row 3 (same time, arrived later); row 3 sees row 2.
    assert n.terminal_hop1.tolist() == [[-1, -1], [2, -1]]
    assert n.terminal_hop2[1].tolist() == [[2, 0], [-1, -1]]
    # Card C has no earlier transaction: every card slot of row 3 is empty.
    assert n.card_hop1[1].tolist() == [-1, -1]
    assert (n.card_hop2[1] == -1).all()


def test_a_row_never_sees_itself_or_later_rows() -> None:
    rng = np.random.default_rng(0)
    cards, terminals, times = _random_table(rng, 400)
    graph = TransactionGraph(cards, terminals, times)
    positions = np.arange(len(graph))
    n = graph.sample(positions, Fanout(hop1=4, hop2=3))
    assert n.card_hop1.shape == (400, 4) and n.card_hop2.shape == (400, 4, 3)
    assert n.terminal_hop1.shape == (400, 4) and n.terminal_hop2.shape == (400, 4, 3)
    for part in n.parts().values():
        before = positions.reshape((-1,) + (1,) * (part.ndim - 1))
        assert (part < before).all()
    # Hop-1 edges belong to the row's own card and terminal, most recent first.
    filled = n.card_hop1 >= 0
    assert (cards[n.card_hop1][filled] == np.repeat(cards, 4).reshape(400, 4)[filled]).all()
    assert (np.diff(np.where(filled, n.card_hop1, -1), axis=1) <= 0).all()
    # Each card's hop-1 count is min(k, its earlier transactions).
    earlier = np.array([(cards[:i] == cards[i]).sum() for i in range(400)])
    assert (filled.sum(axis=1) == np.minimum(earlier, 4)).all()


def test_leakage_trap_later_rows_change_nothing_earlier() -> None:
    """Appending later transactions leaves every earlier row's neighbourhood and gaps
    unchanged (the edges' features are looked up by these positions, all earlier rows)."""
    rng = np.random.default_rng(1)
    cards, terminals, times = _random_table(rng, 300)
    fanout = Fanout(hop1=3, hop2=2)
    head = TransactionGraph(cards[:200], terminals[:200], times[:200])
    full = TransactionGraph(cards, terminals, times)
    early = np.arange(200)
    a, b = head.sample(early, fanout), full.sample(early, fanout)
    for name, part in a.parts().items():
        np.testing.assert_array_equal(part, b.parts()[name])
        np.testing.assert_array_equal(
            slot_gaps(part, times[:200], times[:200]),
            slot_gaps(b.parts()[name], times, times[:200]),
        )


def test_sampling_is_deterministic_and_independent_of_id_names() -> None:
    rng = np.random.default_rng(2)
    cards, terminals, times = _random_table(rng, 300)
    fanout = Fanout(hop1=3, hop2=3)
    positions = np.arange(300)
    first = TransactionGraph(cards, terminals, times).sample(positions, fanout)
    again = TransactionGraph(cards, terminals, times).sample(positions, fanout)
    # Other names for the same entities (reversing the order their codes take).
    renamed = TransactionGraph(
        np.array([f"z{999 - int(c[1:])}" for c in cards]), terminals * -1, times
    ).sample(positions, fanout)
    for name, part in first.parts().items():
        np.testing.assert_array_equal(part, again.parts()[name])
        np.testing.assert_array_equal(part, renamed.parts()[name])


def test_gaps_known_values() -> None:
    n = _graph().sample(np.array([4]), Fanout(hop1=2, hop2=2))
    gaps = slot_gaps(n.terminal_hop2, TIMES, TIMES[[4]])  # rows [[1, -1], [2, 0]] at day 3
    assert gaps.shape == (1, 2, 2) and gaps.dtype == np.float32
    np.testing.assert_allclose(gaps[0], [[np.log1p(2.0), 0.0], [np.log1p(1.0), np.log1p(3.0)]])


def test_rows_out_of_time_order_are_refused() -> None:
    with pytest.raises(ConfigError, match="row 2 is earlier than row 1"):
        TransactionGraph(CARDS[:3], TERMINALS[:3], np.array([0, 5, 4]))


def test_fanout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="fan-out hop2 must be >= 1, however got 0"):
        Fanout(hop1=2, hop2=0)


def _random_table(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    cards = np.array([f"c{i}" for i in rng.integers(0, 20, n)])
    terminals = rng.integers(0, 15, n)
    times = np.sort(rng.integers(0, 5, n)) * DAY_US  # many equal timestamps
    return cards, terminals, times
