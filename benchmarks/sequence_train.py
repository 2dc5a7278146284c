"""Benchmark: the sequence Transformer's CPU training speed, against the plain version of itself
and the MLP on the same rows, in one run.

Synthetic rows: ``--cards`` cards whose ``--samples`` transactions are spread over 30 days,
each event ``--features`` standardised features and two categorical codes, about 1% fraud;
each row's history is built by ``fraudflow.features.sequences.card_histories`` (the default
``sequence_length``, 32), as training builds it. Three contenders train on the same batches
(batch 2048, AdamW as ``fit`` sets it up, the class-weighted loss), the model at its
``TrainConfig``/``TransformerConfig`` defaults:

* transformer: ``fraudflow.models.SequenceTransformer`` as shipped: the last block computes
  the current (last) position alone (``sequence._last_query``), no dropout on the attention
  weights;
* plain transformer: the same weights through the obvious forward (``plain_forward`` below):
  every block computes every position, dropout on the attention weights too; in eval mode it
  gives the shipped model's logits (checked, the largest difference printed);
* mlp: ``fraudflow.models.MLP`` (``TrainConfig`` hidden sizes) on the current row's features:
  the per-row floor of the same loop.

Each contender runs ``--rounds`` rounds of ``--steps`` steps, interleaved so that the load of a
shared machine falls on all alike; the best round counts (other work only ever adds time).
Samples/s are given by the wall clock and per CPU second of this process (``process_time``:
less sensitive to other processes on a busy machine). Then ``fit`` trains the shipped
transformer for one epoch on all rows (validation on a fifth as many): its own samples/s, steps,
validation and checkpoints included, and the input building (``card_histories``) is timed.

Prints a table, then a JSON object as its last line. Run from the repository root:

    .venv/bin/python benchmarks/sequence_train.py [--samples 200000] [--cards 20000]
        [--steps 8] [--rounds 3] [--seed 0] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fraudflow.config import TrainConfig, TransformerConfig
from fraudflow.features.sequences import card_histories
from fraudflow.models import MLP, SequenceTransformer
from fraudflow.models.sequence import attention_mask
from fraudflow.train.distributed import single_process
from fraudflow.train.loop import TensorData, fit

DEVICE = torch.device("cpu")
N_FEATURES = 25
CARDINALITIES = (5, 9)
FRAUD_RATE = 0.01
SECONDS = 30 * 86_400


def make_rows(n: int, n_cards: int, length: int, seed: int) -> tuple[TensorData, float]:
    """Synthetic sequence rows (see the module docstring) and the seconds to build histories."""
    rng = np.random.default_rng(seed)
    cards = rng.integers(0, n_cards, size=n)
    seconds = np.sort(rng.uniform(0, SECONDS, size=n))
    started = time.perf_counter()
    history, gaps = card_histories(cards, seconds, length)
    built = time.perf_counter() - started
    events = torch.from_numpy(rng.standard_normal((n, N_FEATURES), dtype=np.float32))
    codes = torch.from_numpy(np.stack([rng.integers(0, k, n) for k in CARDINALITIES], axis=1))
    labels = torch.from_numpy((rng.random(n) < FRAUD_RATE).astype(np.int64))
    rows = {"history": torch.from_numpy(history), "gaps": torch.from_numpy(gaps)}
    shared = {"events": events, "event_codes": codes}
    return TensorData(inputs=rows, labels=labels, shared=shared), built


def build_transformer(t: TransformerConfig, seed: int) -> SequenceTransformer:
    torch.manual_seed(seed)
    return SequenceTransformer(
        n_features=N_FEATURES, length=t.sequence_length, d_model=t.d_model,
        n_layers=t.n_layers, n_heads=t.n_heads, feedforward_dim=t.feedforward_dim,
        dropout=t.dropout, cardinalities=CARDINALITIES,
    )  # fmt: skip


def plain_forward(model: SequenceTransformer, inputs: dict[str, Tensor]) -> Tensor:
    """The model's function written the obvious way: every block computes every position and
    the attention weights get dropout as well (the version before the speed work)."""
    history = inputs["history"]  # (B, T)
    valid = history >= 0
    rows = history.clamp_min(0)
    codes = inputs["event_codes"][rows]  # (B, T, C)
    vectors = [table(codes[..., i]) for i, table in enumerate(model.embeddings)]
    x = torch.cat([inputs["events"][rows], *vectors], dim=-1) * valid[..., None]
    h = model.event(x) + model.gaps(inputs["gaps"]) + model.position  # (B, T, d)
    mask = attention_mask(valid)
    for block in model.blocks:
        b, t, d = h.shape
        qkv = block.qkv(block.norm1(h)).view(b, t, 3, block.n_heads, d // block.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, d / H)
        p = block.drop.p if model.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        h = h + block.drop(block.out(a.transpose(1, 2).reshape(b, t, d)))
        h = h + block.drop(block.ff(block.norm2(h)))
    return model.head(model.norm(h[:, -1]))  # (B, 2)


def mlp_inputs(data: TensorData, idx: Tensor) -> dict[str, Tensor]:
    """The current row's own features, as the MLP reads them (its history's last event)."""
    current = data.inputs["history"][idx, -1]  # (B,)
    return {"x": data.shared["events"][current], "codes": data.shared["event_codes"][current]}


Step = Callable[[Tensor], None]


def trainer(
    forward: Callable[[Tensor], Tensor], params: list[Tensor], labels: Tensor, cfg: TrainConfig
) -> Step:
    """One training step on the rows ``idx``, as the loop takes it (fp32)."""
    n_pos = int(labels.sum())
    weights = torch.tensor([1.0, math.sqrt((len(labels) - n_pos) / max(n_pos, 1))])
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True
    )

    def step(idx: Tensor) -> None:
        loss = F.cross_entropy(forward(idx), labels[idx], weight=weights, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        (loss / idx.shape[0]).backward()
        optimizer.step()

    return step


def contenders(data: TensorData, t: TransformerConfig, cfg: TrainConfig) -> dict[str, Step]:
    shipped = build_transformer(t, cfg.seed).train()
    plain = build_transformer(t, cfg.seed).train()
    mlp = MLP(n_features=N_FEATURES, hidden_sizes=cfg.hidden_sizes, dropout=cfg.dropout,
              cardinalities=CARDINALITIES).train()  # fmt: skip

    def batch(idx: Tensor) -> dict[str, Tensor]:
        return data.batch(idx)[0]

    return {
        "transformer": trainer(lambda i: shipped(batch(i)), list(shipped.parameters()),
                               data.labels, cfg),
        "plain transformer": trainer(lambda i: plain_forward(plain, batch(i)),
                                     list(plain.parameters()), data.labels, cfg),
        "mlp": trainer(lambda i: mlp(mlp_inputs(data, i)), list(mlp.parameters()),
                       data.labels, cfg),
    }  # fmt: skip


def time_steps(steps: dict[str, Step], n: int, args: argparse.Namespace, batch: int) -> dict:
    """Best round per contender, samples/s by the wall clock and per CPU second."""
    generator = torch.Generator().manual_seed(args.seed)
    best: dict[str, dict[str, float]] = {name: {"wall": 0.0, "cpu": 0.0} for name in steps}
    for step in steps.values():  # warm-up
        step(torch.randint(0, n, (batch,), generator=generator))
    for _ in range(args.rounds):
        batches = [torch.randint(0, n, (batch,), generator=generator) for _ in range(args.steps)]
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for idx in batches:
                step(idx)
            samples = batch * len(batches)
            rates = {"wall": samples / (time.perf_counter() - wall),
                     "cpu": samples / max(time.process_time() - cpu, 1e-9)}  # fmt: skip
            best[name] = {k: max(best[name][k], rates[k]) for k in rates}
        print(".", end="", flush=True)
    print()
    return best


def largest_difference(data: TensorData, t: TransformerConfig, seed: int) -> float:
    """Eval-mode logits of the shipped forward against ``plain_forward``, same weights."""
    model = build_transformer(t, seed).eval()
    inputs = data.batch(torch.arange(min(len(data), 512)))[0]
    with torch.no_grad():
        return float((model(inputs) - plain_forward(model, inputs)).abs().max())


def time_fit(data: TensorData, valid: TensorData, t: TransformerConfig, cfg: TrainConfig) -> float:
    one_epoch = TrainConfig(**{**cfg.__dict__, "model": "transformer", "epochs": 1})
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(build_transformer(t, cfg.seed), data, valid, one_epoch,
                     dist_ctx=single_process(DEVICE), checkpoint_dir=Path(tmp))  # fmt: skip
    return result.samples_per_second


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--cards", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser.parse_args()


def main() -> None:
    args = _args()
    if args.threads:
        # On a machine shared with other jobs, one thread per process avoids the waits of
        # threads at every op's barrier for a core that another process holds.
        torch.set_num_threads(args.threads)
    t, cfg = TransformerConfig(), TrainConfig(seed=args.seed)
    data, built = make_rows(args.samples, args.cards, t.sequence_length, args.seed)
    valid, _ = make_rows(args.samples // 5, args.cards, t.sequence_length, args.seed + 1)
    difference = largest_difference(data, t, args.seed)
    steps = time_steps(contenders(data, t, cfg), len(data), args, cfg.batch_size)
    fit_rate = time_fit(data, valid, t, cfg)
    shipped, plain, mlp = (steps[k] for k in ("transformer", "plain transformer", "mlp"))
    print(f"{len(data):,} rows, histories of {t.sequence_length} built in {built:.2f} s "
          f"({len(data) / built:,.0f} rows/s); torch threads {torch.get_num_threads()}; "
          f"shipped vs plain logits differ by at most {difference:.1e}")  # fmt: skip
    print(f"{'training steps':<20}{'samples/s (wall)':>18}{'per CPU second':>16}")
    for name, rate in steps.items():
        print(f"{name:<20}{rate['wall']:>18,.0f}{rate['cpu']:>16,.0f}")
    ratio_plain = shipped["cpu"] / plain["cpu"]
    print(f"transformer / plain: {ratio_plain:.2f}x (per CPU second), "
          f"{shipped['wall'] / plain['wall']:.2f}x (wall); transformer / mlp: "
          f"{shipped['cpu'] / mlp['cpu']:.3f} (per CPU second)")  # fmt: skip
    print(f"fit, one epoch (steps, validation, checkpoints): {fit_rate:,.0f} samples/s; "
          f"1M rows an epoch in {1e6 / fit_rate / 60:.1f} min at that rate")  # fmt: skip
    rounded = {name: {k: round(v) for k, v in rate.items()} for name, rate in steps.items()}
    print(json.dumps({
        "rows": len(data), "sequence_length": t.sequence_length,
        "histories_rows_per_second": round(len(data) / built),
        "steps_samples_per_second": rounded,
        "transformer_over_plain_cpu": round(ratio_plain, 3),
        "transformer_over_plain_wall": round(shipped["wall"] / plain["wall"], 3),
        "transformer_over_mlp_cpu": round(shipped["cpu"] / mlp["cpu"], 4),
        "fit_samples_per_second": round(fit_rate),
        "largest_logit_difference": difference,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
