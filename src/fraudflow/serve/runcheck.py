"""The checks a run must pass before the service loads it, at start-up and on reload.

In this process, ``fraudflow.artifacts.check_run``: the run's ``DONE`` marker, each bundle
file against its recorded SHA-256, the feature version and names. Then, in a child process
(``python -m fraudflow.serve.runcheck RUN``, with a timeout): the bundle is loaded and a probe
row scored the way the service scores. A damaged model file can end the process that parses
it from native code, past any Python handler (LightGBM aborts on a truncated ``model.txt``),
so the first process to parse a new model is one whose death costs nothing. The hashes catch
files damaged after training; the child catches what they cannot, e.g. a file a newer library
wrote, or damage done before the hashes were recorded.

Each failure is a ``RunCheckError`` naming its check; ``refusal`` gives the fixed detail the
API answers for it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from fraudflow.artifacts import check_run, load_bundle
from fraudflow.errors import ArtifactError, RunCheckError

__all__ = ["REFUSALS", "check_in_child", "probe_run", "refusal", "verify_run"]

# The API's fixed detail per failed check; the message with paths and values goes to the log.
REFUSALS = {
    "run_missing": "run refused: the run folder does not exist",
    "not_done": "run refused: it has no DONE marker (its training did not finish)",
    "bundle_missing": "run refused: it holds no model bundle (model/meta.json)",
    "unsealed": "run refused: its bundle records no SHA-256 of its files (retrain it, or "
    "`fraudflow runs seal` files you trust)",
    "manifest": "run refused: its bundle's manifest.json is unreadable",
    "file_missing": "run refused: a bundle file is missing",
    "hash_mismatch": "run refused: a bundle file does not match its recorded SHA-256",
    "meta": "run refused: its bundle's meta.json is unreadable",
    "feature_version": "run refused: its feature version is not the one this build computes",
    "feature_spec": "run refused: its features are not the ones this build computes",
    "model_kind": "run refused: its model's kind of inputs is not served yet",
    "model_check_crashed": "run refused: loading its model crashed the checking process",
    "model_check_timeout": "run refused: loading and scoring its model timed out",
    "model_check_failed": "run refused: its model could not be loaded or could not score",
}
_OTHER = "the run cannot be loaded"
# Prefixes the child's one-line report on stderr, among whatever the libraries print there.
_REPORT = "fraudflow-run-check: "


def refusal(check: str) -> str:
    """The fixed API detail for a failed check."""
    return REFUSALS.get(check, _OTHER)


def verify_run(run_dir: Path, *, timeout_seconds: float) -> None:
    """Every check, in this process and then in a child; raises ``RunCheckError``."""
    check_run(run_dir)
    check_in_child(run_dir, timeout_seconds=timeout_seconds)


def check_in_child(run_dir: Path, *, timeout_seconds: float) -> None:
    """Load the bundle and score a probe row in a child process (see the module docstring)."""
    command = [sys.executable, "-m", "fraudflow.serve.runcheck", str(run_dir)]
    try:
        done = subprocess.run(
            command, capture_output=True, timeout=timeout_seconds, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:  # the child is killed before this is raised
        raise RunCheckError(
            "model_check_timeout",
            f"loading and scoring the model of {run_dir} in a child process took longer than "
            f"{timeout_seconds:g} s (FRAUDFLOW_MODEL_CHECK_TIMEOUT_SECONDS)",
        ) from None
    if done.returncode == 0:
        return
    said = _report(done.stderr)
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise RunCheckError(
            "model_check_crashed",
            f"loading the model of {run_dir} killed the checking process ({name}): a model "
            f"file is damaged, or not one this library version reads{said and ': ' + said}",
        )
    raise RunCheckError(
        "model_check_failed",
        f"the model of {run_dir} failed its check in a child process (exit "
        f"{done.returncode}): {said or _tail(done.stderr)}",
    )


def probe_run(run_dir: Path) -> None:
    """What the child does: load the bundle, score one row of zeros as the service would."""
    from fraudflow.serve.scoring import scorer_for  # the child's import, not the service's

    scorer = scorer_for(load_bundle(run_dir, completed=True), version="probe")
    scores = scorer.score(np.zeros((1, len(scorer.features)), dtype=np.float32))  # (1, F)
    score = scores.score
    if score.shape != (1,) or not np.isfinite(score).all() or not 0.0 <= score[0] <= 1.0:
        raise ArtifactError(f"the model scored a probe row {score!r}, not one probability")


def _report(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").splitlines()
    reports = [line.removeprefix(_REPORT) for line in lines if line.startswith(_REPORT)]
    return reports[-1] if reports else ""


def _tail(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1][:500] if lines else "no message"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"{_REPORT}usage: python -m fraudflow.serve.runcheck RUN", file=sys.stderr)
        return 2
    try:
        probe_run(Path(argv[1]))
    except Exception as exc:  # any failure, reported as one line for the parent
        print(f"{_REPORT}{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
