"""The model bundle: everything needed to score new feature rows, and nothing else.

    RUN_DIR/model/
        meta.json      model name, feature list and version, standardiser, model config,
                       the score calibration fitted on the validation period, and the codes
                       of the categorical features ("categories", where there are any)
        weights.pt     neural models: the state dict
        model.txt      LightGBM: the booster
        manifest.json  the SHA-256 of each file above; written last

``load_bundle`` rebuilds the model through the same registry the trainer used, from the
recorded config (``train_config``, ``model_config``); meta.json also records what the model
declares it consumes (``inputs``). Feature rows reach a model whose rows stand alone through
``Bundle.model_matrix``: raw categorical values become the codes the model learned
(``fraudflow.features.categories``), so callers pass the values as logged. A model that reads
each card's earlier rows scores a frame of feature rows in arrival order
(``Bundle.predict_frame``), whose inputs ``fraudflow.inputs`` builds as in training.

A bundle is verified whenever it is read: every file against its recorded SHA-256, the model
built from the very bytes that were checked (a file swapped in between cannot slip in), and
the features against what this build computes (``FEATURE_VERSION``, the names the bundle's
feature spec defines). ``check_run`` adds the run's ``DONE`` marker and builds nothing:
what the service requires of a run before it loads it. Failures are ``RunCheckError``s whose
``check`` names which check failed.

Bundles saved before manifests existed are refused rather than served unverified: the hashes
exist to catch a damaged or replaced file, and a bundle without them is exactly one the check
cannot clear. ``seal_bundle`` (``fraudflow runs seal``) records the hashes of files one trusts.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl
import torch

from fraudflow.config import FeatureConfig, run_config_from_dict
from fraudflow.errors import ArtifactError, FraudflowError, RunCheckError
from fraudflow.eval.calibration import Calibrator
from fraudflow.features.categories import CategoryCodes, matrix_from_rows
from fraudflow.features.default_spec import default_spec
from fraudflow.features.spec import FeatureSpec, parse_spec
from fraudflow.features.spec_online import online_problem
from fraudflow.features.specs import FEATURE_VERSION
from fraudflow.files import atomic_path, write_bytes_atomic, write_json_atomic
from fraudflow.inputs import FeatureInputs, build_arrays, stands_alone
from fraudflow.models import (
    NEURAL_MODELS,
    Categorical,
    Estimator,
    FeatureLayout,
    InputSpec,
    NeuralModel,
    SequenceInputs,
    Standardizer,
    VectorInputs,
    build_model,
    input_spec_from_dict,
    neural_inputs,
    predict_batch_rows,
)

__all__ = [
    "BUNDLE_DIR",
    "DONE",
    "MANIFEST",
    "Bundle",
    "check_run",
    "feature_config_of",
    "feature_spec_of",
    "load_bundle",
    "save_bundle",
    "seal_bundle",
]

BUNDLE_DIR = "model"
DONE = "DONE"  # written last into a run folder: the run is complete
MANIFEST = "manifest.json"
_META = "meta.json"
_WEIGHTS = "weights.pt"
_BOOSTER = "model.txt"
_BUNDLE_FILES = (_META, _WEIGHTS, _BOOSTER)  # what a manifest may name
_SCORE_BATCH = 65_536


@dataclass
class Bundle:
    meta: dict[str, Any]
    model: NeuralModel | lgb.Booster
    standardizer: Standardizer | None

    @property
    def features(self) -> list[str]:
        return list(self.meta["features"])

    @cached_property
    def codes(self) -> CategoryCodes | None:
        """The categorical features' codes; None when every feature is numeric."""
        return _codes_of(self.meta)

    @cached_property
    def categorical(self) -> tuple[Categorical, ...]:
        """Where the categorical features sit in the model matrix, and their cardinalities."""
        return _categorical_of(self.meta)

    @cached_property
    def inputs(self) -> InputSpec:
        """What the model consumes; bundles from before declarations held vector models."""
        return _inputs_of(self.meta)

    def model_matrix(self, rows: Any) -> np.ndarray:
        """The model matrix (N, F) float64 of raw feature rows (N, F) in ``features`` order:
        numbers (None or NaN: missing) and, in the categorical columns, the raw values (a
        value not seen in training, or null, gets the unseen code). What ``predict`` scores;
        for a bundle without categorical features, the rows as floats."""
        matrix = matrix_from_rows(rows, self.features, self.codes)
        if matrix.ndim != 2 or matrix.shape[1] != len(self.features):
            raise ArtifactError(
                f"the bundle expects {len(self.features)} features per row, "
                f"however got shape {matrix.shape}"
            )
        return matrix

    @property
    def calibrator(self) -> Calibrator:
        """The run's Platt scaling; the identity for bundles saved before calibration existed."""
        raw = self.meta.get("calibration")
        if not raw:
            return Calibrator()
        try:
            return Calibrator.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"the bundle's calibration {raw!r} is unreadable: {exc}") from None

    def predict_calibrated(self, x: Any) -> np.ndarray:
        """Calibrated fraud probabilities (N,) for raw feature rows x (N, F): what the service
        answers. Same ranking as ``predict`` (the calibration is increasing)."""
        return self.calibrator.apply(self.predict(x))

    def predict(self, x: Any) -> np.ndarray:
        """Raw model scores (N,) in [0, 1] for raw feature rows x (N, F) in ``features`` order
        (see ``model_matrix``).

        Class weighting distorts them as probabilities: see ``predict_calibrated``.
        """
        if not stands_alone(self.inputs):
            raise ArtifactError(
                f"model {self.meta['model']!r} reads each card's earlier events "
                f"({self.inputs.kind} inputs), not feature rows alone: score a frame of the "
                "table's rows with Bundle.predict_frame"
            )
        matrix = self.model_matrix(x)
        if isinstance(self.model, lgb.Booster):
            return np.asarray(self.model.predict(matrix), dtype=np.float64)
        return self._predict_neural(torch.as_tensor(matrix, dtype=torch.float32))

    def predict_frame(self, frame: pl.DataFrame) -> np.ndarray:
        """Raw model scores (N,) of every row of ``frame``: feature rows in arrival order, as a
        feature table holds them (categorical columns with their raw values). For a model that
        reads each card's earlier events the frame also needs ``customer_id`` and
        ``timestamp``, and a row's inputs come from the rows before it in the frame."""
        inputs = FeatureInputs(self.features, self.codes)
        if isinstance(self.model, lgb.Booster):
            return np.asarray(self.model.predict(inputs.matrix(frame)), dtype=np.float64)
        assert self.standardizer is not None
        arrays = build_arrays(self.inputs, frame, inputs, self.standardizer)
        module: Any = self.model
        module.eval()
        parts = []
        step = predict_batch_rows(module)
        with torch.no_grad():
            for start in range(0, frame.height, step):
                rows = torch.arange(start, min(start + step, frame.height))
                batch = arrays.take(rows)
                logits = module(batch.rows | batch.shared)  # (B, 2)
                parts.append(torch.softmax(logits.float(), dim=1)[:, 1])
        return torch.cat(parts).double().numpy() if parts else np.zeros(0)

    @torch.no_grad()
    def _predict_neural(self, x: torch.Tensor) -> np.ndarray:
        assert self.standardizer is not None
        module: Any = self.model
        module.eval()
        parts = []
        for start in range(0, x.shape[0], _SCORE_BATCH):
            inputs = neural_inputs(
                x[start : start + _SCORE_BATCH], self.categorical, self.standardizer
            )
            parts.append(torch.softmax(module(inputs).float(), dim=1)[:, 1])
        return torch.cat(parts).double().numpy() if parts else np.zeros(0)


def save_bundle(
    run_dir: Path,
    *,
    model: NeuralModel | Estimator,
    meta: dict[str, Any],
    standardizer: Standardizer | None,
) -> None:
    folder = Path(run_dir) / BUNDLE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = [_META]
    if isinstance(model, Estimator):
        with atomic_path(folder / _BOOSTER) as tmp:
            model.save(tmp)
        written.append(_BOOSTER)
    else:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        write_bytes_atomic(folder / _WEIGHTS, buffer.getvalue())
        written.append(_WEIGHTS)
    full = dict(meta)
    full["standardizer"] = standardizer.to_dict() if standardizer is not None else None
    write_json_atomic(folder / _META, full)
    _write_manifest(folder, written)  # last: a bundle with a manifest is whole


def seal_bundle(run_dir: Path) -> list[str]:
    """Record the SHA-256 of each file of the bundle in ``run_dir`` as it is now; the names.

    Only for files one trusts: bundles saved before fraudflow recorded hashes
    (``save_bundle`` records those of the files it writes).
    """
    folder = Path(run_dir) / BUNDLE_DIR
    names = [name for name in _BUNDLE_FILES if (folder / name).is_file()]
    if _META not in names:
        raise ArtifactError(f"model bundle {folder / _META} does not exist; is {run_dir} a run?")
    _write_manifest(folder, names)
    return names


def _write_manifest(folder: Path, names: list[str]) -> None:
    hashes = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}
    write_json_atomic(folder / MANIFEST, {"sha256": hashes})


def check_run(run_dir: Path) -> dict[str, Any]:
    """Every check a run must pass before it may serve, short of building its model: the
    folder, its ``DONE`` marker, each bundle file's SHA-256, the features. The bundle's meta."""
    _require_done(Path(run_dir))
    folder = Path(run_dir) / BUNDLE_DIR
    meta = _parse_meta(_verified_files(folder)[_META], folder / _META)
    _check_features(meta, folder, serving=True)
    return meta


def feature_config_of(meta: dict[str, Any]) -> FeatureConfig:
    """The feature config a bundle was trained with."""
    raw = meta.get("feature_config")
    if not isinstance(raw, dict):
        raise ArtifactError(f"the bundle's feature_config must be an object, however got {raw!r}")
    return FeatureConfig(**_tuples(raw))


def load_bundle(run_dir: Path, *, completed: bool = False) -> Bundle:
    """The verified bundle of ``run_dir`` (see the module docstring). ``completed``: the run's
    ``DONE`` marker is required too (what the service serves); a run's own code may read its
    bundle before it completes."""
    if completed:
        _require_done(Path(run_dir))
    folder = Path(run_dir) / BUNDLE_DIR
    files = _verified_files(folder)
    meta = _parse_meta(files[_META], folder / _META)
    _check_features(meta, folder, serving=completed)
    if meta["model"] not in NEURAL_MODELS:
        return Bundle(meta=meta, model=_booster(files, folder), standardizer=None)
    cfg = run_config_from_dict(
        {"train": meta["train_config"], "model": meta.get("model_config") or {}}
    )
    layout = FeatureLayout(len(meta["features"]), _categorical_of(meta))
    model = build_model(meta["model"], layout=layout, cfg=cfg)
    if not isinstance(model, NeuralModel):
        raise ArtifactError(f"model {meta['model']!r} in {folder} is not a neural model")
    if model.inputs != _inputs_of(meta):
        raise ArtifactError(
            f"model {meta['model']!r} in {folder} records the inputs {meta.get('inputs')!r}, "
            f"however its config builds a model that declares {model.inputs.to_dict()!r}"
        )
    weights = _recorded(files, _WEIGHTS, folder)
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ArtifactError(f"weights {folder / _WEIGHTS} cannot be loaded: {exc}") from None
    return Bundle(meta=meta, model=model, standardizer=Standardizer.from_dict(meta["standardizer"]))


def _require_done(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise RunCheckError("run_missing", f"run folder {run_dir} does not exist")
    if not (run_dir / DONE).is_file():
        raise RunCheckError(
            "not_done",
            f"run {run_dir} has no {DONE} marker: its training did not finish (it failed, was "
            "stopped, or is still running); serve a completed run",
        )


def _booster(files: dict[str, bytes], folder: Path) -> lgb.Booster:
    text = _recorded(files, _BOOSTER, folder)
    try:
        return lgb.Booster(model_str=text.decode())
    except (lgb.basic.LightGBMError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"model file {folder / _BOOSTER} cannot be loaded: {exc}") from None


def _recorded(files: dict[str, bytes], name: str, folder: Path) -> bytes:
    if name not in files:
        raise RunCheckError(
            "file_missing", f"model file {folder / name} is not recorded in {folder / MANIFEST}"
        )
    return files[name]


def _verified_files(folder: Path) -> dict[str, bytes]:
    """The bundle's files by name, each read once and checked against the manifest."""
    if not (folder / _META).is_file():
        raise RunCheckError(
            "bundle_missing",
            f"model bundle {folder / _META} does not exist; was the run completed?",
        )
    files = {}
    for name, expected in _manifest(folder).items():
        try:
            data = (folder / name).read_bytes()
        except FileNotFoundError:
            raise RunCheckError(
                "file_missing", f"bundle file {folder / name} is recorded in {MANIFEST} but missing"
            ) from None
        found = hashlib.sha256(data).hexdigest()
        if found != expected:
            raise RunCheckError(
                "hash_mismatch",
                f"bundle file {folder / name} does not match its recorded SHA-256: expected "
                f"{expected}, however found {found} (the file changed after it was saved)",
            )
        files[name] = data
    return files


def _manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RunCheckError(
            "unsealed",
            f"model bundle {folder} records no SHA-256 of its files ({MANIFEST} is missing): it "
            "was saved before fraudflow recorded them, or copied without it. Retrain the run, "
            f"or, if you trust its files, record their hashes: fraudflow runs seal {folder.parent}",
        ) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both
        raise RunCheckError("manifest", f"{path} is not valid JSON: {exc}") from None
    hashes = raw.get("sha256") if isinstance(raw, dict) else None
    if (
        not isinstance(hashes, dict)
        or _META not in hashes
        or not all(
            name in _BUNDLE_FILES and isinstance(digest, str) for name, digest in hashes.items()
        )
    ):
        raise RunCheckError(
            "manifest",
            f"{path} must map bundle files ({', '.join(_BUNDLE_FILES)}, {_META} among them) to "
            f'their SHA-256 under "sha256", however it holds {raw!r:.200}',
        )
    return dict(hashes)


def _codes_of(meta: dict[str, Any]) -> CategoryCodes | None:
    raw = meta.get("categories")
    if raw is None:
        return None
    try:
        return CategoryCodes.from_dict(raw)
    except (FraudflowError, TypeError) as exc:
        raise ArtifactError(f"the bundle's category codes are unreadable: {exc}") from None


def _inputs_of(meta: dict[str, Any]) -> InputSpec:
    raw = meta.get("inputs")
    if raw is None:
        return VectorInputs()
    if not isinstance(raw, dict):
        raise ArtifactError(f"the bundle's inputs must be an object, however got {raw!r}")
    return input_spec_from_dict(raw)


def _categorical_of(meta: dict[str, Any]) -> tuple[Categorical, ...]:
    codes = _codes_of(meta)
    if codes is None:
        return ()
    features = list(meta["features"])
    missing = [c for c in codes.columns if c not in features]
    if missing:
        raise ArtifactError(
            f"the bundle has category codes for {missing[0]!r}, however it is not one of its "
            f"features {features!r:.300}"
        )
    return tuple(Categorical(features.index(c), codes.cardinality(c)) for c in codes.columns)


def _check_features(meta: dict[str, Any], folder: Path, *, serving: bool) -> None:
    """The bundle's features must be the ones this build computes, by version and by name:
    the default spec's for its feature config, or those of the spec it records. ``serving``:
    the spec must be one the service computes online (``online_problem``)."""
    found = meta.get("feature_version")
    if found != FEATURE_VERSION:
        raise RunCheckError(
            "feature_version",
            f"model bundle {folder} was trained on feature version {found!r}, however this "
            f"fraudflow computes version {FEATURE_VERSION!r}: retrain it on a feature table "
            "built by this version (`fraudflow features`, then `fraudflow train`)",
        )
    try:
        spec = feature_spec_of(meta)
    except (FraudflowError, TypeError, ValueError) as exc:
        raise RunCheckError(
            "feature_spec",
            f"model bundle {folder} has a feature spec or config this build cannot use: {exc}",
        ) from None
    spec_hash = meta.get("feature_spec_hash")
    if spec_hash is not None and spec_hash != spec.hash:
        raise RunCheckError(
            "feature_spec",
            f"model bundle {folder} records the feature spec hash {spec_hash[:12]}, however its "
            f"recorded spec hashes to {spec.hash[:12]} (the spec was edited after training)",
        )
    if meta.get("features") != spec.feature_names:
        raise RunCheckError(
            "feature_spec",
            f"model bundle {folder} expects features {meta.get('features')!r:.400}, however "
            f"its feature spec computes {spec.feature_names}",
        )
    try:
        codes = _codes_of(meta)
    except ArtifactError as exc:
        raise RunCheckError("feature_spec", f"model bundle {folder}: {exc}") from None
    uncoded = [name for name in spec.categorical if codes is None or name not in codes.values]
    if uncoded:
        raise RunCheckError(
            "feature_spec",
            f"model bundle {folder} has the categorical feature {uncoded[0]!r}, however no "
            "codes for it (meta.json: categories), which training stores: retrain the run",
        )
    problem = online_problem(spec) if serving else None
    if problem is not None:  # refused at start and at reload, before anything is loaded
        raise RunCheckError(
            "feature_spec", f"model bundle {folder} cannot be served: its feature spec's {problem}"
        )
    if serving:
        _check_served_inputs(meta, folder)


def _check_served_inputs(meta: dict[str, Any], folder: Path) -> None:
    """The service builds each request's own feature vector and a card's last events
    (``fraudflow.serve.sequence_scoring``), not yet a graph neighbourhood."""
    try:
        declared = _inputs_of(meta)
    except ArtifactError as exc:
        raise RunCheckError("meta", f"model bundle {folder}: {exc}") from None
    if not isinstance(declared, VectorInputs | SequenceInputs):
        raise RunCheckError(
            "model_kind",
            f"model bundle {folder} cannot be served: model kind {meta['model']!r} reads "
            f"earlier transactions ({declared.kind} inputs) the service does not build yet; "
            "serve an mlp, gbdt or transformer run",
        )


def feature_spec_of(meta: dict[str, Any]) -> FeatureSpec:
    """The feature spec a bundle was trained with; for bundles from before specs (no
    ``feature_spec``), the default spec of their feature config, which they were built with."""
    raw = meta.get("feature_spec")
    if raw is None:
        return default_spec(feature_config_of(meta))
    if not isinstance(raw, dict):
        raise ArtifactError(f"the bundle's feature_spec must be an object, however got {raw!r}")
    return parse_spec(raw)


def _parse_meta(data: bytes, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(data)
    except ValueError as exc:
        raise RunCheckError("meta", f"model bundle {path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise RunCheckError("meta", f"model bundle {path} must be an object naming its model")
    return meta


def _tuples(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
