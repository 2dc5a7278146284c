"""The sequence Transformer: causal attention that never sees padding, and a score that depends
on the row's own history only."""

import torch

from fraudflow.config import ModelConfig, RunConfig, TrainConfig, TransformerConfig
from fraudflow.models import FeatureLayout, SequenceInputs, SequenceTransformer, build_model
from fraudflow.models.interface import Categorical
from fraudflow.models.sequence import attention_mask

T = 4


def _model(cardinalities: tuple[int, ...] = ()) -> SequenceTransformer:
    torch.manual_seed(0)
    return SequenceTransformer(
        n_features=3, length=T, d_model=8, n_layers=2, n_heads=2, feedforward_dim=16,
        dropout=0.0, cardinalities=cardinalities,
    ).eval()  # fmt: skip


def _inputs(history: list[list[int]], events: torch.Tensor) -> dict[str, torch.Tensor]:
    h = torch.tensor(history)
    gaps = torch.where(h[..., None] >= 0, torch.rand(*h.shape, 2), 0.0)
    return {"history": h, "gaps": gaps, "events": events}


def test_attention_is_causal_and_never_reads_padding() -> None:
    valid = torch.tensor([[False, False, True, True]])
    allowed = attention_mask(valid)[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0],  # a padded position sees itself only: no empty softmax row
        [0, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 1],  # the current event sees the card's earlier event and itself
    ]


def test_a_cards_first_transaction_ignores_the_padded_slots() -> None:
    model = _model()
    events = torch.randn(5, 3)
    first = _inputs([[-1, -1, -1, 2]], events)
    with torch.no_grad():
        before = model(first)
        # Padding reads nothing: no other event's values reach the score.
        changed = events.clone()
        changed[[0, 1, 3, 4]] = torch.randn(4, 3) * 100
        after = model(first | {"events": changed})
    assert torch.isfinite(before).all()
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_a_score_reads_the_events_of_its_history_only() -> None:
    model = _model(cardinalities=(5,))
    events, codes = torch.randn(6, 3), torch.randint(0, 5, (6, 1))
    inputs = _inputs([[-1, 0, 2, 4]], events) | {"event_codes": codes}
    with torch.no_grad():
        base = model(inputs)
        outside = events.clone()
        outside[[1, 3, 5]] += 10.0
        same = model(inputs | {"events": outside})
        inside = events.clone()
        inside[0] += 10.0  # an earlier event of the card
        other = model(inputs | {"events": inside})
    torch.testing.assert_close(base, same, rtol=0, atol=0)
    assert not torch.allclose(base, other)


def test_the_registry_builds_it_from_its_own_config_section() -> None:
    cfg = RunConfig(
        train=TrainConfig(model="transformer", seed=1),
        model=ModelConfig(transformer=TransformerConfig(sequence_length=6, d_model=16, n_heads=2)),
    )
    layout = FeatureLayout(4, (Categorical(position=2, cardinality=7),))
    model = build_model("transformer", layout=layout, cfg=cfg)
    assert isinstance(model, SequenceTransformer)
    assert model.inputs == SequenceInputs(length=6)
    assert model.event.in_features == 3 + 5  # 3 numeric + the category's embedding (5 dims)
