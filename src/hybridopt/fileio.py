"""Low-level file writing and reading shared by data, quantization, export and training: atomic writes (of one
file, or of what a `save_pretrained` writes into a folder), what a failed write is told as, the stale
temporaries a killed write leaves, and a safetensors header read with its length checked first.

Owns no format of its own; imports nothing from hybridopt.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from safetensors import SafetensorError

# What a failed write (a full disk) raises: OSError from Python's own writes, RuntimeError from torch.save,
# SafetensorError from safetensors (`Error while serializing: I/O error: No space left on device (os error 28)`).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync the file, rename it to `path`, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(folder: Path, write) -> None:
    """Call `write(tmp)` with a new, empty folder `tmp` inside `folder` (a `save_pretrained` writes several files),
    then fsync each file it wrote and rename it into `folder`, over its namesake: a failed write leaves every file
    in `folder` as it was. `folder` is created if missing (its parent is not)."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    tmp = folder / f".save.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        for f in sorted(tmp.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failure(failed: str, path: Path, why: str, kept: str) -> str:
    """The one sentence for a write at `path` that failed with `why` (one of `WRITE_ERRORS`, by `errors.first_line`):
    `failed` (`cannot write the checkpoint 'F'`, whole at the caller so that it can be searched for), then that the
    folder is missing, or else the question whether the disk is full and `kept`, what is left and how to go on."""
    folder = Path(path).parent
    if not folder.is_dir():  # torch and safetensors report it in their own words, or as any failed write
        return f"{failed}: the folder '{folder}' does not exist (was it moved or deleted?); create it or choose another"
    return f"{failed} ({why}); is the disk full? {kept}"


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what `atomic_write` and `atomic_save` leave in `folder` when their process is killed mid-write:
    `.NAME.tmp-PID` files and folders of processes other than this one. Returns the paths removed."""
    stale = [p for p in Path(folder).glob(".*.tmp-*")
             if p.name.rpartition("-")[2].isdigit() and p.name.rpartition("-")[2] != str(os.getpid())]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return stale


def read_safetensors_header(path: Path, max_bytes: int = 100 << 20) -> tuple[dict, int]:
    """The JSON header of a safetensors file and its length in bytes, the length checked against `max_bytes`
    before the header is read (a forged length allocates nothing; safetensors itself caps headers at 100 MB).

    Raises:
        ValueError: the file is shorter than its header, the length is out of range, or the header is not a
            JSON object.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("truncated header")
        (n,) = struct.unpack("<Q", raw)
        if not 0 < n <= max_bytes:
            raise ValueError(f"header length {n} is out of range")
        text = f.read(n)
        if len(text) != n:
            raise ValueError("truncated header")
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, n


def json_text(value, indent: int | None = 2) -> str:
    """`value` as indented JSON that any JSON reader accepts: NaN and infinities (a diverged loss, a perplexity
    that overflowed) become null, which Python's `json` would otherwise write as the non-JSON `NaN`."""

    def clean(v):
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=indent, allow_nan=False)
