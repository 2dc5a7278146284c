"""The model bundle: everything needed to score new feature rows, and nothing else.

    RUN_DIR/model/
        meta.json      model name, feature list and version, standardiser, model config,
                       and the score calibration fitted on the validation period
        weights.pt     neural models: the state dict
        model.txt      LightGBM: the booster

``load_bundle`` rebuilds the model through the same registry the trainer used.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import torch

from fraudflow.config import GBDTConfig, TrainConfig
from fraudflow.errors import ArtifactError
from fraudflow.eval.calibration import Calibrator
from fraudflow.files import atomic_path, write_bytes_atomic, write_json_atomic
from fraudflow.models import GBDT, NEURAL_MODELS, Standardizer, build_model
from fraudflow.models.interface import Estimator, NeuralModel

__all__ = ["BUNDLE_DIR", "Bundle", "load_bundle", "save_bundle"]

BUNDLE_DIR = "model"
_META = "meta.json"
_WEIGHTS = "weights.pt"
_BOOSTER = "model.txt"
_SCORE_BATCH = 65_536


@dataclass
class Bundle:
    meta: dict[str, Any]
    model: NeuralModel | lgb.Booster
    standardizer: Standardizer | None

    @property
    def features(self) -> list[str]:
        return list(self.meta["features"])

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

    def predict_calibrated(self, x: np.ndarray) -> np.ndarray:
        """Calibrated fraud probabilities (N,) for feature rows x (N, F): what the service
        answers. Same ranking as ``predict`` (the calibration is increasing)."""
        return self.calibrator.apply(self.predict(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Raw model scores (N,) in [0, 1] for feature rows x (N, F) in ``features`` order.

        Class weighting distorts them as probabilities: see ``predict_calibrated``.
        """
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ArtifactError(
                f"the bundle expects {len(self.features)} features per row, "
                f"however got shape {x.shape}"
            )
        if isinstance(self.model, lgb.Booster):
            return np.asarray(self.model.predict(x), dtype=np.float64)
        return self._predict_neural(torch.as_tensor(x, dtype=torch.float32))

    @torch.no_grad()
    def _predict_neural(self, x: torch.Tensor) -> np.ndarray:
        assert self.standardizer is not None
        module: Any = self.model
        module.eval()
        parts = []
        for start in range(0, x.shape[0], _SCORE_BATCH):
            xb = self.standardizer.transform(x[start : start + _SCORE_BATCH])
            parts.append(torch.softmax(module({"x": xb}).float(), dim=1)[:, 1])
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
    if isinstance(model, GBDT):
        with atomic_path(folder / _BOOSTER) as tmp:
            model.save(tmp)
    elif isinstance(model, NeuralModel):
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        write_bytes_atomic(folder / _WEIGHTS, buffer.getvalue())
    full = dict(meta)
    full["standardizer"] = standardizer.to_dict() if standardizer is not None else None
    write_json_atomic(folder / _META, full)


def load_bundle(run_dir: Path) -> Bundle:
    folder = Path(run_dir) / BUNDLE_DIR
    meta = _read_meta(folder / _META)
    if meta["model"] not in NEURAL_MODELS:
        path = folder / _BOOSTER
        if not path.is_file():
            raise ArtifactError(f"model file {path} does not exist")
        return Bundle(meta=meta, model=lgb.Booster(model_file=str(path)), standardizer=None)
    train_cfg = TrainConfig(**_tuples(meta["train_config"]))
    model = build_model(
        meta["model"], n_features=len(meta["features"]), train=train_cfg, gbdt=GBDTConfig()
    )
    if not isinstance(model, NeuralModel):
        raise ArtifactError(f"model {meta['model']!r} in {folder} is not a neural model")
    try:
        model.load_state_dict(torch.load(folder / _WEIGHTS, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError) as exc:
        raise ArtifactError(f"weights {folder / _WEIGHTS} cannot be loaded: {exc}") from None
    return Bundle(meta=meta, model=model, standardizer=Standardizer.from_dict(meta["standardizer"]))


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ArtifactError(f"model bundle {path} does not exist; was the run completed?") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"model bundle {path} is not valid JSON: {exc}") from None


def _tuples(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
