"""Temporal neighbourhoods of the customer-terminal graph, for the GNN (NumPy, no torch).

Cards (``customer_id``) and terminals are the nodes; every transaction is an edge between its
card and its terminal. Rows are taken in the feature table's order, timestamp then arrival
(``fraudflow.features.batch``), so a row's position is its place in time. The graph a row at
position p sees holds the edges at positions < p: strictly earlier transactions, and those
with the same timestamp that arrived before it (the batch engine's tie rule). The row itself
and every later row are invisible.

Sampling keeps the most recent edges, with a bounded fan-out (``Fanout``):

* the card's last ``hop1`` transactions lead to ``hop1`` terminal slots, and each of those
  terminals' last ``hop2`` transactions (before p) to ``hop2`` card slots;
* symmetrically, the terminal's last ``hop1`` transactions lead to cards, and each card's
  last ``hop2`` transactions to terminals.

No random draws: "most recent first" fixes the sample (positions are distinct, so there are no
ties to break), and the same rows give the same neighbourhood on every run and every machine.

Labels: edges carry none. An edge's features are the spec features of its transaction, which
the feature layer computes at that transaction's time with fraud labels only after their delay
(``label_delay_days``); so nothing in a row's neighbourhood depends on a label that was not
yet known at the row's time.

Shape: Q query rows; ``<side>_hop1`` (Q, hop1) and ``<side>_hop2`` (Q, hop1, hop2) positions
of the sampled edges' rows, -1 marking an empty slot; ``slot_gaps`` gives each slot's
log(1 + days) before the query row, in the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fraudflow.errors import ConfigError

__all__ = [
    "GRAPH_INPUTS",
    "EntityEdges",
    "Fanout",
    "Neighbourhood",
    "TransactionGraph",
    "slot_gaps",
]

# The neighbourhood's parts, as the GNN's inputs are named (fraudflow.models.gnn).
GRAPH_INPUTS = ("card_hop1", "card_hop2", "terminal_hop1", "terminal_hop2")
_US_PER_DAY = 86_400 * 1_000_000


@dataclass(frozen=True)
class Fanout:
    """How many edges each hop keeps: the most recent ``hop1``, then ``hop2`` per neighbour."""

    hop1: int
    hop2: int

    def __post_init__(self) -> None:
        for name in ("hop1", "hop2"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"gnn fan-out {name} must be >= 1, however got {value!r}")


class EntityEdges:
    """One node type's edges in position order, answering "its last k edges before p".

    Rows are sorted by (entity code, position) into one int64 key, ``code * n + position``;
    the edges of ``code`` before ``p`` end where ``code * n + p`` would be inserted.
    """

    def __init__(self, codes: np.ndarray) -> None:
        n = codes.shape[0]
        self.n = max(n, 1)
        self.order = np.argsort(codes, kind="stable")  # (N,) by code, then position
        self.keys = codes[self.order].astype(np.int64) * self.n + self.order  # (N,) sorted

    def last_before(self, codes: np.ndarray, before: np.ndarray, k: int) -> np.ndarray:
        """(Q, k) positions of each code's last k edges at positions < before, most recent
        first; -1 where it has fewer."""
        base = codes.astype(np.int64) * self.n
        start = np.searchsorted(self.keys, base, side="left")  # (Q,)
        end = np.searchsorted(self.keys, base + before, side="left")  # (Q,)
        slots = end[:, None] - 1 - np.arange(k)  # (Q, k)
        filled = slots >= start[:, None]
        return np.where(filled, self.order[np.clip(slots, 0, None)], -1)


@dataclass(frozen=True)
class Neighbourhood:
    """Sampled edge positions of Q rows (see the module docstring); -1: an empty slot."""

    card_hop1: np.ndarray  # (Q, hop1): the card's transactions, each leading to a terminal
    card_hop2: np.ndarray  # (Q, hop1, hop2): those terminals' transactions, leading to cards
    terminal_hop1: np.ndarray  # (Q, hop1): the terminal's transactions, leading to cards
    terminal_hop2: np.ndarray  # (Q, hop1, hop2): those cards' transactions, leading to terminals

    def parts(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in GRAPH_INPUTS}


class TransactionGraph:
    """The transactions of a table as a temporal bipartite graph of cards and terminals.

    ``cards`` and ``terminals`` (N,) are ids of any type, ``times_us`` (N,) int64 epoch
    microseconds, all in the table's (timestamp, arrival) order.
    """

    def __init__(self, cards: np.ndarray, terminals: np.ndarray, times_us: np.ndarray) -> None:
        if not (cards.shape == terminals.shape == times_us.shape) or cards.ndim != 1:
            raise ConfigError(
                "cards, terminals and timestamps must be 1-D and of one length, however got "
                f"shapes {cards.shape}, {terminals.shape}, {times_us.shape}"
            )
        if times_us.size and np.any(np.diff(times_us) < 0):
            first = int(np.argmax(np.diff(times_us) < 0)) + 1
            raise ConfigError(
                "the graph's rows must be in timestamp order (the feature table's order), "
                f"however row {first} is earlier than row {first - 1}"
            )
        self.card = np.unique(cards, return_inverse=True)[1].reshape(-1)  # (N,) codes
        self.terminal = np.unique(terminals, return_inverse=True)[1].reshape(-1)  # (N,) codes
        self.times_us = times_us.astype(np.int64)
        self._card_edges = EntityEdges(self.card)
        self._terminal_edges = EntityEdges(self.terminal)

    def __len__(self) -> int:
        return int(self.times_us.shape[0])

    def sample(self, positions: np.ndarray, fanout: Fanout) -> Neighbourhood:
        """The neighbourhoods of the rows at ``positions`` (Q,), each seeing edges before it."""
        positions = np.asarray(positions, dtype=np.int64)
        card_hop1 = self._card_edges.last_before(self.card[positions], positions, fanout.hop1)
        terminal_hop1 = self._terminal_edges.last_before(
            self.terminal[positions], positions, fanout.hop1
        )
        return Neighbourhood(
            card_hop1=card_hop1,
            card_hop2=self._hop2(card_hop1, self.terminal, self._terminal_edges, positions, fanout),
            terminal_hop1=terminal_hop1,
            terminal_hop2=self._hop2(terminal_hop1, self.card, self._card_edges, positions, fanout),
        )

    @staticmethod
    def _hop2(
        hop1: np.ndarray,
        far_end: np.ndarray,
        edges: EntityEdges,
        positions: np.ndarray,
        fanout: Fanout,
    ) -> np.ndarray:
        """(Q, hop1, hop2): for each hop-1 edge, the last edges of its far end before the
        query row (not before the hop-1 edge: the graph as it stands at the row's time)."""
        q = hop1.shape[0]
        codes = far_end[np.clip(hop1, 0, None)].reshape(-1)  # (Q * hop1,)
        before = np.repeat(positions, fanout.hop1)  # (Q * hop1,)
        out = edges.last_before(codes, before, fanout.hop2).reshape(q, fanout.hop1, fanout.hop2)
        return np.where(hop1[:, :, None] >= 0, out, -1)


def slot_gaps(slots: np.ndarray, times_us: np.ndarray, at_us: np.ndarray) -> np.ndarray:
    """(Q, ...) float32 log(1 + days) from each sampled edge ``slots`` (Q, ...) to its query
    row, 0 in empty slots. ``times_us`` (N,): every row's time; ``at_us`` (Q,): the query
    rows' times."""
    filled = slots >= 0
    at = at_us.reshape((-1,) + (1,) * (slots.ndim - 1))
    gap_days = np.maximum(at - times_us[np.clip(slots, 0, None)], 0) / _US_PER_DAY
    return np.where(filled, np.log1p(gap_days), 0.0).astype(np.float32)
