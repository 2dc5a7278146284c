"""Champion and challengers (``fraudflow.serve.shadow``) on the real app over loopback HTTP:
challengers score what their bundles score offline, a failing or hung challenger leaves every
champion answer as it is (and is reported), the split is stable per card, reloads carry the
challengers."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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
from fraudflow.serve import service as service_module
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions, read_shadow_verdicts
from fraudflow.serve.settings import load_settings, parse_splits
from fraudflow.serve.shadow import (
    Lineup,
    ShadowPredict,
    bundle_predict,
    feature_problem,
    split_buckets,
)
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
def _serve(settings: Any, **lineup: Any) -> Iterator[tuple[FastAPI, httpx.Client]]:
    """The real app on loopback; ``lineup``: fields of the served ``Lineup`` to replace
    (its challengers' predict functions by position: ``predicts``), before any request."""
    app = create_app(settings)
    with LiveServer(app) as live, live.client(headers=AUTH) as client:
        wait_ready(client, timeout=120)  # three models to load, on a busy machine
        if lineup:
            service = app.state.service
            service.lineup = _replaced(service.lineup, **lineup)
        yield app, client


def _replaced(
    lineup: Lineup, *, predicts: Sequence[ShadowPredict | None] = (), **fields: Any
) -> Lineup:
    """``lineup`` with new fields and challengers' predict functions (None: kept); its lanes
    are new (``Lineup.__post_init__``), the old ones closed."""
    challengers = tuple(
        c if p is None else dataclasses.replace(c, predict=p)
        for c, p in itertools.zip_longest(lineup.challengers, predicts[: len(lineup.challengers)])
    )
    lineup.close()
    return dataclasses.replace(lineup, challengers=challengers, **fields)


def _reload(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/admin/reload", json=body, headers=ADMIN, timeout=RELOAD_SECONDS)


def _transactions(n: int, cards: int = 20) -> list[dict[str, Any]]:
    return [
        transaction(i, customer_id=f"c{i % cards}", amount=5.0 + (i * 37) % 400) for i in range(n)
    ]


def _decide_all(client: httpx.Client, txs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each transaction decided in turn: the answers' bodies (each must be a 200)."""
    bodies = []
    for tx in txs:
        response = client.post("/v1/decisions", json=tx)
        assert response.status_code == 200, response.text
        bodies.append(response.json())
    return bodies


def _shadow(audit: pl.DataFrame) -> list[dict[str, Any]]:
    return [orjson.loads(text) for text in audit["shadow"].to_list()]


def _offline(run: Path, audit: pl.DataFrame) -> np.ndarray:
    """What the run's bundle scores offline on the recorded feature vectors (float32, as the
    service feeds a model)."""
    bundle = load_bundle(run, completed=True)
    x = audit.select(bundle.features).to_numpy().astype(np.float32)
    return bundle.predict_calibrated(x)


def _metrics_when(client: httpx.Client, done: Callable[[str], bool], timeout: float = 60) -> str:
    """The metrics text once ``done`` holds of it: shadow verdicts are counted when scored,
    after the answers."""
    deadline = time.monotonic() + timeout
    while not done(text := client.get("/metrics").text):
        assert time.monotonic() < deadline, "the shadow verdicts were never all counted"
        time.sleep(0.05)
    return text


def _scored(text: str, version: str) -> float:
    return metric_value(text, "fraudflow_shadow_score_count", model_version=version)


def _errors(text: str, version: str, kind: str) -> float:
    return metric_value(text, "fraudflow_shadow_errors_total", model_version=version, kind=kind)


def test_challengers_score_what_their_bundles_score_offline(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    shadow = f"{runs['mlp']},{runs['copy']}"
    with _serve(settings_for(runs["champion"], tmp_path / "data", shadow=shadow)) as (app, client):
        versions = [c.model_version for c in app.state.service.lineup.challengers]
        bodies = _decide_all(client, _transactions(40))
        text = _metrics_when(client, lambda t: all(_scored(t, v) == 40 for v in versions))
    path = tmp_path / "data" / "audit.db"
    audit = read_decisions(path)
    entries = _shadow(audit)
    champion = bodies[0]["model_version"]
    assert {b["model_version"] for b in bodies} == {champion}  # only the champion decides
    assert [e["decided_by"] for e in entries] == [champion] * 40
    assert [e["champion"]["score"] for e in entries] == [b["score"] for b in bodies]
    # Recorded apart from the decisions, in later commits of the same log, joined on reading.
    assert len(read_shadow_verdicts(path)) == 80
    for k, run in enumerate((runs["mlp"], runs["copy"])):
        verdicts = [e["challengers"][k] for e in entries]
        assert {v["status"] for v in verdicts} == {"ok"}
        assert {v["model_version"] for v in verdicts} == {versions[k]}
        scores = np.array([v["score"] for v in verdicts])
        np.testing.assert_allclose(scores, _offline(run, audit), rtol=1e-6, atol=1e-9)
        # Its own (default) policy on its own score.
        expected = np.where(scores >= 0.9, "block", np.where(scores >= 0.5, "review", "approve"))
        assert [v["decision"] for v in verdicts] == expected.tolist()
        agree = sum(v["decision"] == b["decision"] for v, b in zip(verdicts, bodies, strict=True))
        counted = metric_value(text, "fraudflow_shadow_decisions_total",
                               model_version=versions[k], agreement="agree")  # fmt: skip
        assert counted == agree
    # The copy is the champion's model under another version: it agrees on everything.
    copy = [e["challengers"][1] for e in entries]
    assert [c["decision"] for c in copy] == [b["decision"] for b in bodies]


def load_challenger_predict(run: Path) -> ShadowPredict:
    return bundle_predict(load_bundle(run, completed=True))


def _raising(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    raise RuntimeError("challenger model is broken")


def _hanging(release: threading.Event, inner: ShadowPredict) -> ShadowPredict:
    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        release.wait()
        return inner(x)

    return predict


def test_a_raising_or_hung_challenger_leaves_every_answer_intact_and_prompt(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    txs = _transactions(12)
    with _serve(settings_for(runs["champion"], tmp_path / "alone")) as (_, client):
        alone = [client.post("/v1/decisions", json=tx).content for tx in txs]
    shadow = f"{runs['mlp']},{runs['copy']}"
    settings = settings_for(runs["champion"], tmp_path / "data", shadow=shadow)
    release = threading.Event()
    hung = _hanging(release, load_challenger_predict(runs["copy"]))
    # A budget far beyond the test: an answer that waited for a challenger would show it. A
    # lane of 4 queued rows, never counted as stuck, scoring each group as soon as it comes:
    # what the hung one takes is deterministic.
    lineup = {"predicts": [_raising, hung], "budget_seconds": 120.0, "max_queued_rows": 4,
              "max_lag_seconds": 600.0, "linger_seconds": 0.0}  # fmt: skip
    monkeypatch.setattr(service_module, "DRAIN_SECONDS", 1.0)  # the stop waits that long
    answers, seconds = [], []
    try:
        with _serve(settings, **lineup) as (app, client):
            versions = [c.model_version for c in app.state.service.lineup.challengers]
            for tx in txs:
                started = time.monotonic()
                answers.append(client.post("/v1/decisions", json=tx))
                seconds.append(time.monotonic() - started)
            text = _metrics_when(client, lambda t: _errors(t, versions[0], "error") == len(txs))
        assert not release.is_set()  # every answer came back, and the server stopped, hung
    finally:
        release.set()
    assert max(seconds) < 30  # far below the budget: nobody waited for the challengers
    assert [a.status_code for a in answers] == [200] * len(txs)
    assert [a.content for a in answers] == alone  # byte for byte what the champion alone says
    entries = _shadow(read_decisions(tmp_path / "data" / "audit.db"))
    assert [e["challengers"][0]["status"] for e in entries] == ["error"] * len(txs)
    # The hung model's lane took the first group (or the first few, if it woke late) and
    # queued 4 rows behind it: still held at the stop, they are recorded as timed out. The
    # groups offered to the full lane were recorded as busy at once.
    statuses = [e["challengers"][1]["status"] for e in entries]
    held = statuses.count("timed_out")
    assert 5 <= held < len(txs)
    assert statuses == ["timed_out"] * held + ["busy"] * (len(txs) - held)
    assert _errors(text, versions[1], "busy") == len(txs) - held


def test_a_graceful_stop_records_every_queued_verdict_scored_in_batches(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    calls: list[int] = []
    inner = load_challenger_predict(runs["copy"])

    def slow(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(x))
        time.sleep(0.2)
        return inner(x)

    settings = settings_for(runs["champion"], tmp_path / "data", shadow=str(runs["copy"]))
    with _serve(settings, predicts=[slow]) as (_, client):
        _decide_all(client, _transactions(20))
        # Stopped at once: most verdicts are still queued.
    audit = read_decisions(tmp_path / "data" / "audit.db")
    verdicts = [e["challengers"][0] for e in _shadow(audit)]
    assert [v["status"] for v in verdicts] == ["ok"] * 20  # none lost, none missing
    np.testing.assert_allclose(
        [v["score"] for v in verdicts], _offline(runs["copy"], audit), rtol=1e-6
    )
    assert sum(calls) == 20 and len(calls) < 20  # what queued meanwhile, scored as one batch


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


@pytest.mark.parametrize("via", ["serve", "reload"])
def test_split_hands_a_stable_share_of_cards_to_the_challenger(
    runs: dict[str, Path], tmp_path: Path, via: str
) -> None:
    # A budget no loaded test machine misses: a late split challenger leaves its cards to the
    # champion.
    split = {"split": f"{runs['copy']}=50%"} if via == "serve" else {}
    settings = settings_for(runs["champion"], tmp_path / "data", shadow_budget_seconds=5.0, **split)
    with _serve(settings) as (_, client):
        if via == "reload":  # the same share, set by a reload
            reload = _reload(client, split={str(runs["copy"]): "50%"})
            assert reload.status_code == 200, reload.text
            assert [(c["run"], c["split"]) for c in reload.json()["shadow"]] == [
                (str(runs["copy"].resolve()), 0.5)
            ]
        bodies = _decide_all(client, _transactions(80, cards=16))
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
        reload = _reload(client, shadow=[str(runs["mlp"])])
        assert reload.status_code == 200, reload.text
        (challenger,) = reload.json()["shadow"]
        assert challenger["run"] == str(runs["mlp"]) and challenger["split"] is None
        client.post("/v1/decisions", json=transaction(1))
        promoted = _reload(client, run=str(runs["mlp"]), shadow=[str(runs["champion"])]).json()
        assert promoted["model_version"] == challenger["model_version"]
        assert promoted["shadow"][0]["model_version"] == reload.json()["model_version"]
        body = client.post("/v1/decisions", json=transaction(2)).json()
        assert body["model_version"] == challenger["model_version"]
        refused = _reload(client, shadow=[str(tmp_path / "nope")])
        assert refused.status_code == 400
        assert refused.json() == {"detail": "run refused: the run folder does not exist"}
        kept = _reload(client, run=str(runs["mlp"]))
        assert [c["run"] for c in kept.json()["shadow"]] == [str(runs["champion"])]
        # A split is refused as --split refuses it, and nothing changes.
        bad = _reload(client, split={str(runs["champion"]): "5"})
        assert bad.status_code == 422
        (issue,) = bad.json()["detail"]
        assert issue["loc"] == ["body", "split"]
        assert issue["msg"] == (
            "Value error, must be RUN=<percent>% with 0 < percent <= 100, however got "
            f"'{runs['champion']}=5'"
        )
    entries = _shadow(read_decisions(tmp_path / "data" / "audit.db"))
    versions = [[c["model_version"] for c in e["challengers"]] for e in entries]
    assert versions == [[challenger["model_version"]], [reload.json()["model_version"]]]
    assert [e["challengers"][0]["status"] for e in entries] == ["ok", "ok"]


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
