"""Low-level file writing and reading shared by data, quantization, export and training: atomic writes, the
stale temporaries a killed write leaves, and a safetensors header read with its length checked first.

Owns no format of its own; imports nothing from hybridopt.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


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


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what `atomic_write` leaves in `folder` when its process is killed mid-write: `.NAME.tmp-PID`
    files of processes other than this one. Returns the paths removed."""
    stale = [p for p in Path(folder).glob(".*.tmp-*")
             if p.is_file() and p.name.rpartition("-")[2].isdigit() and p.name.rpartition("-")[2] != str(os.getpid())]
    for p in stale:
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
