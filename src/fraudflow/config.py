"""Typed, frozen run configurations.

Every command builds one of these from its flags (or a TOML preset plus ``--set`` overrides)
and passes it down; nothing below the CLI reads flags, files or environment variables for
settings. Field names carry their unit (``_days``, ``_seconds``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

from fraudflow.errors import ConfigError

__all__ = [
    "FeatureConfig",
    "GBDTConfig",
    "GNNConfig",
    "ModelConfig",
    "RunConfig",
    "SimulationConfig",
    "SplitConfig",
    "TrainConfig",
    "TransformerConfig",
    "apply_overrides",
    "load_run_config",
    "run_config_from_dict",
    "to_dict",
]

AmpMode = Literal["off", "bf16", "fp16"]
DeviceName = Literal["auto", "cpu", "cuda"]
CudaGraphsMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class SimulationConfig:
    n_customers: int = 5_000
    n_terminals: int = 10_000
    n_days: int = 90
    start_date: date = date(2026, 1, 1)
    seed: int = 0
    # The structural fraud scenarios (fraudflow.data.simulator); a rate of 0 turns one off.
    # Expected events per entity per day, so the fraud rate does not depend on the size.
    cpp_rate_per_terminal_day: float = 4e-5  # a terminal is skimmed (common point of compromise)
    cpp_window_days: int = 7  # how long a skimmed terminal leaks the cards that use it
    ato_rate_per_card_day: float = 2e-4  # an account takeover starts
    ring_rate_per_card_day: float = 1.5e-5  # a fraud ring forms (counted per card in the world)

    def __post_init__(self) -> None:
        _require(self.n_customers >= 1, "n_customers must be >= 1", self.n_customers)
        _require(self.n_terminals >= 1, "n_terminals must be >= 1", self.n_terminals)
        _require(self.n_days >= 1, "n_days must be >= 1", self.n_days)
        for name in (
            "cpp_rate_per_terminal_day",
            "ato_rate_per_card_day",
            "ring_rate_per_card_day",
        ):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0", getattr(self, name))
        _require(self.cpp_window_days >= 1, "cpp_window_days must be >= 1", self.cpp_window_days)


@dataclass(frozen=True)
class FeatureConfig:
    # A fraud label is known label_delay_days after its transaction (chargebacks, analyst review).
    label_delay_days: int = 7
    customer_windows_days: tuple[int, ...] = (1, 7, 30)
    terminal_windows_days: tuple[int, ...] = (1, 7, 30)
    # Transactions below this amount count as "small" for the card-testing feature.
    small_amount: float = 5.0

    def __post_init__(self) -> None:
        # A zero delay would let a row see its own (not yet known) label.
        _require(self.label_delay_days >= 1, "label_delay_days must be >= 1", self.label_delay_days)
        for w in (*self.customer_windows_days, *self.terminal_windows_days):
            _require(w >= 1, "window days must be >= 1", w)
        _require(self.small_amount > 0, "small_amount must be > 0", self.small_amount)


@dataclass(frozen=True)
class SplitConfig:
    train_start: date | None = None
    train_days: int | None = None
    delay_days: int = 7
    test_days: int = 7
    # Days skipped at the start of the data so that the 30-day windows are full.
    warmup_days: int = 30
    # The last valid_days of the training period are held out for early stopping.
    valid_days: int = 7

    def __post_init__(self) -> None:
        _require(self.delay_days >= 0, "delay_days must be >= 0", self.delay_days)
        _require(self.test_days >= 1, "test_days must be >= 1", self.test_days)
        _require(self.warmup_days >= 0, "warmup_days must be >= 0", self.warmup_days)
        _require(self.valid_days >= 1, "valid_days must be >= 1", self.valid_days)
        if self.train_days is not None:
            _require(
                self.train_days > self.valid_days,
                "train_days must be > valid_days",
                self.train_days,
            )


@dataclass(frozen=True)
class TrainConfig:
    model: str = "mlp"
    epochs: int = 20
    batch_size: int = 2048
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    dropout: float = 0.2
    hidden_sizes: tuple[int, ...] = (256, 128)
    # Early stopping: epochs without a better validation average precision.
    patience: int = 4
    # Weight of the fraud class in the loss; None means sqrt(n_legit / n_fraud).
    pos_weight: float | None = None
    device: DeviceName = "auto"
    amp: AmpMode = "off"
    seed: int = 0
    # torch.compile the model (worth it on GPUs for long runs; compile time is paid once).
    compile: bool = False
    # The training step as one CUDA graph (fraudflow.train.graphs). auto: on CUDA whenever the
    # model and the run allow it; on: required (a run that cannot use it is refused); off: never.
    cuda_graphs: CudaGraphsMode = "auto"
    # Also checkpoint every N optimiser steps (0: at epoch ends only).
    checkpoint_every_steps: int = 0
    # Out-of-memory back-off halves the batch down to this size, then gives up.
    min_batch_size: int = 32
    # CPU cap on the estimated activation memory of one batch, in MiB (None: no cap).
    max_batch_memory_mb: float | None = None

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "epochs must be >= 1", self.epochs)
        _require(self.min_batch_size >= 1, "min_batch_size must be >= 1", self.min_batch_size)
        _require(
            self.checkpoint_every_steps >= 0,
            "checkpoint_every_steps must be >= 0",
            self.checkpoint_every_steps,
        )
        if self.max_batch_memory_mb is not None:
            _require(
                self.max_batch_memory_mb > 0,
                "max_batch_memory_mb must be > 0",
                self.max_batch_memory_mb,
            )
        _require(self.batch_size >= 1, "batch_size must be >= 1", self.batch_size)
        _require(self.learning_rate > 0, "learning_rate must be > 0", self.learning_rate)
        _require(0 <= self.dropout < 1, "dropout must be in [0, 1)", self.dropout)
        _require(self.patience >= 1, "patience must be >= 1", self.patience)
        _require(
            self.device in ("auto", "cpu", "cuda"), "device must be auto|cpu|cuda", self.device
        )
        _require(self.amp in ("off", "bf16", "fp16"), "amp must be off|bf16|fp16", self.amp)
        _require(
            self.cuda_graphs in ("auto", "on", "off"),
            "cuda_graphs must be auto|on|off",
            self.cuda_graphs,
        )
        if self.pos_weight is not None:
            _require(self.pos_weight > 0, "pos_weight must be > 0", self.pos_weight)


@dataclass(frozen=True)
class GBDTConfig:
    n_estimators: int = 600
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 50
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    early_stopping_rounds: int = 50
    num_threads: int = 0  # 0: LightGBM's default (all cores)


@dataclass(frozen=True)
class TransformerConfig:
    """``--model transformer`` (fraudflow.models.sequence): small enough to train on CPU."""

    # Events per row: the card's previous sequence_length - 1 and the current one.
    sequence_length: int = 32
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    feedforward_dim: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _require(self.sequence_length >= 1, "sequence_length must be >= 1", self.sequence_length)
        _require(self.n_layers >= 1, "n_layers must be >= 1", self.n_layers)
        _require(self.n_heads >= 1, "n_heads must be >= 1", self.n_heads)
        _require(
            self.d_model >= 1 and self.d_model % self.n_heads == 0,
            f"d_model must be a positive multiple of n_heads ({self.n_heads})",
            self.d_model,
        )
        _require(self.feedforward_dim >= 1, "feedforward_dim must be >= 1", self.feedforward_dim)
        _require(0 <= self.dropout < 1, "dropout must be in [0, 1)", self.dropout)


@dataclass(frozen=True)
class GNNConfig:
    """``--model gnn`` (fraudflow.models.gnn): GraphSAGE over the customer-terminal graph."""

    # Edges sampled per node, most recent first: the card's and the terminal's last
    # fanout_hop1 transactions, then each of those neighbours' last fanout_hop2.
    fanout_hop1: int = 8
    fanout_hop2: int = 4
    embedding_size: int = 32  # of the card and terminal embeddings
    hidden_sizes: tuple[int, ...] = (128, 64)  # the head over [features, embeddings]
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _require(self.fanout_hop1 >= 1, "fanout_hop1 must be >= 1", self.fanout_hop1)
        _require(self.fanout_hop2 >= 1, "fanout_hop2 must be >= 1", self.fanout_hop2)
        _require(self.embedding_size >= 1, "embedding_size must be >= 1", self.embedding_size)
        _require(0 <= self.dropout < 1, "dropout must be in [0, 1)", self.dropout)


@dataclass(frozen=True)
class ModelConfig:
    """Settings of one model each (``[model.transformer]`` in a preset); the MLP's are in
    ``train`` and LightGBM's in ``gbdt``, where they were before this section existed."""

    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    gnn: GNNConfig = field(default_factory=GNNConfig)


@dataclass(frozen=True)
class RunConfig:
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gbdt: GBDTConfig = field(default_factory=GBDTConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (dates as ISO strings, tuples as lists)."""
    return _jsonable(dataclasses.asdict(cfg))


def load_run_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from an optional TOML preset, then ``section.field=value`` overrides."""
    cfg = RunConfig()
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        cfg = _merge(cfg, raw, prefix="")
    return apply_overrides(cfg, overrides or [])


def run_config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from ``to_dict``'s output (or part of it: missing sections keep defaults)."""
    merged: RunConfig = _merge(RunConfig(), raw, prefix="")
    return merged


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``section.field=value``; nested sections too (``model.transformer.d_model=32``)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set expects section.field=value, however got {item!r}")
        nested: Any = _parse_scalar(value.strip())
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        cfg = _merge(cfg, nested, prefix="")
    return cfg


def _merge(cfg: Any, raw: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {prefix + name!r}; expected one of: {known}")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix + name!r} must be a table")
            changes[name] = _merge(current, value, prefix=f"{prefix}{name}.")
        else:
            changes[name] = _coerce(value, hints[name], prefix + name)
    try:
        return dataclasses.replace(cfg, **changes)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if (value is None or value == "none") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, however got {value!r}")
        return value
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        return tuple(_coerce(v, args[0], key) for v in items)
    try:
        if hint is date:
            return value if isinstance(value, date) else date.fromisoformat(str(value))
        if hint is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {hint.__name__}, however got {value!r}") from None


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, date):
        return obj.isoformat()
    return obj


def _require(ok: bool, rule: str, found: object) -> None:
    if not ok:
        raise ConfigError(f"{rule}, however got {found!r}")
