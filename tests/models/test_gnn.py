"""The GraphSAGE model over sampled neighbourhoods, and the training loop's guarantees for it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fraudflow.config import TrainConfig
from fraudflow.errors import ArtifactError
from fraudflow.features import graph
from fraudflow.features.graph import Fanout, TransactionGraph, slot_gaps
from fraudflow.models import GraphInputs, gnn, input_spec_from_dict
from fraudflow.models.gnn import GNN
from fraudflow.train.checkpointing import LAST, load_checkpoint
from fraudflow.train.distributed import single_process
from fraudflow.train.loop import TensorData, fit
from tests.helpers.crash import Crash, CrashMidEpoch

CPU = single_process(torch.device("cpu"))
FANOUT = Fanout(hop1=3, hop2=2)
N_FEATURES = 3
CFG = TrainConfig(
    model="gnn", epochs=2, batch_size=64, patience=10, hidden_sizes=(16,), seed=5,
    checkpoint_every_steps=3,
)  # fmt: skip
DAY_US = 86_400 * 1_000_000


def _model(seed: int = 0, n_codes: tuple[int, ...] = ()) -> GNN:
    torch.manual_seed(seed)
    return GNN(
        n_features=N_FEATURES, hop1=FANOUT.hop1, hop2=FANOUT.hop2, embedding_size=8,
        hidden_sizes=(16,), dropout=0.1, cardinalities=n_codes,
    )  # fmt: skip


def _graph_data(n: int, seed: int) -> TensorData:
    """Transactions whose fraud is a property of the terminal: only the graph shows it (a
    terminal's earlier transactions carry a high first feature when it is compromised)."""
    rng = np.random.default_rng(seed)
    cards = rng.integers(0, 40, n)
    terminals = rng.integers(0, 30, n)
    bad = terminals < 4
    events = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    events[:, 0] += np.where(bad, 2.0, 0.0)
    times = np.sort(rng.integers(0, 20 * DAY_US, n))
    labels = (bad & (rng.random(n) < 0.7)).astype(np.int64)
    x = events.copy()
    x[:, 0] = rng.normal(size=n)  # the row's own features say nothing
    per_row, shared = _inputs(TransactionGraph(cards, terminals, times), events, x, times)
    return TensorData(inputs=per_row, labels=torch.from_numpy(labels), shared=shared)


def _inputs(
    g: TransactionGraph, events: np.ndarray, x: np.ndarray, times: np.ndarray
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-row inputs of every row of ``g``, and the shared table."""
    per_row = {"x": torch.from_numpy(x)}
    for name, slots in g.sample(np.arange(len(g)), FANOUT).parts().items():
        per_row[name] = torch.from_numpy(slots)
        per_row[f"{name}_gap"] = torch.from_numpy(slot_gaps(slots, times, times))
    return per_row, {"events": torch.from_numpy(events)}


def _rows(
    inputs: tuple[dict[str, torch.Tensor], ...], idx: torch.Tensor
) -> dict[str, torch.Tensor]:
    per_row, shared = inputs
    return {k: v[idx] for k, v in per_row.items()} | shared


def _random(n: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    cards, terminals = rng.integers(0, 10, n), rng.integers(0, 8, n)
    times = np.sort(rng.integers(0, 5 * DAY_US, n))
    events = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    return _inputs(TransactionGraph(cards, terminals, times), events, events, times)


def test_input_names_agree_with_the_sampler() -> None:
    assert gnn.GRAPH_INPUTS == graph.GRAPH_INPUTS


def test_logits_shape_and_each_row_scored_on_its_own() -> None:
    model, data = _model().eval(), _random(80, 0)
    with torch.no_grad():
        logits = model(_rows(data, torch.arange(50)))
        alone = torch.cat([model(_rows(data, torch.tensor([i]))) for i in range(5)])
        reversed_ = model(_rows(data, torch.arange(49, -1, -1)))
    assert logits.shape == (50, 2)
    torch.testing.assert_close(alone, logits[:5], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reversed_.flip(0), logits, rtol=1e-5, atol=1e-6)


def test_empty_neighbourhoods_and_categorical_codes() -> None:
    model = _model(n_codes=(5,)).eval()
    inputs = _rows(_random(20, 1), torch.arange(4))
    for name in gnn.GRAPH_INPUTS:
        inputs[name] = torch.full_like(inputs[name], -1)
        inputs[f"{name}_gap"] = torch.zeros_like(inputs[f"{name}_gap"])
    inputs["codes"] = torch.tensor([[0], [1], [4], [2]])
    with torch.no_grad():
        logits = model(inputs)
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_empty_slots_are_ignored_whatever_their_gaps_hold() -> None:
    model, inputs = _model().eval(), _rows(_random(80, 2), torch.arange(80))
    noisy = dict(inputs)
    for name in gnn.GRAPH_INPUTS:
        gap = inputs[f"{name}_gap"]
        noisy[f"{name}_gap"] = torch.where(inputs[name] < 0, torch.full_like(gap, 7.0), gap)
    assert any((inputs[name] < 0).any() for name in gnn.GRAPH_INPUTS)
    with torch.no_grad():
        torch.testing.assert_close(model(noisy), model(inputs))


def test_leakage_trap_later_rows_do_not_change_an_earlier_score() -> None:
    """A later transaction, or a later row's features or label, leaves earlier scores alone:
    the model reads the shared table only at the positions the sampler named."""
    per_row, shared = _random(200, 3)
    model = _model().eval()
    changed = {"events": shared["events"].clone()}
    changed["events"][150:] *= -50.0
    early = torch.arange(150)
    with torch.no_grad():
        a = model(_rows((per_row, shared), early))
        b = model(_rows((per_row, changed), early))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_autocast_runs_on_cpu() -> None:
    model, inputs = _model(), _rows(_random(40, 4), torch.arange(16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(inputs)
    assert logits.shape == (16, 2) and torch.isfinite(logits.float()).all()


def _train_valid(n: int = 1200) -> tuple[TensorData, TensorData]:
    return _graph_data(n, 0), _graph_data(n // 3, 1)


def test_learns_what_only_the_graph_shows(tmp_path: Path) -> None:
    train, valid = _train_valid()
    cfg = TrainConfig(**{**CFG.__dict__, "learning_rate": 0.01, "epochs": 4})
    result = fit(_model(CFG.seed), train, valid, cfg, dist_ctx=CPU, checkpoint_dir=tmp_path)
    # The rows' own features carry no signal: the base rate (about 0.09) is all they could get.
    assert result.best_valid_average_precision > 0.5


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    train, valid = _train_valid(480)
    whole = _model(CFG.seed)
    fit(whole, train, valid, CFG, dist_ctx=CPU, checkpoint_dir=tmp_path / "whole")
    with pytest.raises(Crash):
        fit(_model(CFG.seed), train, valid, CFG, dist_ctx=CPU,
            checkpoint_dir=tmp_path / "split", observer=CrashMidEpoch())  # fmt: skip
    state = load_checkpoint(tmp_path / "split" / LAST)["loop"]
    assert state["next_epoch"] == 1 and 0 < state["epoch_offset"] < len(train)
    resumed = _model(CFG.seed)
    fit(resumed, train, valid, CFG, dist_ctx=CPU, checkpoint_dir=tmp_path / "split", resume=True)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_out_of_memory_backoff_halves_the_batch(tmp_path: Path) -> None:
    train, valid = _train_valid(480)
    # A cap on the activation memory of a batch stands in for the device running out.
    cfg = TrainConfig(
        **{**CFG.__dict__, "epochs": 1, "batch_size": 512, "max_batch_memory_mb": 0.5}
    )
    result = fit(_model(CFG.seed), train, valid, cfg, dist_ctx=CPU, checkpoint_dir=tmp_path)
    assert result.backoffs and result.batch_size < 512
    assert result.samples_seen == len(train)


def test_the_gnn_declares_its_graph_inputs_and_they_round_trip() -> None:
    declared = _model().inputs
    assert declared == GraphInputs(hop1=FANOUT.hop1, hop2=FANOUT.hop2)
    assert input_spec_from_dict(declared.to_dict()) == declared
    with pytest.raises(ArtifactError, match="a graph's hop2 fan-out must be >= 1, however got 0"):
        input_spec_from_dict({"kind": "graph", "hop1": 2, "hop2": 0})
