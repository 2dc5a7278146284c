"""Champion and challengers (``fraudflow.serve.shadow``) on the real app over loopback HTTP:
challengers score what their bundles score offline, a failing or hung challenger leaves every
champion answer as it is (and is reported), the split is stable per card, reloads carry the
challengers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import polars as pl
import pytest
from fastapi import FastAPI

from fraudflow.artifacts import load_bundle
from fraudflow.config import FeatureConfig
from fraudflow.errors import ConfigError
from fraudflow.features.default_spec import default_spec
from fraudflow.features.spec import parse_spec
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions
from fraudflow.serve.settings import load_settings, parse_splits
from fraudflow.serve.shadow import Lineup, ShadowPredict, feature_problem, split_buckets
from tests.helpers.service import (
    ADMIN,
    AUTH,
    SMALL_SIM,
    LiveServer,
    copy_of_run,
    metric_value,
    settings_for,
    simulate_and_train,
    transaction,
    wait_ready,
)

# A reload verifies each run in a child process that imports the model libraries: slow on a
# busy machine.
RELOAD_SECONDS = 300


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A GBDT champion, an MLP challenger trained on the same features, and a GBDT copy."""
    folder = tmp_path_factory.mktemp("shadow")
    _, gbdt = simulate_and_train(folder, SMALL_SIM)
    _, mlp = simulate_and_train(folder, SMALL_SIM, model="mlp")
    return {"champion": gbdt, "mlp": mlp, "copy": copy_of_run(gbdt, folder / "copy")}


@contextlib.contextmanager
def _serve(settings: Any) -> Iterator[tuple[FastAPI, httpx.Client]]:
    app = create_app(settings)
    with LiveServer(app) as live, live.client(headers=AUTH) as client:
        wait_ready(client, timeout=120)  # three models to load, on a busy machine
        yield app, client


def _transactions(n: int, cards: int = 20) -> list[dict[str, Any]]:
    return [
        transaction(i, customer_id=f"c{i % cards}", amount=5.0 + (i * 37) % 400) for i in range(n)
    ]


def _shadow(audit: pl.DataFrame) -> list[dict[str, Any]]:
    return [orjson.loads(text) for text in audit["shadow"].to_list()]


def _offline(run: Path, audit: pl.DataFrame) -> np.ndarray:
    """What the run's bundle scores offline on the recorded feature vectors (float32, as the
    service feeds a model)."""
    bundle = load_bundle(run, completed=True)
    x = audit.select(bundle.features).to_numpy().astype(np.float32)
    return bundle.predict_calibrated(x)


def test_challengers_score_what_their_bundles_score_offline(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    shadow = f"{runs['mlp']},{runs['copy']}"
    settings = settings_for(
        runs["champion"], tmp_path / "data", shadow=shadow, shadow_budget_seconds=5.0
    )
    bodies = []
    with _serve(settings) as (_, client):
        for tx in _transactions(40):
            response = client.post("/v1/decisions", json=tx)
            assert response.status_code == 200, response.text
            bodies.append(response.json())
        text = client.get("/metrics").text
    audit = read_decisions(tmp_path / "data" / "audit.db")
    entries = _shadow(audit)
    champion = bodies[0]["model_version"]
    assert {b["model_version"] for b in bodies} == {champion}  # only the champion decides
    assert [e["decided_by"] for e in entries] == [champion] * 40
    assert [e["champion"]["score"] for e in entries] == [b["score"] for b in bodies]
    for k, run in enumerate((runs["mlp"], runs["copy"])):
        verdicts = [e["challengers"][k] for e in entries]
        assert {v["status"] for v in verdicts} == {"ok"}
        scores = np.array([v["score"] for v in verdicts])
        np.testing.assert_allclose(scores, _offline(run, audit), rtol=1e-6, atol=1e-9)
        # Its own (default) policy on its own score.
        expected = np.where(scores >= 0.9, "block", np.where(scores >= 0.5, "review", "approve"))
        assert [v["decision"] for v in verdicts] == expected.tolist()
        version = verdicts[0]["model_version"]
        agree = sum(v["decision"] == b["decision"] for v, b in zip(verdicts, bodies, strict=True))
        counted = metric_value(text, "fraudflow_shadow_decisions_total", model_version=version,
                               agreement="agree")  # fmt: skip
        assert counted == agree
        assert metric_value(text, "fraudflow_shadow_score_count", model_version=version) == 40
    # The copy is the champion's model under another version: it agrees on everything.
    copy = [e["challengers"][1] for e in entries]
    assert [c["decision"] for c in copy] == [b["decision"] for b in bodies]


def _raising(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    raise RuntimeError("challenger model is broken")


def _hanging(release: threading.Event, inner: ShadowPredict) -> ShadowPredict:
    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        release.wait()
        return inner(x)

    return predict


def _faulty_lineup(lineup: Lineup, release: threading.Event) -> Lineup:
    """The lineup with its first challenger raising and its second hanging until ``release``."""
    first, second = lineup.challengers
    return Lineup(
        lineup.champion,
        (
            dataclasses.replace(first, predict=_raising),
            dataclasses.replace(second, predict=_hanging(release, second.predict)),
        ),
        budget_seconds=0.05,
        salt=lineup.salt,
    )


def test_a_raising_or_hung_challenger_leaves_every_answer_intact(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    txs = _transactions(12)
    alone = []
    with _serve(settings_for(runs["champion"], tmp_path / "alone")) as (_, client):
        alone = [client.post("/v1/decisions", json=tx).content for tx in txs]
    shadow = f"{runs['mlp']},{runs['copy']}"
    release = threading.Event()
    settings = settings_for(runs["champion"], tmp_path / "data", shadow=shadow)
    try:
        with _serve(settings) as (app, client):
            service = app.state.service
            service.lineup = _faulty_lineup(service.lineup, release)
            answers = [client.post("/v1/decisions", json=tx) for tx in txs]
            text = client.get("/metrics").text
    finally:
        release.set()
    assert [a.status_code for a in answers] == [200] * len(txs)
    assert [a.content for a in answers] == alone  # byte for byte what the champion alone says
    entries = _shadow(read_decisions(tmp_path / "data" / "audit.db"))
    assert [e["challengers"][0]["status"] for e in entries] == ["error"] * len(txs)
    hung = [e["challengers"][1]["status"] for e in entries]
    # Late twice (the group it hangs on, and the one queued behind it), then not asked.
    assert hung == ["timed_out", "timed_out"] + ["busy"] * (len(txs) - 2)
    version = entries[0]["challengers"][0]["model_version"]
    errors = metric_value(
        text, "fraudflow_shadow_errors_total", model_version=version, kind="error"
    )
    assert errors == len(txs)
    other = entries[0]["challengers"][1]["model_version"]
    late = [
        metric_value(text, "fraudflow_shadow_errors_total", model_version=other, kind=kind)
        for kind in ("timed_out", "busy")
    ]
    assert late == [2, len(txs) - 2]


def test_split_is_stable_per_card_and_holds_its_share() -> None:
    cards = [f"card-{i}" for i in range(100_000)]
    buckets = split_buckets(cards, salt="s1")
    assert ((buckets >= 0) & (buckets < 1)).all()
    assert abs((buckets < 0.05).mean() - 0.05) < 0.004  # sd of the share: 0.0007
    assert abs(((buckets >= 0.05) & (buckets < 0.15)).mean() - 0.10) < 0.005
    np.testing.assert_array_equal(split_buckets(cards, salt="s1"), buckets)
    assert not np.array_equal(split_buckets(cards[:100], salt="s2"), buckets[:100])
    # Another process (another hash seed, as another worker or replica) puts cards alike.
    code = (
        "from fraudflow.serve.shadow import split_buckets;"
        "print(split_buckets([f'card-{i}' for i in range(1000)], salt='s1').tolist())"
    )
    env = os.environ | {"PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert orjson.loads(out.stdout) == buckets[:1000].tolist()


def test_split_hands_a_stable_share_of_cards_to_the_challenger(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    # A budget no loaded test machine misses: a late split challenger leaves its cards to the
    # champion (tested with the faulty challengers above).
    split = f"{runs['copy']}=50%"
    settings = settings_for(
        runs["champion"], tmp_path / "data", split=split, shadow_budget_seconds=5.0
    )
    bodies = []
    with _serve(settings) as (_, client):
        for tx in _transactions(80, cards=16):
            bodies.append(client.post("/v1/decisions", json=tx).json())
    audit = read_decisions(tmp_path / "data" / "audit.db")
    entries = _shadow(audit)
    champion = entries[0]["champion"]["model_version"]
    challenger = entries[0]["challengers"][0]["model_version"]
    cards = audit["customer_id"].to_list()
    chosen = split_buckets(cards, salt=settings.split_salt) < 0.5
    expected = [challenger if c else champion for c in chosen]
    assert [e["decided_by"] for e in entries] == expected
    assert [b["model_version"] for b in bodies] == expected
    assert audit["model_version"].to_list() == expected  # recorded as the decider's
    assert 0 < sum(chosen) < len(cards)
    by_card: dict[str, set[str]] = {}
    for card, version in zip(cards, expected, strict=True):
        by_card.setdefault(card, set()).add(version)
    assert all(len(v) == 1 for v in by_card.values())  # each card always the same model
    # The challenger's features are recorded under its version, readable as the champion's.
    names = load_bundle(runs["copy"], completed=True).features
    assert audit.select(names).null_count().sum_horizontal().item() == 0


def test_reload_names_challengers_and_promotes_one(runs: dict[str, Path], tmp_path: Path) -> None:
    with _serve(settings_for(runs["champion"], tmp_path / "data")) as (_, client):
        reload = client.post(
            "/v1/admin/reload",
            json={"shadow": [str(runs["mlp"])]},
            headers=ADMIN,
            timeout=RELOAD_SECONDS,
        )
        assert reload.status_code == 200, reload.text
        (challenger,) = reload.json()["shadow"]
        assert challenger["run"] == str(runs["mlp"]) and challenger["split"] is None
        client.post("/v1/decisions", json=transaction(1))
        promote = {"run": str(runs["mlp"]), "shadow": [str(runs["champion"])]}
        promoted = client.post(
            "/v1/admin/reload", json=promote, headers=ADMIN, timeout=RELOAD_SECONDS
        ).json()
        assert promoted["model_version"] == challenger["model_version"]
        assert promoted["shadow"][0]["model_version"] == reload.json()["model_version"]
        body = client.post("/v1/decisions", json=transaction(2)).json()
        assert body["model_version"] == challenger["model_version"]
        refused = client.post(
            "/v1/admin/reload",
            json={"shadow": [str(tmp_path / "nope")]},
            headers=ADMIN,
            timeout=RELOAD_SECONDS,
        )
        assert refused.status_code == 400
        assert refused.json() == {"detail": "run refused: the run folder does not exist"}
        kept = client.post(
            "/v1/admin/reload",
            json={"run": str(runs["mlp"])},
            headers=ADMIN,
            timeout=RELOAD_SECONDS,
        )
        assert [c["run"] for c in kept.json()["shadow"]] == [str(runs["champion"])]
    entries = _shadow(read_decisions(tmp_path / "data" / "audit.db"))
    versions = [[c["model_version"] for c in e["challengers"]] for e in entries]
    assert versions == [[challenger["model_version"]], [reload.json()["model_version"]]]


def test_challenger_features_must_be_computed_by_the_champion() -> None:
    spec = default_spec(FeatureConfig())
    assert feature_problem(spec, spec, spec.feature_names) == ""
    fewer = parse_spec(spec.to_dict() | {"features": spec.feature_names[:5]})
    assert feature_problem(spec, fewer, fewer.feature_names) == ""
    raw = spec.to_dict()
    first = raw["aggregate"][0]
    # The same names, counted per terminal: computed, but not the feature the challenger means.
    by_terminal = first | {"by": ["terminal_id"]}
    changed = parse_spec(raw | {"aggregate": [by_terminal, *raw["aggregate"][1:]]})
    problem = feature_problem(spec, changed, changed.feature_names)
    assert problem == (
        f"its feature spec's aggregate {first['name']!r} is not defined so by the champion's "
        "spec, whose online engine computes the features"
    )
    later = parse_spec(raw | {"label_delay": "9d"})
    assert feature_problem(spec, later, later.feature_names).startswith(
        "its feature spec's label delay is 9d"
    )


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ("{run}=5", "--split (FRAUDFLOW_SPLIT): must be RUN=<percent>% with 0 < percent <= 100, "
                    "however got '{run}=5'"),
        ("{run}=0%", "--split (FRAUDFLOW_SPLIT): must be RUN=<percent>% with 0 < percent <= 100, "
                     "however got '{run}=0%'"),
        ("{run}=60%,{other}=50%", "--split (FRAUDFLOW_SPLIT): the split shares add up to 110% "
                                  "> 100%"),
    ],
)  # fmt: skip
def test_bad_splits_are_refused_by_name(
    runs: dict[str, Path], tmp_path: Path, split: str, message: str
) -> None:
    text = split.format(run=runs["copy"], other=runs["mlp"])
    with pytest.raises(ConfigError) as raised:
        load_settings(run=runs["champion"], split=text, insecure_no_auth=True)
    assert str(raised.value) == "invalid serve settings: " + message.format(run=runs["copy"])
    assert parse_splits(f"{runs['copy']}=2.5%") == {runs["copy"].resolve(): 0.025}
