"""From a transaction to a decision: online features, model score, attributions, policy.

An ``Engine`` is one immutable snapshot of what decides: the model bundle's scorer, the online
feature evaluator over the shared state store, and the policy. The service holds a reference to
the current engine and swaps it on reload; a request uses the engine it started with.

Scores. ``Scorer.score`` returns, per row, the score the policy sees (the bundle's calibrated
probability, ``Bundle.predict_calibrated``, when the bundle calibrates; else the model's
probability: ``score`` in the run's prediction tables either way), the model's own probability
(``raw``, recorded in the audit log), and per-feature contributions in log-odds.

Attributions (cheap enough for every request; Shape: x (N, F) -> contributions (N, F)):

* LightGBM: path attribution (Saabas, "Interpreting random forests", 2014; the
  ``treeinterpreter`` method). Along each tree's decision path, the change of the node value
  at a split is credited to the split's feature; the contributions plus the trees' root values
  sum exactly to the raw log-odds. Exact TreeSHAP (``pred_contrib``) walks every path of every
  tree for each row, many times the cost of this (a leaf lookup, ``pred_leaf``, and a table
  gather), which would not leave room for the p99 target or batch throughput. Path
  attribution is not consistent in the SHAP sense, but it ranks the features that moved this
  score well enough for a reason code.
* Neural models: gradient x input of the fraud logit margin (logit_fraud - logit_legit, the
  log-odds) w.r.t. the standardised input, i.e. relative to the training mean (input 0).

The forward pass of either attribution also gives the model's probability, equal to
``Bundle.predict`` (tested), so no request runs the model twice unless the bundle calibrates.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import lightgbm as lgb
import numpy as np
import polars as pl
import scipy.sparse
import torch

from fraudflow.artifacts import BUNDLE_DIR, Bundle, feature_config_of, feature_spec_of, load_bundle
from fraudflow.data.schema import AMOUNT, CUSTOMER_ID, TERMINAL_ID
from fraudflow.errors import ArtifactError
from fraudflow.features.categories import CategoryCodes
from fraudflow.features.default_spec import default_spec
from fraudflow.features.online import Event, FeatureRows, OnlineFeatures, StateStore, Watermark
from fraudflow.features.spec import FeatureSpec
from fraudflow.features.spec_online import Row, SpecOnline, SpecStore, numeric_columns
from fraudflow.models import SequenceInputs, neural_inputs
from fraudflow.serve.history_state import HistoryStore
from fraudflow.serve.policy import (
    AMOUNT_FEATURE,
    DEFAULT_POLICY,
    FEATURE_DETAIL,
    Action,
    Policy,
    check_rule_features,
    decide_many,
    load_policy,
)
from fraudflow.serve.sequence_scoring import SequenceAttribution, SequenceHistory, Windows

__all__ = [
    "TOP_FEATURES",
    "Attribution",
    "BundleScorer",
    "Engine",
    "GradientAttribution",
    "Judgements",
    "LeafIndex",
    "OnlinePath",
    "Recorded",
    "Scorer",
    "Scores",
    "SequenceScorer",
    "TreePathAttribution",
    "fast_path_serves",
    "load_engine",
    "load_policy_for",
    "model_version",
    "reference_scores",
    "scorer_for",
]

log = logging.getLogger(__name__)

TOP_FEATURES = 3  # feature reasons per decision
POLICY_FILE = "policy.yaml"
# Reference scores for the drift metric, the first file present wins.
_REFERENCE_FILES = ("validation_predictions.parquet", "predictions.parquet")
# From this many rows, attributions are one sparse product (rows' one-hot leaves x the leaf
# table) instead of one (N, T, F) gather and sum, which materialises T times the output; for
# a few rows building the sparse matrix costs more than the gather.
_SPARSE_FROM_ROWS = 8
# LightGBM's C API constants (c_api.h).
_C_API_DTYPE_FLOAT32 = 0
_C_API_PREDICT_LEAF_INDEX = 2
_LGBM: Any = lgb.basic._LIB  # the loaded LightGBM library (see LeafIndex)


@dataclass(frozen=True, slots=True)
class Scores:
    score: np.ndarray  # (N,) what the policy sees: calibrated if the bundle calibrates
    raw: np.ndarray  # (N,) the model's probability, as in predictions.parquet
    contributions: np.ndarray  # (N, F) log-odds contributions, in feature order


class Scorer(Protocol):
    """The model seam of the service: feature rows in, scores and attributions out."""

    @property
    def model_version(self) -> str: ...

    @property
    def features(self) -> Sequence[str]: ...

    def score(self, x: np.ndarray, context: Any = None) -> Scores:
        """Score feature rows x (N, F), float32, in ``features`` order. ``context``: what a
        model that reads more than the rows gets beside them (a sequence model: the cards'
        earlier events, ``Windows``), None for the others."""
        ...


class Attribution(Protocol):
    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(contributions (N, F), model probability (N,)) for feature rows x (N, F)."""
        ...


class LeafIndex:
    """``booster.predict(x, pred_leaf=True, num_threads=1)``, through LightGBM's C API.

    Shape: x (N, F) float32 -> leaf indices (N, T). The Python wrapper works on every call
    before any tree is walked (a predictor object, a parameter dict deep-copied), and its
    ctypes pointers (numpy's ``data_as``) form reference cycles: four garbage objects per call
    that only the cyclic GC frees, i.e. a young collection with real work every few hundred
    single-decision groups. Plain integer addresses make neither. It uses LightGBM's library
    handle and the booster's handle (``lightgbm.basic._LIB``, ``Booster._handle``), private
    but unchanged since LightGBM 3; a test holds it equal to ``predict`` (and pyproject keeps
    LightGBM below 5).
    """

    def __init__(self, booster: lgb.Booster, *, n_trees: int) -> None:
        self._booster = booster  # keeps the handle alive
        self._n_trees = n_trees
        # As Booster.predict: the best iteration if the model recorded one, else all trees.
        self._iterations = booster.best_iteration if booster.best_iteration > 0 else -1
        self._parameters = ctypes.c_char_p(b"num_threads=1")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # (N, F), row-major
        n, f = x.shape
        out = np.empty(n * self._n_trees, dtype=np.float64)
        written = ctypes.c_int64(0)
        status = _LGBM.LGBM_BoosterPredictForMat(
            self._booster._handle,
            ctypes.c_void_p(x.ctypes.data),
            ctypes.c_int(_C_API_DTYPE_FLOAT32),
            ctypes.c_int32(n),
            ctypes.c_int32(f),
            ctypes.c_int(1),  # row-major
            ctypes.c_int(_C_API_PREDICT_LEAF_INDEX),
            ctypes.c_int(0),  # start iteration
            ctypes.c_int(self._iterations),
            self._parameters,
            ctypes.byref(written),
            ctypes.c_void_p(out.ctypes.data),
        )
        if status != 0:
            raise ArtifactError(f"LightGBM failed to predict: {_LGBM.LGBM_GetLastError().decode()}")
        if written.value != out.size:
            raise ArtifactError("the LightGBM model's tree count changed after loading")
        return out.astype(np.int64).reshape(n, self._n_trees)


class TreePathAttribution:
    """Path (Saabas) attribution of a binary LightGBM booster, as a per-leaf lookup table.

    Each leaf's contribution vector (the value changes along its path, by split feature) is
    computed once at load; a row then costs one ``pred_leaf`` call and a gather.
    """

    def __init__(self, booster: lgb.Booster, *, n_features: int) -> None:
        dump = booster.dump_model()
        if dump.get("num_tree_per_iteration", 1) != 1:
            raise ArtifactError("the LightGBM model is not binary: several trees per round")
        trees = [info["tree_structure"] for info in dump["tree_info"]]
        width = max(info["num_leaves"] for info in dump["tree_info"])
        table = np.zeros((len(trees), width, n_features))  # (T, L, F)
        for k, root in enumerate(trees):
            _fill_leaf_paths(root, table[k], np.zeros(n_features))
        self._leaves = LeafIndex(booster, n_trees=len(trees))
        self._table = table.reshape(-1, n_features)  # (T * L, F), a view
        self._offsets = np.arange(len(trees), dtype=np.int64) * width  # (T,)
        self._bias = float(sum(_node_value(root) for root in trees))

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # One thread: the service runs one worker per core, and on a busy machine LightGBM's
        # OpenMP pool waits for cores the other workers hold, far longer than the work.
        leaves = self._leaves(x)  # (N, T)
        if len(x) < _SPARSE_FROM_ROWS:
            contributions = self._table[leaves + self._offsets].sum(axis=1)  # (N, T, F) -> (N, F)
        else:
            n, n_trees = leaves.shape
            columns = (leaves + self._offsets).ravel()  # row i's leaves: [i*T, (i+1)*T)
            one_hot = scipy.sparse.csr_matrix(
                (np.ones(columns.size), columns, np.arange(0, columns.size + 1, n_trees)),
                shape=(n, self._table.shape[0]),
            )  # (N, T * L)
            contributions = one_hot @ self._table  # (N, T * L) x (T * L, F) -> (N, F)
        margin = contributions.sum(axis=1) + self._bias  # (N,) raw log-odds
        return contributions, 1.0 / (1.0 + np.exp(-margin))


def _node_value(node: Mapping[str, Any]) -> float:
    return float(node["internal_value"] if "split_index" in node else node["leaf_value"])


def _fill_leaf_paths(node: Mapping[str, Any], leaves: np.ndarray, path: np.ndarray) -> None:
    """Write into ``leaves`` (L, F) each leaf's summed value changes along its path."""
    if "split_index" not in node:
        leaves[node.get("leaf_index", 0)] = path
        return
    feature, value = int(node["split_feature"]), _node_value(node)
    for child in (node["left_child"], node["right_child"]):
        step = path.copy()
        step[feature] += _node_value(child) - value
        _fill_leaf_paths(child, leaves, step)


class GradientAttribution:
    """Gradient x standardised input of the fraud log-odds, for the bundle's neural model.

    Categorical features (embedded, not multiplied by a weight) get no contribution here.
    """

    def __init__(self, bundle: Bundle) -> None:
        if bundle.standardizer is None or isinstance(bundle.model, lgb.Booster):
            raise ArtifactError("gradient attribution needs a neural bundle with a standardiser")
        self._module: Any = bundle.model
        self._module.eval()
        self._standardizer = bundle.standardizer
        self._categorical = bundle.categorical
        skip = {c.position for c in self._categorical}
        self._numeric = [j for j in range(len(bundle.features)) if j not in skip]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.enable_grad():
            matrix = torch.as_tensor(x, dtype=torch.float32)  # (N, F); no copy from float32
            inputs = neural_inputs(matrix, self._categorical, self._standardizer)
            xs = inputs["x"].requires_grad_(True)  # (N, F - C)
            logits = self._module(inputs).float()  # (N, 2)
            margin = logits[:, 1] - logits[:, 0]  # (N,) fraud log-odds
            # Rows are independent (eval mode), so the gradient of the sum is per row.
            (grad,) = torch.autograd.grad(margin.sum(), xs)
        numeric = (grad * xs).detach().double().numpy()  # (N, F - C)
        if self._categorical:
            contributions = np.zeros((x.shape[0], x.shape[1]))  # (N, F)
            contributions[:, self._numeric] = numeric
        else:
            contributions = numeric
        # As Bundle.predict computes it: softmax in float32, then float64.
        probability = torch.softmax(logits.detach(), dim=1)[:, 1].double().numpy()
        return contributions, probability


class BundleScorer:
    """A model bundle as a ``Scorer``."""

    def __init__(self, bundle: Bundle, *, version: str) -> None:
        self._version = version
        self._features = tuple(bundle.features)
        if isinstance(bundle.model, lgb.Booster):
            self._attribute: Attribution = TreePathAttribution(
                bundle.model, n_features=len(self._features)
            )
        else:
            self._attribute = GradientAttribution(bundle)
        self._calibrate = _calibration_of(bundle)

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def features(self) -> Sequence[str]:
        return self._features

    def score(self, x: np.ndarray, context: Any = None) -> Scores:
        contributions, raw = self._attribute(x)
        score = np.asarray(self._calibrate(x, raw), dtype=np.float64)
        return Scores(score=score, raw=raw, contributions=contributions)


class SequenceScorer:
    """A sequence model's bundle as a ``Scorer``: its context is the cards' earlier events
    (``Windows``; None: none, every row its card's first, as the run check's probe)."""

    def __init__(self, bundle: Bundle, *, version: str) -> None:
        self._version = version
        self._features = tuple(bundle.features)
        self._attribute = SequenceAttribution(bundle)
        self._calibrate = _calibration_of(bundle)

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def features(self) -> Sequence[str]:
        return self._features

    def score(self, x: np.ndarray, context: Windows | None = None) -> Scores:
        if context is None:
            context = Windows.empty(np.zeros(len(x), np.int64), len(self._features))
        contributions, raw = self._attribute(x, context)
        score = np.asarray(self._calibrate(x, raw), dtype=np.float64)
        return Scores(score=score, raw=raw, contributions=contributions)


def scorer_for(bundle: Bundle, *, version: str) -> Scorer:
    """The scorer of a bundle's kind of inputs (the service serves vectors and sequences)."""
    if isinstance(bundle.inputs, SequenceInputs):
        return SequenceScorer(bundle, version=version)
    return BundleScorer(bundle, version=version)


Calibration = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x (N, F), raw (N,)) -> (N,)


def _calibration_of(bundle: Bundle) -> Calibration:
    """How the bundle turns rows into the served score, decided once at load.

    ``Bundle.predict_calibrated(x)`` is ``calibrator.apply(predict(x))``; with a calibrator at
    hand it is applied to the probability the attribution pass already computed, which saves
    a second model pass per request (equality with ``predict_calibrated`` is tested). Bundles
    without calibration serve the model's probability.
    """
    calibrator = getattr(bundle, "calibrator", None)  # parsed once: a property re-reads meta
    if calibrator is not None and hasattr(calibrator, "apply"):
        return lambda x, raw: calibrator.apply(raw)
    predict_calibrated = getattr(bundle, "predict_calibrated", None)
    if predict_calibrated is not None:
        return lambda x, raw: predict_calibrated(x)
    return lambda x, raw: raw


class Recorded(NamedTuple):
    """``FeatureRows`` of a group, and the fresh events' context for the scorer (None for a
    model that reads the rows alone)."""

    values: np.ndarray  # (N, F) float64
    fresh: np.ndarray  # (N,) bool
    context: Windows | None


class Judgements(NamedTuple):
    """N scored and decided transactions, as columns."""

    scores: np.ndarray  # (N,) what the policy saw: calibrated where the bundle calibrates
    raw_scores: np.ndarray  # (N,) the model's probability
    actions: list[Action]
    # Per transaction: thresholds and rules, then the top features, in the ``Reason.as_dict``
    # form the response carries (built once here, not a Reason and then a dict per reason).
    reasons: list[list[dict[str, Any]]]


Extras = Mapping[str, Any]  # a transaction's columns beyond the canonical ones


class OnlinePath(Protocol):
    """How an engine computes its model's features online, from the state store."""

    @property
    def names(self) -> list[str]: ...

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns beyond the canonical ones that each transaction must carry."""
        ...

    def problem(self, extras: Extras | None) -> str | None:
        """What is wrong with a transaction's extra columns (one line naming the column), or
        None."""
        ...

    def record(self, events: Sequence[Event], extras: Sequence[Extras] | None) -> FeatureRows:
        """The events' feature rows in order, which the store then holds (one transaction)."""
        ...

    def stored(self, events: Sequence[Event], extras: Sequence[Extras] | None) -> np.ndarray:
        """Feature rows (N, F) of events the store holds, recomputed from it now."""
        ...

    def record_label(self, transaction_id: str, is_fraud: bool) -> None: ...


class _FastPath:
    """The default spec through ``OnlineFeatures``: the speed path (``fast_path_serves``)."""

    columns: tuple[str, ...] = ()

    def __init__(self, online: OnlineFeatures) -> None:
        self.online = online
        self.names = online.names

    def problem(self, extras: Extras | None) -> str | None:
        return None

    def record(self, events: Sequence[Event], extras: Sequence[Extras] | None) -> FeatureRows:
        return self.online.record_events(events)

    def stored(self, events: Sequence[Event], extras: Sequence[Extras] | None) -> np.ndarray:
        return self.online.stored_features(events)

    def record_label(self, transaction_id: str, is_fraud: bool) -> None:
        self.online.record_label(transaction_id, is_fraud)


# What an extra column may hold: what a log's column holds (a string, a number, a flag, null).
_MAX_TEXT = 256


class _SpecPath:
    """Any spec through ``SpecOnline``; requests carry the spec's extra columns.

    A categorical feature is the row's raw value, which leaves here as the bundle's code for
    it (``codes``: learned in training; unseen values and nulls get the unseen code), so the
    model reads the model matrix it was trained on.
    """

    def __init__(self, online: SpecOnline, codes: CategoryCodes | None = None) -> None:
        self.online = online
        self.names = online.names
        self.columns = online.columns
        self._numeric = numeric_columns(online.spec)
        self._codes = codes  # every categorical feature has its codes: load_bundle checks
        self._coded = [(self.names.index(c), c) for c in online.spec.categorical]

    def problem(self, extras: Extras | None) -> str | None:
        extras = extras or {}
        for column in self.columns:
            if column not in extras:
                return f"missing column {column!r}: the model's feature spec reads it"
            value = extras[column]
            if column in self._numeric:
                if value is not None and not _is_number(value):
                    return f"column {column!r} must be a finite number or null"
            elif not (value is None or isinstance(value, bool) or _is_number(value)) and not (
                isinstance(value, str) and len(value) <= _MAX_TEXT
            ):
                return (
                    f"column {column!r} must be a string of at most {_MAX_TEXT} characters, "
                    "a number, true, false or null"
                )
        return None

    def record(self, events: Sequence[Event], extras: Sequence[Extras] | None) -> FeatureRows:
        rows = self._rows(events, extras)
        out = self.online.record_rows(rows)
        self._encode(out.values, rows)
        return out

    def stored(self, events: Sequence[Event], extras: Sequence[Extras] | None) -> np.ndarray:
        rows = self._rows(events, extras)
        values = self.online.stored_features(rows)
        self._encode(values, rows)
        return values

    def record_label(self, transaction_id: str, is_fraud: bool) -> None:
        self.online.record_label(transaction_id, is_fraud)

    def _encode(self, values: np.ndarray, rows: Sequence[Row]) -> None:
        """Each categorical feature's column of ``values`` (N, F) becomes the rows' codes."""
        if self._codes is None:
            return
        for position, column in self._coded:
            values[:, position] = self._codes.encode(column, [r.columns.get(column) for r in rows])

    def _rows(self, events: Sequence[Event], extras: Sequence[Extras] | None) -> list[Row]:
        given: Sequence[Extras] = extras if extras is not None else [{}] * len(events)
        return [
            Row(e.transaction_id, e.t_us, {
                **{c: x.get(c) for c in self.columns},
                CUSTOMER_ID: e.customer_id, TERMINAL_ID: e.terminal_id, AMOUNT: e.amount,
            })
            for e, x in zip(events, given, strict=True)
        ]  # fmt: skip


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and bool(np.isfinite(float(value)))
    )


@dataclass(frozen=True)
class Engine:
    """What decides, as one swappable snapshot."""

    run_dir: Path
    scorer: Scorer
    online: OnlinePath
    policy: Policy
    policy_source: str
    reference: np.ndarray | None  # validation scores for the drift metric; None: none
    # Sequence models: the cards' histories, which ``record`` appends to; None: no history.
    history: SequenceHistory | None = None

    @property
    def model_version(self) -> str:
        return self.scorer.model_version

    def record(self, events: Sequence[Event], extras: Sequence[Extras] | None = None) -> Recorded:
        """The feature rows of the events in order (``features`` order), which the state store
        then holds, in one store transaction; ``fresh`` is False for a transaction_id the
        store already holds (or earlier). ``extras``: each event's extra columns
        (``online.columns``), where the spec reads any. With a history, the fresh events are
        then appended to it and ``context`` holds their windows, in their order.
        """
        rows = self.online.record(events, extras)
        if self.history is None:
            return Recorded(rows.values, rows.fresh, None)
        fresh = rows.fresh.tolist()
        kept = [e for e, new in zip(events, fresh, strict=True) if new]
        values = rows.values if len(kept) == len(events) else rows.values[rows.fresh]
        return Recorded(rows.values, rows.fresh, self.history.windows(kept, values))

    def windows(self, events: Sequence[Event], values: np.ndarray) -> Windows | None:
        """The context of events the state already holds (a decision decided again), their
        history appended where a crash left it out; None without a history."""
        return None if self.history is None else self.history.windows(events, values)

    def judge(
        self, x: np.ndarray, amounts: Sequence[float], context: Windows | None = None
    ) -> Judgements:
        """Score and decide feature rows at once: one model call, vectorised policy.

        Shape: x (N, F) float64 in ``scorer.features`` order, amounts (N,) -> N judgements.
        ``context``: the rows' windows (``record``), for a sequence model.
        """
        names = self.scorer.features
        # float32, as training fed the model (fraudflow.train.run._matrix); the policy's
        # rules and the reasons read the float64 values the service computed.
        scores = self.scorer.score(x.astype(np.float32), context)
        amount = np.asarray(amounts, dtype=np.float64)  # (N,)

        def column(name: str) -> np.ndarray:
            return amount if name == AMOUNT_FEATURE else x[:, names.index(name)]

        decisions = decide_many(self.policy, scores=scores.score, column=column)
        top = _top_features(scores.contributions)  # (N, k)
        k = top.shape[1]
        # Python lists once: indexing numpy arrays element by element costs more per row.
        # Plain fancy indexing: take_along_axis builds index arrays in Python before any work.
        at = np.arange(len(x))[:, None]  # (N, 1)
        ranked = zip(
            top.ravel().tolist(), x[at, top].ravel().tolist(),
            scores.contributions[at, top].ravel().tolist(), strict=True,
        )  # fmt: skip
        details = _feature_details(tuple(names))
        # One flat comprehension over every reason of the group, then k per decision: this
        # runs per reason of every decision (a comprehension per decision cost more).
        flat = [
            {"kind": "feature", "name": names[j],
             "detail": details[j] % (v, "raised" if c >= 0 else "lowered", abs(c)),
             "value": v, "contribution": c}
            for j, v, c in ranked
        ]  # fmt: skip
        features = [flat[i : i + k] for i in range(0, len(flat), k)] if k else [[] for _ in x]
        reasons = [
            [*(r.as_dict() for r in d.reasons), *f] if d.reasons else f
            for d, f in zip(decisions, features, strict=True)
        ]
        actions = [d.action for d in decisions]
        return Judgements(scores.score, scores.raw, actions, reasons)


def _top_features(contributions: np.ndarray) -> np.ndarray:
    """Indices (N, k) of the k largest absolute contributions per row, largest first."""
    k = min(TOP_FEATURES, contributions.shape[1])
    return np.argsort(-np.abs(contributions), axis=1, kind="stable")[:, :k]


@functools.lru_cache(maxsize=8)
def _feature_details(names: tuple[str, ...]) -> list[str]:
    """Per feature, the %-template of its reason's detail: value, "raised" / "lowered", and
    the absolute contribution, e.g. "customer__count__1h = 7 raised the fraud log-odds by
    1.234". %-formatting a prepared template costs less than an f-string per reason."""
    return [name.replace("%", "%%") + FEATURE_DETAIL for name in names]


# --- loading ------------------------------------------------------------------------------


def load_engine(
    run_dir: Path,
    *,
    store: StateStore,
    policy_path: Path | None,
    watermark: Watermark | None = None,
    spec_store: SpecStore | None = None,
    history_store: HistoryStore | None = None,
) -> Engine:
    """Load everything a run needs to decide, fully, before anyone may use it.

    The bundle's feature spec is computed online by the fast path over ``store`` when it is
    the default spec (``fast_path_serves``), else by the spec engine over ``spec_store``
    (``fraudflow.serve.spec_state``: the same state, so a reload that changes the spec keeps
    the history; the new spec's key groups are indexed from it here, before the swap).
    ``watermark`` drives the state's forgetting; pass the same one to every engine of a store.
    A sequence model's cards' histories live in ``history_store``.
    """
    bundle = load_bundle(run_dir, completed=True)
    scorer = scorer_for(bundle, version=model_version(run_dir, bundle))
    online = _online_path(bundle, run_dir, store, spec_store, watermark)
    if online.names != list(scorer.features):
        raise ArtifactError(
            f"the model in {run_dir} expects features {list(scorer.features)}, however the "
            f"online evaluator computes {online.names} for its feature spec"
        )
    policy, source = load_policy_for(run_dir, policy_path)
    check_rule_features(policy, online.names, source=source)
    history = _history_of(bundle, run_dir, history_store)
    return Engine(run_dir, scorer, online, policy, source, reference_scores(run_dir), history)


def _history_of(
    bundle: Bundle, run_dir: Path, store: HistoryStore | None
) -> SequenceHistory | None:
    declared = bundle.inputs
    if not isinstance(declared, SequenceInputs):
        return None
    if store is None:
        raise ArtifactError(
            f"the model in {run_dir} reads each card's last events, however no history store "
            "was given"
        )
    return SequenceHistory(store, features=bundle.features, length=declared.length)


def fast_path_serves(spec: FeatureSpec, meta: Mapping[str, Any]) -> bool:
    """Whether the bundle's spec is the default one of its feature config, which
    ``OnlineFeatures`` computes as columns for a whole group of events: the speed path whose
    throughput and latency ``benchmarks/serve.py`` holds to its targets. Any other spec goes
    through ``SpecOnline`` (the same features on the default spec: a property test)."""
    return spec.hash == default_spec(feature_config_of(dict(meta))).hash


def _online_path(
    bundle: Bundle,
    run_dir: Path,
    store: StateStore,
    spec_store: SpecStore | None,
    watermark: Watermark | None,
) -> OnlinePath:
    meta = bundle.meta
    spec = feature_spec_of(dict(meta))
    if fast_path_serves(spec, meta):
        cfg = feature_config_of(dict(meta))
        return _FastPath(OnlineFeatures(cfg=cfg, store=store, watermark=watermark))
    if spec_store is None:
        raise ArtifactError(
            f"the model in {run_dir} was trained on a feature spec other than the default one "
            f"({spec.hash[:12]}), however no store for the spec engine was given"
        )
    return _SpecPath(SpecOnline(spec, store=spec_store, watermark=watermark), bundle.codes)


def model_version(run_dir: Path, bundle: Bundle) -> str:
    """``<model>-<12 hex>``: a digest of the bundle's files, so equal files, equal versions."""
    digest = hashlib.sha256()
    for path in sorted((Path(run_dir) / BUNDLE_DIR).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{bundle.meta['model']}-{digest.hexdigest()[:12]}"


def load_policy_for(run_dir: Path, explicit: Path | None) -> tuple[Policy, str]:
    """The policy a run decides with and where it came from: ``explicit`` if given, else
    ``policy.yaml`` beside the run, else the default policy."""
    if explicit is not None:
        return load_policy(explicit), str(explicit)
    beside = Path(run_dir) / POLICY_FILE
    if beside.is_file():
        return load_policy(beside), str(beside)
    t = DEFAULT_POLICY.thresholds
    log.warning(
        "no --policy and no %s: using the default policy (review >= %g, block >= %g, no rules)",
        beside, t.review, t.block,
    )  # fmt: skip
    return DEFAULT_POLICY, "default"


def reference_scores(run_dir: Path) -> np.ndarray | None:
    """The run's validation scores (else its test scores) for the drift metric; None if none."""
    for name in _REFERENCE_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            scores = pl.read_parquet(path, columns=["score"])["score"].to_numpy()
            return np.asarray(scores, dtype=np.float64) if len(scores) else None
    return None
