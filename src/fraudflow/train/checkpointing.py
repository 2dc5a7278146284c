"""Training checkpoints: everything needed to continue a run bit-for-bit, written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from fraudflow.errors import ArtifactError
from fraudflow.files import write_bytes_atomic

__all__ = ["BEST", "LAST", "load_checkpoint", "save_checkpoint"]

BEST = "best.pt"
LAST = "last.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialise to memory first, then write atomically: a crash never leaves a torn file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist")
    try:
        # Our own files only: they hold RNG states and config dicts, not just tensors.
        return dict(torch.load(path, map_location="cpu", weights_only=False))
    except Exception as exc:
        raise ArtifactError(f"checkpoint {path} cannot be read: {exc}") from None
