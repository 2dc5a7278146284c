"""The CLI starts without the heavy libraries: each command imports what it runs when it runs.

Checked in a fresh interpreter (this test process has imported everything already)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "polars", "numpy", "sklearn", "scipy", "lightgbm", "mlflow", "fastapi")

_PROBE = """
import json, sys
from typer.testing import CliRunner
from fraudflow.cli.main import app
result = CliRunner().invoke(app, sys.argv[1:])
heavy = [name for name in {heavy!r} if name in sys.modules]
print(json.dumps({{"exit_code": result.exit_code, "heavy": heavy, "output": result.output}}))
"""


def _probe(*args: str) -> dict[str, object]:
    code = _PROBE.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["train", "--help"],
        ["generate", "--help"],
        ["features", "--help"],
        ["serve", "--help"],
        ["demo", "--help"],
        ["evaluate", "--help"],
        ["policy", "calibrate", "--help"],
        ["decisions", "export", "--help"],
        ["runs", "list", "--help"],
    ],
)
def test_help_imports_no_heavy_library(args: list[str]) -> None:
    probe = _probe(*args)
    assert probe["exit_code"] == 0, probe["output"]
    assert "Usage" in str(probe["output"])
    assert probe["heavy"] == []


def test_a_command_imports_what_it_runs() -> None:
    # The probe can see an import: a command that runs does pull in its library.
    probe = _probe("train", "--features", "missing.parquet", "--model", "mlp", "--out", "x")
    assert probe["exit_code"] == 2
    assert "torch" in probe["heavy"]  # type: ignore[operator]
