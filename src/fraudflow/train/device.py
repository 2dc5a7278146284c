"""Device and mixed-precision choice."""

from __future__ import annotations

import contextlib

import torch

from fraudflow.errors import ConfigError

__all__ = ["autocast", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, however no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, however got {name!r}")
    return torch.device(name)


def check_amp(amp: str, device: torch.device) -> None:
    if amp == "fp16" and device.type != "cuda":
        # fp16 on CPU is slow and, without a loss scaler tuned for it, numerically fragile.
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")
    if amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"--amp must be off, bf16 or fp16, however got {amp!r}")


def autocast(
    amp: str, device: torch.device, *, cache: bool = True
) -> contextlib.AbstractContextManager[object]:
    """``cache=False`` inside a CUDA graph capture: cached weight casts must not outlive it."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)
