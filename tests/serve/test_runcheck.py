"""Runs are verified before they serve: on reload (real app, real loopback HTTP) and at the
start of ``fraudflow serve``.

Each broken run is a copy of a good one with one defect: a model file cut to 3,000 bytes
(LightGBM aborts the process that parses it), no ``DONE`` marker, a feature version from
another build, a byte flipped in a bundle file, no recorded hashes.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fraudflow.artifacts import MANIFEST, check_run, feature_config_of, seal_bundle
from fraudflow.errors import RunCheckError
from fraudflow.features import default_spec
from fraudflow.serve.app import create_app
from fraudflow.serve.runcheck import REFUSALS, check_in_child
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
from tests.serve.test_cli import assert_fails, invoke


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("runcheck"), SMALL_SIM)
    return run


# --- broken copies ------------------------------------------------------------------------


def truncated(run_dir: Path, dest: Path, *, seal: bool) -> Path:
    """model.txt cut to 3,000 bytes; ``seal``: its hashes recorded after the cut, as if the
    damage happened before saving, so only the child's load can find it."""
    shutil.copytree(run_dir, dest)
    model = dest / "model" / "model.txt"
    model.write_bytes(model.read_bytes()[:3000])
    if seal:
        seal_bundle(dest)
    return dest


def without_done(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    (dest / "DONE").unlink()
    return dest


def from_feature_version(run_dir: Path, dest: Path, version: str) -> Path:
    """A run as another build would write it: hashes recorded, another feature version."""
    shutil.copytree(run_dir, dest)
    meta_path = dest / "model" / "meta.json"
    meta_path.write_text(
        json.dumps(json.loads(meta_path.read_text()) | {"feature_version": version})
    )
    seal_bundle(dest)
    return dest


def with_a_flipped_byte(run_dir: Path, dest: Path, name: str = "model.txt") -> Path:
    shutil.copytree(run_dir, dest)
    path = dest / "model" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return dest


def unsealed(run_dir: Path, dest: Path) -> Path:
    """A bundle saved before hashes were recorded."""
    shutil.copytree(run_dir, dest)
    (dest / "model" / MANIFEST).unlink()
    return dest


# --- reload over HTTP ---------------------------------------------------------------------


@pytest.fixture
def client(run_dir: Path, tmp_path: Path) -> Iterator[httpx.Client]:
    app = create_app(settings_for(run_dir, tmp_path / "data"))
    with LiveServer(app) as live, live.client() as c:
        wait_ready(c)
        yield c


def _reload(client: httpx.Client, run: Path) -> httpx.Response:
    return client.post("/v1/admin/reload", json={"run": str(run)}, headers=ADMIN)


def _old_model_answers(client: httpx.Client, version: str, i: int) -> None:
    assert client.get("/readyz").json() == {"status": "ready", "model_version": version}
    decided = client.post("/v1/decisions", json=transaction(i), headers=AUTH)
    assert decided.status_code == 200 and decided.json()["model_version"] == version


def test_a_model_that_crashes_its_library_is_refused_and_the_server_survives(
    client: httpx.Client, run_dir: Path, tmp_path: Path
) -> None:
    before = client.get("/readyz").json()["model_version"]
    response = _reload(client, truncated(run_dir, tmp_path / "cut", seal=True))
    assert response.status_code == 400
    assert response.json() == {"detail": REFUSALS["model_check_crashed"]}
    _old_model_answers(client, before, 1)  # this process is alive and unchanged
    # The same damage after saving is a hash mismatch, found before any child starts.
    cut_later = truncated(run_dir, tmp_path / "cut-later", seal=False)
    assert _reload(client, cut_later).json() == {"detail": REFUSALS["hash_mismatch"]}
    good = _reload(client, copy_of_run(run_dir, tmp_path / "good"))
    assert good.status_code == 200, good.text
    assert good.json()["previous_model_version"] == before
    assert client.get("/readyz").json()["model_version"] == good.json()["model_version"]
    assert metric_value(client.get("/metrics").text, "fraudflow_errors_total", kind="reload") == 2


@pytest.mark.parametrize(
    ("make", "check"),
    [
        (without_done, "not_done"),
        (lambda run, dest: from_feature_version(run, dest, "999"), "feature_version"),
        (with_a_flipped_byte, "hash_mismatch"),
        (lambda run, dest: with_a_flipped_byte(run, dest, "meta.json"), "hash_mismatch"),
        (unsealed, "unsealed"),
    ],
    ids=["no-DONE", "feature-version-999", "flipped-model-byte", "flipped-meta-byte", "unsealed"],
)
def test_a_broken_run_is_refused_by_name_and_the_old_model_keeps_serving(
    client: httpx.Client,
    run_dir: Path,
    tmp_path: Path,
    make: Callable[[Path, Path], Path],
    check: str,
) -> None:
    before = client.get("/readyz").json()["model_version"]
    broken = make(run_dir, tmp_path / "broken")
    response = _reload(client, broken)
    assert response.status_code == 400
    assert response.json() == {"detail": REFUSALS[check]}
    _old_model_answers(client, before, 1)


# --- the checks themselves ----------------------------------------------------------------


def test_check_messages_say_what_was_expected_and_found(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RunCheckError, match="trained on feature version '999', however this "
                       "fraudflow computes version '1'") as version:  # fmt: skip
        check_run(from_feature_version(run_dir, tmp_path / "v", "999"))
    assert version.value.check == "feature_version"
    with pytest.raises(RunCheckError, match="does not match its recorded SHA-256: expected"):
        check_run(with_a_flipped_byte(run_dir, tmp_path / "flip"))
    with pytest.raises(RunCheckError, match=r"fraudflow runs seal .*/old"):
        check_run(unsealed(run_dir, tmp_path / "old"))
    with pytest.raises(RunCheckError, match="has no DONE marker: its training did not finish"):
        check_run(without_done(run_dir, tmp_path / "nd"))


def test_a_bundle_whose_spec_hash_does_not_match_its_spec_is_refused(
    run_dir: Path, tmp_path: Path
) -> None:
    meta = json.loads((run_dir / "model" / "meta.json").read_text())
    assert meta["feature_spec_hash"] == default_spec(feature_config_of(meta)).hash
    dest = tmp_path / "custom"
    shutil.copytree(run_dir, dest)
    meta_path = dest / "model" / "meta.json"
    meta_path.write_text(json.dumps(meta | {"feature_spec_hash": "ab" * 32}))
    seal_bundle(dest)
    with pytest.raises(
        RunCheckError, match=r"records the feature spec hash abababababab, however its recorded"
    ) as custom:
        check_run(dest)
    assert custom.value.check == "feature_spec"


def test_the_child_reports_the_signal_that_killed_it(run_dir: Path, tmp_path: Path) -> None:
    cut = truncated(run_dir, tmp_path / "cut", seal=True)
    check_run(cut)  # every in-process check passes: only loading the model finds the damage
    # LightGBM aborts or segfaults on the cut file, depending on where its parser gives up.
    with pytest.raises(
        RunCheckError, match=r"killed the checking process \(SIG(ABRT|SEGV)\)"
    ) as crash:
        check_in_child(cut, timeout_seconds=120)
    assert crash.value.check == "model_check_crashed"
    check_in_child(run_dir, timeout_seconds=120)  # a good run passes


def test_a_child_past_its_timeout_is_refused(run_dir: Path) -> None:
    with pytest.raises(RunCheckError, match=r"took longer than 0.01 s") as slow:
        check_in_child(run_dir, timeout_seconds=0.01)
    assert slow.value.check == "model_check_timeout"


# --- start-up -----------------------------------------------------------------------------


def test_serve_refuses_a_bad_run_at_start_with_exit_2(run_dir: Path, tmp_path: Path) -> None:
    keys = {"FRAUDFLOW_API_KEYS": "k"}
    no_done = without_done(run_dir, tmp_path / "nd")
    assert_fails(
        invoke("serve", "--run", no_done, env=keys),
        f"error: run {no_done} has no DONE marker: its training did not finish",
    )
    cut = truncated(run_dir, tmp_path / "cut", seal=True)
    crashed = invoke("serve", "--run", cut, env=keys)
    assert_fails(crashed, f"error: loading the model of {cut} killed the checking process (SIG")
    assert re.search(r"\(SIG(ABRT|SEGV)\): a model file is damaged", crashed.stderr)
