"""Atomic, pickle-free training checkpoints.

A checkpoint is one `torch.save` file holding only tensors, numbers, strings, lists and dicts,
so it loads with `weights_only=True`. It is written to a temporary file in the same folder,
fsynced, then renamed over the old one: a crash at any moment leaves either the old checkpoint
or the new one, never a torn file.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridopt.errors import UserError, first_line
from hybridopt.fileio import WRITE_ERRORS, atomic_write, write_failure

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as weights-only-loadable values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"state": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", nps["state"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, payload: dict[str, Any]) -> Path:
    """Atomically write `payload` (plus format version and RNG state) to `out_dir/checkpoint.pt`."""
    path = Path(out_dir) / CHECKPOINT_NAME
    payload = {**payload, "format_version": FORMAT_VERSION, "rng": rng_state()}

    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except WRITE_ERRORS as e:  # torch.save reports a failed write (a full disk) as RuntimeError, not OSError
        raise UserError(write_failure(f"cannot write the checkpoint '{path}'", path, first_line(e),
                                      "The previous checkpoint is kept; free space and continue with --resume", e,
                                      "The previous checkpoint is kept; fix that and continue with --resume")) from None
    return path


def load_checkpoint(out_dir: Path) -> dict[str, Any]:
    """Read `out_dir/checkpoint.pt` with `weights_only=True` (no pickle code execution)."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"no checkpoint to resume in '{out_dir}' (expected {CHECKPOINT_NAME}); start a new run instead")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' is unreadable ({first_line(e)}); start a new run") from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint '{path}' has format {payload.get('format_version')}, this hybridopt reads {FORMAT_VERSION}")
    return payload
