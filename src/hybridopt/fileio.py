"""Low-level file writing and reading shared by data, quantization, export and training: atomic writes (of one
file, or of what a `save_pretrained` writes into a folder), what a failed write is told as, the stale
temporaries a killed write leaves, file locks (one writer per run folder, one builder per cache entry), and a
safetensors header read with its length checked first.

Owns no format of its own; imports nothing from hybridopt.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

try:
    import fcntl
except ImportError:  # Windows: no flock; nothing there is protected against a second writer
    fcntl = None

from safetensors import SafetensorError

T = TypeVar("T")

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


def write_failure(failed: str, path: Path, why: str, kept: str, error: BaseException | None = None,
                  fix: str | None = None) -> str:
    """The one sentence for a write at `path` that failed.

    It says what failed, the library's words, and then what the failure means, read from its errno (`error`'s, or
    the `[Errno N]` / `(os error N)` that `why` quotes): a full disk or quota (`is the disk full?`, then `kept`);
    a folder this process may not write, or a read-only disk; or else nothing beyond the OS's own reason. A
    failure without an errno (torch words its own) is a folder it may not write if `os.access` says so, and
    otherwise most often a full disk, and asked about as one. A missing folder is said as such, whatever the
    error.

    Args:
        failed: `cannot write the checkpoint 'F'`, whole at the caller so that it can be searched for.
        path: the file (or folder) written.
        why: the error's first line (`errors.first_line`).
        kept: after a full disk, what is left and how to go on (`The previous checkpoint is kept; free space and
            continue with --resume`).
        error: the exception, for its errno.
        fix: after any other failure, what is left and how to go on; without it, a permission failure says
            `make it writable, or write elsewhere` and any other says nothing more.
    """
    folder = Path(path).parent
    if not folder.is_dir():  # torch and safetensors report it in their own words, or as any failed write
        return f"{failed}: the folder '{folder}' does not exist (was it moved or deleted?); create it or choose another"
    code = _errno(error, why)
    if code is None and not os.access(folder, os.W_OK):  # torch says `cannot be opened` of a folder it may not write
        code = errno.EACCES
    if code is None or code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # EFBIG: a file-size limit, as full
        return f"{failed} ({why}); is the disk full? {kept}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{failed} ({why}); this process may not write in '{folder}' (its permissions, or a read-only "
                f"disk)" + (f". {fix}" if fix else "; make it writable, or write elsewhere"))
    return f"{failed} ({why})" + (f". {fix}" if fix else "")


def _errno(error: BaseException | None, why: str) -> int | None:
    """The errno of a failed write: an OSError's own, or the one its message quotes (safetensors writes Rust's
    `... (os error 28)`, Python `[Errno 28] ...`); None when there is none."""
    if isinstance(getattr(error, "errno", None), int):
        return error.errno
    for text in (str(error) if error is not None else "", why):
        if m := re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", text):
            return int(m.group(1) or m.group(2))
    return None


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


def lock_file(path: Path, blocking: bool = False) -> IO | None:
    """An exclusive `flock` on the file `path` (created if missing), held until the returned file is closed or the
    process ends; None when another process holds it (`blocking`: wait for it instead). Writes this process's
    pid into the file, for `lock_holder`."""
    f = open(path, "a+")
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def lock_holder(path: Path) -> str:
    """Who holds the lock file `path`, from the pid it wrote: `hybridopt process N` (or `another hybridopt
    process`)."""
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"hybridopt process {pid}" if pid.isdigit() else "another hybridopt process"


def entry_lock_path(path: Path) -> Path:
    """The lock file of the cache entry `path`: `.NAME.lock` beside it (hidden, and no name an entry has)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def read_or_build(path: Path, read: Callable[[], T | None], build: Callable[[], T], what: str,
                  say: Callable[[str], None] | None = None) -> T:
    """The cache entry at `path`: `read()` (None when the entry is missing or damaged), else `build()` (which
    writes it, atomically) while holding the entry's lock, so that processes wanting the same entry at once
    build it once.

    A second process finds the lock held, says once what it waits for (`say`, default stderr): `Waiting for
    hybridopt process N, which is building WHAT PATH`, waits for the first, then reads what the first wrote.
    The entry is read again under the lock only if the file changed since the first look (someone wrote it), so
    a damaged entry is warned about once. The lock file is removed when its holder is done (a killed holder's
    is left, and means nothing: only a held flock makes anyone wait). Where the lock file cannot be created (a
    folder this process may not write) it builds unlocked: its write fails there too, and says why. The
    entry's folder is created if missing.
    """
    path = Path(path)
    before = _identity(path)
    if before is not None and (found := read()) is not None:
        return found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # `build`'s write fails there too, and says why
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    lock = _hold(entry_lock_path(path), f"{what} {path}", say)
    try:
        if _identity(path) not in (None, before) and (found := read()) is not None:
            return found  # what the process we waited for (or one just before us) wrote
        return build()
    finally:
        if lock is not None:
            try:  # still held: a process that opened the file meanwhile finds it gone and locks a new one
                entry_lock_path(path).unlink()
            except OSError:
                pass
            lock.close()


def _identity(path: Path) -> tuple | None:
    """What changes when a file is replaced (an atomic write's rename gives it a new inode), or None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _hold(lock_path: Path, building: str, say: Callable[[str], None]) -> IO | None:
    """Hold the lock file `lock_path`, saying once, if another process holds it, that this one waits for it while
    it builds `building`; None if the file cannot be created."""
    said = False
    while True:
        try:
            lock = lock_file(lock_path)
            if lock is None:
                if not said:
                    say(f"Waiting for {lock_holder(lock_path)}, which is building {building}")
                    said = True
                lock = lock_file(lock_path, blocking=True)
        except OSError:
            return None
        try:
            held, there = os.fstat(lock.fileno()), os.stat(lock_path)
            if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                return lock
        except OSError:
            pass
        lock.close()  # its holder removed the file after this process opened it: lock the one there now


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
