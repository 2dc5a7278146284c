"""The decision policy: score thresholds and feature rules, read from a YAML file.

Format (``fraudflow policy calibrate`` writes it; every key below is part of the contract):

    version: 1
    thresholds: {review: 0.30, block: 0.90}
    rules:
      - {name: large_amount, when: {feature: amount, above: 5000}, action: review}
      - {name: burst, when: {feature: customer__count__1h, at_least: 10}, action: block}
    calibration: {...}          # free-form provenance, kept as read

``when.feature`` is ``amount`` (the raw transaction amount) or a feature of the model;
``above`` is strict (>), ``at_least`` is >=; a condition has exactly one of them. Unknown keys
are refused rather than ignored: a typo such as ``abve`` would otherwise silently disable a
rule.

Severity is approve < review < block. The decision is the most severe of the thresholds the
score reaches (score >= block: block; score >= review: review) and of the fired rules; every
reached threshold and fired rule is one reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import yaml

from fraudflow.errors import ConfigError
from fraudflow.files import write_text_atomic

__all__ = [
    "ACTIONS",
    "AMOUNT_FEATURE",
    "DEFAULT_POLICY",
    "FEATURE_DETAIL",
    "Action",
    "Condition",
    "Decision",
    "Policy",
    "Reason",
    "ReasonKind",
    "Rule",
    "Thresholds",
    "check_rule_features",
    "decide",
    "decide_many",
    "load_policy",
    "policy_to_dict",
    "save_policy",
]

Action = Literal["approve", "review", "block"]
ReasonKind = Literal["threshold", "rule", "feature"]
ACTIONS: tuple[Action, ...] = ("approve", "review", "block")  # in order of severity
# A feature reason's detail after its name, %-formatted with the feature's value, "raised" or
# "lowered" and the absolute contribution; replay records store it with the feature names
# (fraudflow.serve.replay_record), so rewording it leaves earlier answers as they were sent.
FEATURE_DETAIL = " = %g %s the fraud log-odds by %.3f"
_SEVERITY = {action: rank for rank, action in enumerate(ACTIONS)}
AMOUNT_FEATURE = "amount"  # a rule on the raw amount, not on a model feature
_VERSION = 1


@dataclass(frozen=True)
class Thresholds:
    review: float = 0.5
    block: float = 0.9


@dataclass(frozen=True)
class Condition:
    feature: str
    above: float | None = None  # value > above
    at_least: float | None = None  # value >= at_least

    def holds(self, values: np.ndarray) -> np.ndarray:
        """Whether each value meets the condition. Shape: (N,) -> (N,) bool."""
        if self.above is not None:
            return np.greater(values, self.above)
        assert self.at_least is not None  # load_policy guarantees exactly one bound
        return np.greater_equal(values, self.at_least)

    def describe(self, value: float) -> str:
        op, bound = (">", self.above) if self.above is not None else (">=", self.at_least)
        return f"{self.feature} = {value:g} {op} {bound:g}"


@dataclass(frozen=True)
class Rule:
    name: str
    when: Condition
    action: Action


@dataclass(frozen=True)
class Policy:
    thresholds: Thresholds = Thresholds()
    rules: tuple[Rule, ...] = ()
    version: int = _VERSION
    # Provenance written by `fraudflow policy calibrate`; the service never reads it.
    calibration: Mapping[str, Any] | None = field(default=None, compare=False)


DEFAULT_POLICY = Policy()


class Reason(NamedTuple):
    """Why a decision is what it is (a NamedTuple: cheaper to build than a frozen dataclass,
    and ``as_dict`` is cheaper than orjson's dataclass path, both measured)."""

    kind: ReasonKind
    name: str
    detail: str
    value: float | None = None  # the score (threshold), or the feature's value
    contribution: float | None = None  # feature reasons: signed log-odds contribution

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "detail": self.detail,
            "value": self.value,
            "contribution": self.contribution,
        }


class Decision(NamedTuple):
    action: Action
    reasons: tuple[Reason, ...]


_APPROVED = Decision("approve", ())


def decide(
    policy: Policy, *, score: float, amount: float, features: Mapping[str, float]
) -> Decision:
    """Apply ``policy`` to one scored transaction (``decide_many`` of one row).

    Every rule must name ``amount`` or a key of ``features`` (``check_rule_features``).
    """
    (decision,) = decide_many(
        policy,
        scores=np.array([score], dtype=np.float64),
        column=lambda name: np.array(
            [amount if name == AMOUNT_FEATURE else features[name]], dtype=np.float64
        ),
    )
    return decision


def decide_many(
    policy: Policy, *, scores: np.ndarray, column: Callable[[str], np.ndarray]
) -> list[Decision]:
    """Apply ``policy`` to N scored transactions at once. Shape: scores (N,) -> N decisions.

    ``column(name)`` gives the (N,) values a rule reads: ``amount`` or a model feature, in
    float64 (the values the service computed, not the float32 the model saw). The comparisons
    are vectorised; reasons are built only for the rows where something fired, which under
    normal traffic is a small minority.
    """
    t = policy.thresholds
    reached = (scores >= t.review) | (scores >= t.block)  # (N,) a threshold or rule fired
    severity = np.where(scores >= t.block, 2, np.where(scores >= t.review, 1, 0))  # (N,)
    fired: list[tuple[Rule, np.ndarray, np.ndarray]] = []
    for rule in policy.rules:
        values = column(rule.when.feature)  # (N,)
        mask = rule.when.holds(values)  # (N,) bool
        severity = np.maximum(severity, np.where(mask, _SEVERITY[rule.action], 0))
        reached |= mask
        fired.append((rule, mask, values))
    out = [_APPROVED] * len(scores)
    for i in np.flatnonzero(reached).tolist():
        reasons: list[Reason] = []
        score = float(scores[i])
        for name, threshold in (("review", t.review), ("block", t.block)):
            if score >= threshold:  # visited in rising severity
                detail = f"score {score:.4f} >= {name} threshold {threshold:g}"
                reasons.append(Reason("threshold", name, detail, value=score))
        for rule, mask, values in fired:
            if mask[i]:
                value = float(values[i])
                reasons.append(Reason("rule", rule.name, rule.when.describe(value), value=value))
        out[i] = Decision(ACTIONS[int(severity[i])], tuple(reasons))
    return out


def check_rule_features(policy: Policy, features: list[str], *, source: str) -> None:
    """Raise ``ConfigError`` if a rule names neither ``amount`` nor one of ``features``."""
    known = {AMOUNT_FEATURE, *features}
    for i, rule in enumerate(policy.rules):
        if rule.when.feature not in known:
            raise ConfigError(
                f"policy {source}: `rules[{i}].when.feature` must be `amount` or a feature of "
                f"the model, however got {rule.when.feature!r}"
            )


# --- reading and writing ------------------------------------------------------------------


def load_policy(path: Path | str) -> Policy:
    """Read and validate a policy file; ``ConfigError`` names the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"policy file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy file {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy file {path} is not valid YAML: {exc}") from None
    return _Reader(str(path)).policy(raw)


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The file form of ``policy`` (what ``save_policy`` writes)."""
    rules = []
    for rule in policy.rules:
        bound = {"above": rule.when.above} if rule.when.above is not None else {}
        if rule.when.at_least is not None:
            bound = {"at_least": rule.when.at_least}
        when = {"feature": rule.when.feature, **bound}
        rules.append({"name": rule.name, "when": when, "action": rule.action})
    out: dict[str, Any] = {
        "version": policy.version,
        "thresholds": {"review": policy.thresholds.review, "block": policy.thresholds.block},
        "rules": rules,
    }
    if policy.calibration is not None:
        out["calibration"] = dict(policy.calibration)
    return out


def save_policy(policy: Policy, path: Path | str) -> None:
    """Write ``policy`` as YAML, atomically (a reader never sees half a policy)."""
    text = yaml.safe_dump(policy_to_dict(policy), sort_keys=False, default_flow_style=None)
    write_text_atomic(path, text)


class _Reader:
    """Validation with messages that name the file and the key (``rules[1].when.above``)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(
            f"policy file {self.source}: `{key}` must be {expected}, however got {got!r}"
        )

    def policy(self, raw: Any) -> Policy:
        if not isinstance(raw, dict):
            raise ConfigError(
                f"policy file {self.source}: expected a mapping with `version`, `thresholds` "
                f"and `rules`, however got {type(raw).__name__}"
            )
        self.keys(raw, "policy", allowed={"version", "thresholds", "rules", "calibration"})
        if raw.get("version") != _VERSION:
            raise self.fail("version", str(_VERSION), raw.get("version"))
        rules = raw.get("rules") or []
        if not isinstance(rules, list):
            raise self.fail("rules", "a list", rules)
        calibration = raw.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise self.fail("calibration", "a mapping", calibration)
        parsed = tuple(self.rule(r, f"rules[{i}]") for i, r in enumerate(rules))
        names = [r.name for r in parsed]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise self.fail("rules[].name", "unique", dupes)
        return Policy(self.thresholds(raw.get("thresholds")), parsed, _VERSION, calibration)

    def thresholds(self, raw: Any) -> Thresholds:
        if not isinstance(raw, dict):
            raise self.fail("thresholds", "a mapping {review: <score>, block: <score>}", raw)
        self.keys(raw, "thresholds", allowed={"review", "block"}, required={"review", "block"})
        review = self.number(raw["review"], "thresholds.review")
        block = self.number(raw["block"], "thresholds.block")
        for key, value in (("review", review), ("block", block)):
            if not 0.0 <= value <= 1.0:
                raise self.fail(f"thresholds.{key}", "a score in [0, 1]", value)
        if review > block:
            raise self.fail("thresholds.review", f"<= thresholds.block ({block:g})", review)
        return Thresholds(review=review, block=block)

    def rule(self, raw: Any, key: str) -> Rule:
        if not isinstance(raw, dict):
            raise self.fail(key, "a mapping {name, when, action}", raw)
        self.keys(raw, key, allowed={"name", "when", "action"}, required={"name", "when", "action"})
        name = raw["name"]
        if not isinstance(name, str) or not name:
            raise self.fail(f"{key}.name", "a non-empty string", name)
        action = raw["action"]
        if action not in ("review", "block"):
            raise self.fail(f"{key}.action", "review or block", action)
        return Rule(name=name, when=self.condition(raw["when"], f"{key}.when"), action=action)

    def condition(self, raw: Any, key: str) -> Condition:
        if not isinstance(raw, dict):
            raise self.fail(key, "a mapping {feature, above | at_least}", raw)
        self.keys(raw, key, allowed={"feature", "above", "at_least"}, required={"feature"})
        feature = raw["feature"]
        if not isinstance(feature, str) or not feature:
            raise self.fail(f"{key}.feature", "a feature name", feature)
        bounds = [b for b in ("above", "at_least") if b in raw]
        if len(bounds) != 1:
            raise self.fail(key, "exactly one of `above`, `at_least`", sorted(raw))
        value = self.number(raw[bounds[0]], f"{key}.{bounds[0]}")
        if bounds[0] == "above":
            return Condition(feature, above=value)
        return Condition(feature, at_least=value)

    def number(self, raw: Any, key: str) -> float:
        # bool is an int in Python; `above: true` is a typo, not the number 1.
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise self.fail(key, "a finite number", raw)
        return float(raw)

    def keys(
        self,
        raw: dict[Any, Any],
        key: str,
        *,
        allowed: AbstractSet[str],
        required: AbstractSet[str] = frozenset(),
    ) -> None:
        unknown = sorted(str(k) for k in raw if k not in allowed)
        if unknown:
            raise ConfigError(
                f"policy file {self.source}: `{key}` has unknown keys {unknown}; expected keys "
                f"among {sorted(allowed)}"
            )
        missing = sorted(required - set(raw))
        if missing:
            raise ConfigError(f"policy file {self.source}: `{key}` is missing {missing}")
