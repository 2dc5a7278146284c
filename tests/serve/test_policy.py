"""The decision policy: its file format, validation messages and decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fraudflow.errors import ConfigError
from fraudflow.serve.policy import (
    DEFAULT_POLICY,
    Condition,
    Policy,
    Reason,
    Rule,
    Thresholds,
    check_rule_features,
    decide,
    decide_many,
    load_policy,
    save_policy,
)

CONTRACT = """\
version: 1
thresholds: {review: 0.30, block: 0.90}
rules:
  - {name: large_amount, when: {feature: amount, above: 5000}, action: review}
  - {name: burst, when: {feature: customer__count__1h, at_least: 10}, action: block}
  - name: terminal_with_known_fraud
    when: {feature: terminal__fraud_rate__30d, above: 0.2}
    action: review
calibration: {run: runs/demo, review_budget_cards_per_day: 100, expected_block_precision: null}
"""
FEATURES = {"customer__count__1h": 1.0, "terminal__fraud_rate__30d": 0.0}


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.yaml"
    path.write_text(CONTRACT)
    return load_policy(path)


def test_contract_file_loads(policy: Policy) -> None:
    assert policy.thresholds == Thresholds(review=0.3, block=0.9)
    assert policy.rules[0] == Rule("large_amount", Condition("amount", above=5000.0), "review")
    assert policy.rules[1].when == Condition("customer__count__1h", at_least=10.0)
    assert policy.calibration is not None and policy.calibration["run"] == "runs/demo"


def test_save_then_load_round_trips(policy: Policy, tmp_path: Path) -> None:
    save_policy(policy, tmp_path / "again.yaml")
    again = load_policy(tmp_path / "again.yaml")
    assert again == policy and again.calibration == policy.calibration
    # Written atomically: no temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.yaml", "policy.yaml"]


# (score, amount, features, action, fired reasons)
CASES = [
    (0.1, 10.0, FEATURES, "approve", []),
    (0.3, 10.0, FEATURES, "review", ["review"]),  # the threshold is inclusive
    (0.95, 10.0, FEATURES, "block", ["review", "block"]),
    (0.1, 5000.0, FEATURES, "approve", []),  # `above` is strict
    (0.1, 5000.01, FEATURES, "review", ["large_amount"]),
    (0.1, 10.0, FEATURES | {"customer__count__1h": 10.0}, "block", ["burst"]),  # at_least
    (0.5, 9e3, FEATURES | {"terminal__fraud_rate__30d": 0.5}, "review",
     ["review", "large_amount", "terminal_with_known_fraud"]),
    (0.95, 9e3, FEATURES, "block", ["review", "block", "large_amount"]),  # most severe wins
]  # fmt: skip


@pytest.mark.parametrize(("score", "amount", "features", "action", "fired"), CASES)
def test_decisions(
    policy: Policy,
    score: float,
    amount: float,
    features: dict[str, float],
    action: str,
    fired: list[str],
) -> None:
    decision = decide(policy, score=score, amount=amount, features=features)
    assert decision.action == action
    assert [r.name for r in decision.reasons] == fired


def test_decide_many_decides_each_row_as_alone(policy: Policy) -> None:
    """All the cases as one batch: the vectorised masks pick each row's own reasons."""
    scores = np.array([c[0] for c in CASES])
    columns = {"amount": np.array([c[1] for c in CASES])}
    for name in FEATURES:
        columns[name] = np.array([c[2].get(name, FEATURES[name]) for c in CASES])
    decisions = decide_many(policy, scores=scores, column=columns.__getitem__)
    assert [d.action for d in decisions] == [c[3] for c in CASES]
    assert [[r.name for r in d.reasons] for d in decisions] == [c[4] for c in CASES]
    alone = [decide(policy, score=c[0], amount=c[1], features=c[2]) for c in CASES]
    assert decisions == alone


def test_reasons_say_what_fired(policy: Policy) -> None:
    decision = decide(policy, score=0.95, amount=6000.0, features=FEATURES)
    _, block, rule = decision.reasons
    assert block == Reason("threshold", "block", "score 0.9500 >= block threshold 0.9", 0.95)
    assert rule.as_dict() == {
        "kind": "rule",
        "name": "large_amount",
        "detail": "amount = 6000 > 5000",
        "value": 6000.0,
        "contribution": None,
    }


def test_default_policy() -> None:
    assert DEFAULT_POLICY.thresholds == Thresholds(review=0.5, block=0.9)
    assert DEFAULT_POLICY.rules == ()


def test_rules_must_name_known_features(policy: Policy) -> None:
    check_rule_features(policy, list(FEATURES), source="p.yaml")
    with pytest.raises(ConfigError, match=r"`rules\[1\].when.feature` must be `amount` or a fea"):
        check_rule_features(policy, ["terminal__fraud_rate__30d"], source="p.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "expected a mapping with `version`, `thresholds` and `rules`"),
        ("version: 2\nthresholds: {review: 0.3, block: 0.9}", "`version` must be 1, however got 2"),
        ("version: 1", "`thresholds` must be a mapping"),
        ("version: 1\nthresholds: {review: 0.3}", r"`thresholds` is missing \['block'\]"),
        ("version: 1\nthresholds: {review: high, block: 0.9}",
         "`thresholds.review` must be a finite number, however got 'high'"),
        ("version: 1\nthresholds: {review: 0.95, block: 0.9}",
         r"`thresholds.review` must be <= thresholds.block \(0.9\), however got 0.95"),
        ("version: 1\nthresholds: {review: 0.3, block: 1.5}",
         r"`thresholds.block` must be a score in \[0, 1\], however got 1.5"),
        ("version: 1\nthresholds: {review: 0.3, block: 0.9}\nrule: []",
         r"`policy` has unknown keys \['rule'\]"),
        ("version: 1\nthresholds: {review: 0.3, block: 0.9}\n"
         "rules: [{name: a, when: {feature: amount, abve: 1}, action: review}]",
         r"`rules\[0\].when` has unknown keys \['abve'\]"),
        ("version: 1\nthresholds: {review: 0.3, block: 0.9}\n"
         "rules: [{name: a, when: {feature: amount}, action: review}]",
         r"`rules\[0\].when` must be exactly one of `above`, `at_least`"),
        ("version: 1\nthresholds: {review: 0.3, block: 0.9}\n"
         "rules: [{name: a, when: {feature: amount, above: 1}, action: approve}]",
         "`rules\\[0\\].action` must be review or block, however got 'approve'"),
        ("version: 1\nthresholds: {review: 0.3, block: 0.9}\n"
         "rules: [{name: a, when: {feature: amount, above: true}, action: review}]",
         r"`rules\[0\].when.above` must be a finite number, however got True"),
        ("version: 1\nthresholds: {review: 0.3, block: 0.9}\nrules:\n"
         "  - {name: a, when: {feature: amount, above: 1}, action: review}\n"
         "  - {name: a, when: {feature: amount, above: 2}, action: block}",
         r"`rules\[\].name` must be unique, however got \['a'\]"),
        ("version: 1\n  bad: [indent", "is not valid YAML"),
    ],
)  # fmt: skip
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"policy file {path}: .*{message}|{message}"):
        load_policy(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy file .*nope.yaml does not exist"):
        load_policy(tmp_path / "nope.yaml")
