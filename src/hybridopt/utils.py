"""Seeding, devices and the cache directory: the only process-wide concerns, kept in one place."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch



def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh CPU generator for explicit use.

    Args:
        seed: the run's seed.

    Returns:
        A `torch.Generator` seeded with `seed`, to pass to samplers and any random choice.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """Turn `auto`, `cpu` or `cuda[:N]` into a device, refusing CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{name} was asked for but no CUDA device is available; use cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use cpu, cuda or auto") from None


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype `torch.autocast` runs the student in for `--autocast name` on `device`, or None (off).

    `auto` is bfloat16 on a CUDA device that supports it and off elsewhere: on CPU bfloat16 matrix products
    are slower than float32 unless the CPU has bfloat16 units (benchmarks/compile_speed.py measures it).
    """
    if name == "off":
        return None
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return getattr(torch, name)


def cache_dir() -> Path:
    """Where the embedded corpus, tokenizer and default teacher are cached.

    `$HYBRIDOPT_CACHE` wins; otherwise the platform's user cache directory.
    """
    env = os.environ.get("HYBRIDOPT_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("hybridopt", appauthor=False))
