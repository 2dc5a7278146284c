"""The sequence transformer served: each card's last events, kept online, as the model's input.

The batch input of a row (``fraudflow.features.sequences``) is the card's last ``length``
events up to and including the row, each event its own point-in-time feature row (the
spec's label delay applies there), with two gaps per event. Online, each decided event's
model-matrix row (float32, as training fed the model) is appended to its card's history
(``fraudflow.serve.history_state``) in the same order, and the history answers the events
before it: its window (``length - 1`` events) and the event before the window's oldest,
whose time the oldest's gap needs. From there the inputs are built by the batch's own code:
the gap formula (``history_gaps``), ``neural_inputs`` and ``sequence_arrays``
(``fraudflow.inputs``); only where the history's rows sit differs (stored per card here, a
table there).

Attribution: gradient x standardised input of the fraud log-odds, as for the MLP
(``fraudflow.serve.scoring.GradientAttribution``), taken at the current event's own numeric
features (its row among the events); the card's earlier events and the gaps are not
attributed, so a reason names what in this transaction moved its score, given its history.

Shape: Q decided events; ``Windows.events`` (P, F) the stored rows before them, query after
query, oldest first; the table of one scoring call is (P + Q, F); history (Q, T), gaps
(Q, T, 2) -> contributions (Q, F), probabilities (Q,).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fraudflow.artifacts import Bundle
from fraudflow.errors import ArtifactError
from fraudflow.features.online import Event
from fraudflow.features.sequences import PADDING, history_gaps
from fraudflow.inputs import sequence_arrays
from fraudflow.models import SequenceInputs, neural_inputs
from fraudflow.serve.history_state import HEAD_BYTES, HistoryStore, pack_head
from fraudflow.serve.state import tx_hash

__all__ = ["SequenceAttribution", "SequenceHistory", "Windows", "sequence_table"]

_TIME_OFFSET = np.uint64(2**63)


@dataclass(frozen=True)
class Windows:
    """The stored events before each of Q decided events (see the module docstring)."""

    events: np.ndarray  # (P, F) float32 model-matrix rows, query after query, oldest first
    times_us: np.ndarray  # (P,) int64
    counts: np.ndarray  # (Q,) int64: how many of the rows precede each query
    now_us: np.ndarray  # (Q,) int64: each query's own time

    @classmethod
    def empty(cls, now_us: np.ndarray, n_features: int) -> Windows:
        """No earlier events: each query is its card's first."""
        q = len(now_us)
        none = np.zeros((0, n_features), dtype=np.float32)
        return cls(none, np.zeros(0, np.int64), np.zeros(q, np.int64), now_us.astype(np.int64))


class SequenceHistory:
    """The cards' histories of one feature layout and length, in a ``HistoryStore``.

    ``tag``: the layout's name in the keys (a digest of the features and the length), so a
    reload onto other features starts histories of its own instead of misreading these.
    """

    def __init__(self, store: HistoryStore, *, features: Sequence[str], length: int) -> None:
        self.store = store
        self.n_features = len(features)
        self.length = length
        self.width = HEAD_BYTES + 4 * self.n_features
        layout = "\0".join([*features, str(length)]).encode()
        self.tag = hashlib.blake2b(layout, digest_size=6).hexdigest()

    def windows(self, events: Sequence[Event], values: np.ndarray) -> Windows:
        """Append the events (values (N, F), their feature rows) to their cards' histories,
        in order, and answer each one's earlier events; idempotent per transaction."""
        rows = np.ascontiguousarray(values, dtype=np.float32)  # (N, F)
        items = [
            (f"c:{e.customer_id}/{self.tag}",
             pack_head(e.t_us, tx_hash(e.transaction_id)) + rows[i].tobytes())
            for i, e in enumerate(events)
        ]  # fmt: skip
        # The window's length - 1 events, the event before them and the event itself: a retry
        # of a card's newest event still finds the one before its window.
        answers = self.store.append(items, width=self.width, keep=self.length + 1)
        w, parts, counts = self.width, [], []
        for answer in answers:
            # The window's length - 1 events, and the one before them (for its gap).
            first = max(0, answer.position - self.length)
            parts.append(answer.records[first * w : answer.position * w])
            counts.append(answer.position - first)
        table = np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(-1, w)  # (P, W)
        shifted = np.ascontiguousarray(table[:, :8]).view(">u8").reshape(-1)  # (P,)
        times = (shifted.astype(np.uint64) - _TIME_OFFSET).view(np.int64)
        body = np.ascontiguousarray(table[:, HEAD_BYTES:]).view("<f4")  # (P, F)
        now = np.array([e.t_us for e in events], dtype=np.int64)
        return Windows(body.astype(np.float32), times, np.array(counts, np.int64), now)


def sequence_table(
    x: np.ndarray, windows: Windows, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The scoring table of Q queries: (matrix (P + Q, F) float32, history (Q, T), gaps
    (Q, T, 2), each query's row (Q,)). Query q's block is its stored rows then its own row
    ``x[q]``; an event's previous one is the row above it in its block."""
    sizes = windows.counts + 1  # (Q,)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    current = ends - 1  # (Q,)
    m = int(ends[-1]) if len(ends) else 0
    own = np.zeros(m, dtype=bool)
    own[current] = True
    matrix = np.empty((m, x.shape[1]), dtype=np.float32)
    matrix[own], matrix[~own] = x, windows.events
    times = np.empty(m, dtype=np.int64)
    times[own], times[~own] = windows.now_us, windows.times_us
    seconds = times / 1e6  # as the batch: epoch microseconds / 1e6, float64
    previous = np.arange(m, dtype=np.int64) - 1
    previous[starts] = PADDING
    at = current[:, None] - np.arange(length - 1, -1, -1)[None, :]  # (Q, T), current last
    history = np.where(at >= starts[:, None], at, PADDING).astype(np.int64)
    return matrix, history, history_gaps(history, previous, seconds), current


class SequenceAttribution:
    """Probabilities and gradient x input attributions of a sequence bundle's model."""

    def __init__(self, bundle: Bundle) -> None:
        declared = bundle.inputs
        if bundle.standardizer is None or not isinstance(declared, SequenceInputs):
            raise ArtifactError("sequence attribution needs a sequence model's bundle")
        self.length = declared.length
        module: Any = bundle.model
        module.eval()
        self._module = module
        self._standardizer = bundle.standardizer
        self._categorical = bundle.categorical
        skip = {c.position for c in self._categorical}
        self._numeric = [j for j in range(len(bundle.features)) if j not in skip]

    def __call__(self, x: np.ndarray, windows: Windows) -> tuple[np.ndarray, np.ndarray]:
        """(contributions (Q, F), model probability (Q,)) of the queries x (Q, F)."""
        matrix, history, gaps, current = sequence_table(x, windows, self.length)
        with torch.enable_grad():
            vector = neural_inputs(torch.from_numpy(matrix), self._categorical, self._standardizer)
            xs = vector["x"].requires_grad_(True)  # (P + Q, F - C)
            arrays = sequence_arrays(vector, history, gaps)
            logits = self._module(arrays.rows | arrays.shared).float()  # (Q, 2)
            margin = logits[:, 1] - logits[:, 0]  # (Q,) fraud log-odds
            # Queries are independent (eval mode, causal within each block): the gradient of
            # the sum at a query's own row is its own.
            (grad,) = torch.autograd.grad(margin.sum(), xs)
        at = torch.from_numpy(current)
        numeric = (grad[at] * xs[at]).detach().double().numpy()  # (Q, F - C)
        contributions = numeric
        if self._categorical:
            contributions = np.zeros((x.shape[0], x.shape[1]))  # (Q, F)
            contributions[:, self._numeric] = numeric
        # As Bundle.predict_frame: softmax in float32, then float64.
        probability = torch.softmax(logits.detach(), dim=1)[:, 1].double().numpy()
        return contributions, probability
