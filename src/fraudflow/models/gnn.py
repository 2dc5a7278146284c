"""A GraphSAGE network over each transaction's sampled customer-terminal neighbourhood.

The neighbourhood (sampled by ``fraudflow.features.graph``: the card's last transactions and
their terminals' last ones, the terminal's last transactions and their cards' last ones) is
unrolled into a computation tree per row: the row's card and terminal are the roots, every
sampled edge adds the node at its far end, carrying the edge's vector (its transaction's
standardised features, log(1 + days since it), a filled flag). Two heterogeneous GraphSAGE
layers (PyG's ``SAGEConv`` per relation in a ``HeteroConv``, mean aggregation; Hamilton et
al., "Inductive Representation Learning on Large Graphs", 2017) carry hop-2 information to
the hop-1 nodes, then hop-1 to the roots. The card and terminal embeddings, joined with the
transaction's own features, feed an MLP head (``fraudflow.models.mlp``) giving the logits.

Each row's tree is its own component, so a row's score depends on that row's inputs alone,
whatever else is in the batch. Empty slots add no node edge (their messages are dropped).

The edges' vectors hold the numeric features only: the categorical ones reach the model
through the row's own codes.

Shape: per row, inputs["x"] (B, F) and, with categorical columns, inputs["codes"] (B, C) as
for the MLP; inputs["card_hop1"], inputs["terminal_hop1"] (B, K1) int64 and
inputs["card_hop2"], inputs["terminal_hop2"] (B, K1, K2) int64, the sampled edges' rows in
the shared table (-1: an empty slot), each with "<name>_gap" of its shape, float32
log(1 + days) before the row. Shared: inputs["events"] (M, F), every row's standardised
numeric features. Node vectors are (F + 2); the output is logits (B, 2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import HeteroConv, SAGEConv

from fraudflow.models.interface import GraphInputs
from fraudflow.models.mlp import MLP

__all__ = ["GNN", "GRAPH_INPUTS"]

# The neighbourhood inputs, named as fraudflow.features.graph names them (a test holds them
# equal: models do not import the feature layer).
GRAPH_INPUTS = ("card_hop1", "card_hop2", "terminal_hop1", "terminal_hop2")
CARD, TERMINAL = "card", "terminal"
USES = (CARD, "uses", TERMINAL)  # messages from cards into terminals
USED_BY = (TERMINAL, "used_by", CARD)  # messages from terminals into cards
N_LAYERS = 2  # one per hop


class GNN(nn.Module):
    # Which edges exist depends on the data (empty slots are dropped): shapes vary and the
    # masking syncs with the host, so the step cannot be replayed as a CUDA graph.
    cuda_graph_safe = False

    def __init__(
        self,
        *,
        n_features: int,
        hop1: int,
        hop2: int,
        embedding_size: int,
        hidden_sizes: tuple[int, ...],
        dropout: float,
        cardinalities: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.inputs = GraphInputs(hop1=hop1, hop2=hop2)
        d, node_features = embedding_size, n_features + 2
        self.encode = nn.ModuleDict(
            {CARD: nn.Linear(node_features, d), TERMINAL: nn.Linear(node_features, d)}
        )
        self.convs = nn.ModuleList(
            HeteroConv({USES: SAGEConv((d, d), d), USED_BY: SAGEConv((d, d), d)}, aggr="sum")
            for _ in range(N_LAYERS)
        )
        self.head = MLP(
            n_features=n_features + 2 * d, hidden_sizes=hidden_sizes, dropout=dropout,
            cardinalities=cardinalities,
        )  # fmt: skip

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        x_dict, edges = _tree(inputs)
        x_dict = {kind: torch.relu(self.encode[kind](x)) for kind, x in x_dict.items()}
        for conv in self.convs:
            x_dict = {kind: torch.relu(h) for kind, h in conv(x_dict, edges).items()}
        b = inputs["x"].shape[0]
        joined = torch.cat([inputs["x"], x_dict[CARD][:b], x_dict[TERMINAL][:b]], dim=1)
        head_inputs = {"x": joined.to(inputs["x"].dtype)}  # (B, F + 2d)
        if "codes" in inputs:
            head_inputs["codes"] = inputs["codes"]
        return self.head(head_inputs)  # (B, 2)


def _slots(inputs: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    """The node vectors (..., F + 2) of one part's slots, and which slots are filled (...)."""
    slots = inputs[name]  # (B, K1) or (B, K1, K2)
    filled = slots >= 0
    events = inputs["events"]  # (M, F)
    features = events[slots.clamp_min(0)] * filled.unsqueeze(-1).to(events.dtype)
    extra = torch.stack([inputs[f"{name}_gap"], filled.to(events.dtype)], dim=-1)
    return torch.cat([features, extra.to(events.dtype)], dim=-1), filled


def _tree(inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[tuple[str, ...], Tensor]]:
    """The batch's computation trees as one heterogeneous graph.

    Node order per type: the B roots, the B * K1 hop-1 nodes, the B * K1 * K2 hop-2 nodes.
    Cards: roots, the terminal's hop-1 cards, the card's hop-2 cards; terminals: roots, the
    card's hop-1 terminals, the terminal's hop-2 terminals. Roots start at zero: the
    transaction itself is not an edge of its own graph.
    """
    card1, card1_filled = _slots(inputs, "card_hop1")  # (B, K1, E), (B, K1)
    card2, card2_filled = _slots(inputs, "card_hop2")  # (B, K1, K2, E), (B, K1, K2)
    term1, term1_filled = _slots(inputs, "terminal_hop1")
    term2, term2_filled = _slots(inputs, "terminal_hop2")
    b, k1, k2, e = card2.shape
    roots = card1.new_zeros(b, e)
    x_dict = {
        CARD: torch.cat([roots, term1.reshape(-1, e), card2.reshape(-1, e)]),
        TERMINAL: torch.cat([roots, card1.reshape(-1, e), term2.reshape(-1, e)]),
    }
    uses = torch.cat([_edges(card2_filled, b, k1, k2), _edges(term1_filled, b, k1, None)], dim=1)
    used_by = torch.cat([_edges(term2_filled, b, k1, k2), _edges(card1_filled, b, k1, None)], 1)
    return x_dict, {USES: uses, USED_BY: used_by}


def _edges(filled: Tensor, b: int, k1: int, k2: int | None) -> Tensor:
    """(2, filled slots) source and target node indices of the filled slots of one level.

    ``filled`` is (B, K1) for hop-1 slots (source: hop-1 node, target: root) or (B, K1, K2)
    for hop-2 slots (source: hop-2 node, target: hop-1 node), in the node order of ``_tree``.
    """
    slot = torch.arange(filled.numel(), device=filled.device).reshape(filled.shape)
    if k2 is None:
        source, target = b + slot, slot // k1
    else:
        source, target = b + b * k1 + slot, b + slot // k2
    keep = filled.reshape(-1)
    return torch.stack([source.reshape(-1)[keep], target.reshape(-1)[keep]])
