"""One training run: feature table in, run folder out.

    RUN_DIR/
        config.json         the resolved config, the feature table it read, the periods
        feature_spec.toml   the spec the features were built with (tables that record one)
        checkpoints/        best.pt and last.pt (neural models)
        model/              the model bundle (see fraudflow.artifacts)
        predictions.parquet one row per test-period transaction
        validation_predictions.parquet  the same for the validation period (policy thresholds)
        metrics.json        test metrics plus training speed; per_scenario when the input
                            names each fraud's scenario (fraudflow.eval.scenarios)
        report.html         curves and tables for this run
        DONE                written last: the run is complete

Each file is written atomically. The LightGBM baseline goes through the same split,
prediction and metrics path as the neural models.

Categorical features get integer codes learned on the fit rows only
(``fraudflow.features.categories``), stored in the bundle; the model is told their positions
and cardinalities.

The model declares its inputs (``fraudflow.models.interface``) and ``fraudflow.inputs`` builds
them: from each period's rows for a model whose rows stand alone, from the whole table (each
card's earlier rows) otherwise, then taken at the period's row positions.

Scores: ``score`` in both prediction tables is the calibrated fraud probability, Platt scaling
fitted on the validation period (``fraudflow.eval.calibration``, stored in the bundle);
``raw_score`` is the model's own output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import torch

from fraudflow.artifacts import DONE, save_bundle
from fraudflow.config import RunConfig, to_dict
from fraudflow.data.io import write_table
from fraudflow.data.schema import (
    CUSTOMER_ID,
    FRAUD_SCENARIO,
    IS_FRAUD,
    TIMESTAMP,
    TRANSACTION_ID,
)
from fraudflow.data.splits import KNOWN_COMPROMISED, LazySplit, in_period, split_lazy
from fraudflow.errors import ConfigError
from fraudflow.eval.calibration import Calibrator, calibration_summary, fit_calibrator
from fraudflow.eval.metrics import drop_known_compromised, metrics_from_predictions
from fraudflow.eval.report import write_report
from fraudflow.eval.scenarios import scenario_metrics
from fraudflow.eval.thresholds import VALIDATION_PREDICTIONS
from fraudflow.features import FeatureSource, open_feature_source, parse_spec, spec_to_toml
from fraudflow.features.categories import CategoryCodes
from fraudflow.files import write_json_atomic, write_text_atomic
from fraudflow.inputs import FeatureInputs, ModelArrays, build_arrays, stands_alone
from fraudflow.models import (
    Estimator,
    InputSpec,
    NeuralModel,
    Standardizer,
    build_model,
    numeric_columns,
)
from fraudflow.tracking import FEATURE_SPEC_FILE
from fraudflow.train.device import check_amp, resolve_device
from fraudflow.train.distributed import DistContext, single_process
from fraudflow.train.loop import LoopObserver, TensorData, TrainingRows, fit, predict_scores
from fraudflow.train.shards import ShardRows, fit_standardizer

__all__ = ["DONE", "RunOutcome", "train_run"]

CHECKPOINTS = "checkpoints"
_ROW = "__row"  # a row's position in a one-file feature table


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    metrics: dict[str, Any]


def _inputs(table: FeatureSource, split: LazySplit) -> FeatureInputs:
    """Codes learned on the fit rows only: validation and test values count as unseen."""
    caps = table.categorical
    codes = CategoryCodes.fit(split.fit, caps) if caps else None
    return FeatureInputs(features=table.feature_names, codes=codes)


@dataclass(frozen=True)
class _Scores:
    """Raw model scores of the test and validation periods, (N_test,) and (N_valid,)."""

    test: np.ndarray
    valid: np.ndarray


def train_run(
    features_path: Path,
    run_dir: Path,
    cfg: RunConfig,
    *,
    resume: bool = False,
    observer: LoopObserver | None = None,
    dist_ctx: DistContext | None = None,
) -> RunOutcome:
    """Train and evaluate one model. Under DDP every rank calls this; only rank 0 writes files
    and returns metrics (the others return an outcome with empty metrics)."""
    run_dir = Path(run_dir)
    dist_ctx = dist_ctx or single_process(resolve_device(cfg.train.device))
    _check_run_dir(run_dir, resume)
    table = open_feature_source(features_path)
    _check_no_label_features(table.feature_names)
    split = split_lazy(_scan(table), cfg.split, label_delay_days=table.label_delay_days)
    if resume:
        _check_same_config(run_dir, cfg)
    dist_ctx.barrier()  # every rank has checked the folder before rank 0 writes into it
    if dist_ctx.is_main:
        config = _resolved_config(cfg, features_path, table, split)
        write_json_atomic(run_dir / "config.json", config | {"world_size": dist_ctx.world_size})
        _write_spec(run_dir, table)
    inputs = _inputs(table, split)
    model = build_model(cfg.train.model, layout=inputs.layout, cfg=cfg)
    _check_buildable(model.inputs, cfg.train.model, table)
    started = time.perf_counter()
    if isinstance(model, Estimator):
        if dist_ctx.enabled:
            raise ConfigError("--ddp trains neural models; LightGBM runs in one process")
        scores, stats = _fit_estimator(model, split.fit.collect(), split, inputs)
    else:
        neural = _NeuralJob(split, table, inputs, cfg, run_dir, resume, observer, dist_ctx)
        scores, stats = _fit_neural(model, neural)
    if not dist_ctx.is_main:
        return RunOutcome(run_dir=run_dir, metrics={})
    stats.setdefault("train_seconds", time.perf_counter() - started)
    # Fitted on validation, never test: the test metrics stay those of unseen data.
    calibrator = fit_calibrator(scores.valid, _labels(split.valid))
    categories = {} if inputs.codes is None else {"categories": inputs.codes.to_dict()}
    meta = _bundle_meta(cfg, table) | categories | {"calibration": calibrator.to_dict()}
    save_bundle(
        run_dir,
        model=model,
        meta=meta | {"inputs": model.inputs.to_dict()},
        standardizer=stats.pop("standardizer", None),
    )
    return _finish(run_dir, cfg, split, scores, stats, calibrator)


def _scan(table: FeatureSource) -> pl.LazyFrame:
    """The table with, for one file, each row's position in it: where a model that reads a
    card's earlier rows finds a period's rows (``_period_arrays``)."""
    return table.scan() if table.sharded else table.scan().with_row_index(_ROW)


def _check_buildable(declared: InputSpec, model: str, table: FeatureSource) -> None:
    if table.sharded and not stands_alone(declared):
        raise ConfigError(
            f"--model {model} reads each card's earlier rows ({declared.kind} inputs), which a "
            "folder of shards streamed one at a time cannot give; pass the table as one file"
        )


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if resume or not run_dir.exists() or not any(run_dir.iterdir()):
        return
    raise ConfigError(
        f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
    )


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """A resumed run must continue the same experiment; only the epoch budget may grow."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    wanted = to_dict(cfg)
    for section in ("split", "train", "gbdt", "model"):
        if section not in stored:  # a run from before the section existed
            continue
        old = {k: v for k, v in stored[section].items() if k != "epochs"}
        new = {k: v for k, v in wanted[section].items() if k != "epochs"}
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            raise ConfigError(
                f"--resume must use the run's own settings, however {section}."
                f"{', '.join(changed)} differ from {path}"
            )


def _check_no_label_features(features: list[str]) -> None:
    # The last guard before the training matrix: the feature layer refuses specs that read
    # labels, but a table's feature list may have been written by other means.
    labels = [name for name in features if name in (IS_FRAUD, FRAUD_SCENARIO)]
    if labels:
        raise ConfigError(
            f"the feature table lists label columns as features: {labels}; features must not "
            "read labels"
        )


def _labels(frame: pl.DataFrame) -> np.ndarray:
    return frame[IS_FRAUD].to_numpy().astype(np.int64)  # (N,)


def _fit_estimator(
    model: Estimator, fit_rows: pl.DataFrame, split: LazySplit, inputs: FeatureInputs
) -> tuple[_Scores, dict[str, Any]]:
    started = time.perf_counter()
    model.fit(
        inputs.matrix(fit_rows),
        _labels(fit_rows),
        inputs.matrix(split.valid),
        _labels(split.valid),
    )
    seconds = time.perf_counter() - started
    rounds = int(getattr(model, "best_iteration_", 1))
    # Samples/s counts one pass over the fit rows per boosting round, like one epoch.
    stats = {
        "train_seconds": seconds,
        "train_samples_per_second": fit_rows.height * rounds / seconds,
        "best_iteration": rounds,
    }
    test, valid = (model.predict_proba(inputs.matrix(f)) for f in (split.test, split.valid))
    return _Scores(test=test, valid=valid), stats


@dataclass(frozen=True)
class _NeuralJob:
    split: LazySplit
    table: FeatureSource
    inputs: FeatureInputs
    cfg: RunConfig
    run_dir: Path
    resume: bool
    observer: LoopObserver | None
    dist_ctx: DistContext


def _fit_neural(model: NeuralModel, job: _NeuralJob) -> tuple[_Scores, dict[str, Any]]:
    cfg, device = job.cfg, job.dist_ctx.device
    check_amp(cfg.train.amp, device)
    features = job.table.feature_names
    train, valid, test, standardizer = _neural_data(model.inputs, job)
    if cfg.train.compile:
        # Module.compile keeps the module and its state_dict keys: checkpoints stay portable.
        cast(Any, model).compile()
    extra = {"features": features, "standardizer": standardizer.to_dict(), "config": to_dict(cfg)}
    result = fit(
        model, train, valid, cfg.train, dist_ctx=job.dist_ctx,
        checkpoint_dir=job.run_dir / CHECKPOINTS, resume=job.resume, extra_state=extra,
        observer=job.observer,
    )  # fmt: skip
    stats: dict[str, Any] = {
        "train_seconds": result.train_seconds,
        "train_samples_per_second": result.samples_per_second,
        "best_epoch": result.best_epoch,
        "validation_average_precision": result.best_valid_average_precision,
        "epochs_run": result.next_epoch,
        "device": str(device),
        "world_size": job.dist_ctx.world_size,
        "amp": cfg.train.amp,
        "backoffs": result.backoffs,
        "cuda_graph_captures": result.cuda_graph_captures,
        "standardizer": standardizer,
    }
    test_scores, valid_scores = (
        predict_scores(model, data.to(device), amp=cfg.train.amp, device=device)
        for data in (test, valid)
    )
    return _Scores(test=test_scores, valid=valid_scores), stats


def _neural_data(
    declared: InputSpec, job: _NeuralJob
) -> tuple[TrainingRows, TensorData, TensorData, Standardizer]:
    """Fit, validation and test rows of what the model declares, and the standardiser fitted
    on the fit rows. Fit rows stream shard by shard for a folder of shards."""
    inputs, split = job.inputs, job.split
    if job.table.sharded:
        period = in_period(split.periods.train_start, split.periods.valid_start)
        shards = [pl.scan_parquet(f).filter(period) for f in job.table.files]
        standardizer = fit_standardizer(shards, inputs.numeric)
        train: TrainingRows = ShardRows(shards, inputs, standardizer, declared)
        valid, test = (
            _own_arrays(declared, f, inputs, standardizer) for f in (split.valid, split.test)
        )
        return train, valid, test, standardizer
    fit_rows = split.fit.collect()
    matrix = torch.from_numpy(inputs.matrix(fit_rows))
    standardizer = Standardizer.fit(numeric_columns(matrix, inputs.layout.categorical))
    if stands_alone(declared):
        fit, valid, test = (
            _own_arrays(declared, f, inputs, standardizer)
            for f in (fit_rows, split.valid, split.test)
        )
        return fit, valid, test, standardizer
    whole = build_arrays(declared, job.table.scan().collect(), inputs, standardizer)
    fit, valid, test = (_period_arrays(whole, f) for f in (fit_rows, split.valid, split.test))
    return fit, valid, test, standardizer


def _own_arrays(
    declared: InputSpec, frame: pl.DataFrame, inputs: FeatureInputs, standardizer: Standardizer
) -> TensorData:
    """A period's inputs from its own rows (a model whose rows stand alone)."""
    arrays = build_arrays(declared, frame, inputs, standardizer)
    return TensorData(inputs=arrays.rows, labels=torch.from_numpy(_labels(frame)))


def _period_arrays(whole: ModelArrays, frame: pl.DataFrame) -> TensorData:
    """A period's rows of the inputs built over the whole table, at their positions in it."""
    taken = whole.take(torch.from_numpy(frame[_ROW].to_numpy().astype(np.int64)))
    return TensorData(taken.rows, torch.from_numpy(_labels(frame)), shared=taken.shared)


def _predictions(
    frame: pl.DataFrame, raw: np.ndarray, calibrator: Calibrator, *extra: str
) -> pl.DataFrame:
    """Ids, label, the calibrated ``score``, the ``extra`` columns, then ``raw_score``."""
    return frame.select(
        TRANSACTION_ID,
        CUSTOMER_ID,
        TIMESTAMP,
        pl.col(IS_FRAUD).cast(pl.Int8),
        pl.Series("score", calibrator.apply(raw), dtype=pl.Float64),
        *extra,
        pl.Series("raw_score", raw, dtype=pl.Float64),
    )


def _calibration_metrics(predictions: pl.DataFrame) -> dict[str, float]:
    """ECE of the calibrated and raw test scores, on the rows every other metric counts."""
    rows = drop_known_compromised(predictions)
    return calibration_summary(rows[IS_FRAUD], rows["raw_score"], rows["score"])


def _finish(
    run_dir: Path,
    cfg: RunConfig,
    split: LazySplit,
    scores: _Scores,
    stats: dict[str, Any],
    calibrator: Calibrator,
) -> RunOutcome:
    named = [FRAUD_SCENARIO] if FRAUD_SCENARIO in split.test.columns else []
    predictions = _predictions(split.test, scores.test, calibrator, KNOWN_COMPROMISED, *named)
    metrics = {"model": cfg.train.model, **metrics_from_predictions(predictions), **stats}
    metrics |= _calibration_metrics(predictions)
    metrics["periods"] = split.periods.as_dict()
    metrics["n_known_compromised_excluded"] = int(predictions[KNOWN_COMPROMISED].sum())
    validation = _predictions(split.valid, scores.valid, calibrator)
    if named:
        metrics |= scenario_metrics(predictions, validation)
    write_table(validation, run_dir / VALIDATION_PREDICTIONS)
    write_table(predictions, run_dir / "predictions.parquet")
    write_json_atomic(run_dir / "metrics.json", metrics)
    write_report([run_dir], run_dir / "report.html", title=f"fraudflow run {run_dir.name}")
    write_text_atomic(run_dir / DONE, "ok\n")
    return RunOutcome(run_dir=run_dir, metrics=metrics)


def _write_spec(run_dir: Path, table: FeatureSource) -> None:
    """The feature spec beside config.json, as the TOML a user can edit and rebuild with."""
    raw = table.meta.get("feature_spec")
    if raw is not None:
        write_text_atomic(run_dir / FEATURE_SPEC_FILE, spec_to_toml(parse_spec(raw)))


def _bundle_meta(cfg: RunConfig, table: FeatureSource) -> dict[str, Any]:
    return {
        "model": cfg.train.model,
        "features": table.feature_names,
        "feature_version": table.meta["feature_version"],
        "feature_config": table.meta["feature_config"],
        # The spec the features were built with (tables from before specs record none).
        "feature_spec": table.meta.get("feature_spec"),
        "feature_spec_hash": table.meta.get("feature_spec_hash"),
        "train_config": to_dict(cfg.train),
        "model_config": to_dict(cfg.model),
    }


def _resolved_config(
    cfg: RunConfig, features_path: Path, table: FeatureSource, split: LazySplit
) -> dict[str, Any]:
    return {
        **to_dict(cfg),
        "features_path": str(Path(features_path).resolve()),
        "feature_version": table.meta["feature_version"],
        "feature_config": table.meta["feature_config"],
        "feature_spec_hash": table.meta.get("feature_spec_hash"),
        "features": table.feature_names,
        "periods": split.periods.as_dict(),
        "rows": {"valid": split.valid.height, "test": split.test.height},
        "shards": len(table.files) if table.sharded else 0,
    }
