"""What a failed write is told as: the sentence follows the error (a full disk, a folder it may not write or a
read-only disk, anything else in the OS's own words), for the library's own words and on the command line."""

from __future__ import annotations

import errno
import os

import pytest
from safetensors import SafetensorError

from hybridopt.errors import UserError, first_line
from hybridopt.fileio import write_failure

KEPT = "The previous file is kept; free some space and run it again"
FIX = "The previous file is kept; run it again"


def _sentence(tmp_path, error: BaseException, fix: str | None = FIX) -> str:
    path = tmp_path / "f.bin"
    return write_failure(f"cannot write the file '{path}'", path, first_line(error), KEPT, error, fix)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_or_quota_asks_whether_the_disk_is_full(tmp_path, code):
    error = OSError(code, os.strerror(code), str(tmp_path / ".f.bin.tmp-1"))
    assert _sentence(tmp_path, error) == (f"cannot write the file '{tmp_path / 'f.bin'}' ({first_line(error)}); is the "
                                          f"disk full? {KEPT}")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_permission_or_a_read_only_disk_is_said_as_such_never_as_a_full_disk(tmp_path, code):
    error = OSError(code, os.strerror(code), str(tmp_path / ".f.bin.tmp-1"))
    said = _sentence(tmp_path, error)
    assert said == (f"cannot write the file '{tmp_path / 'f.bin'}' ({first_line(error)}); this process may not write "
                    f"in '{tmp_path}' (its permissions, or a read-only disk). {FIX}")
    assert "disk full" not in said and "space" not in said
    # callers that give no fix of their own (the checkpoint's, the packed export's) get a general one
    assert _sentence(tmp_path, error, None).endswith("(its permissions, or a read-only disk); make it writable, "
                                                     "or write elsewhere")


def test_any_other_error_is_the_os_reason_without_a_guess(tmp_path):
    error = OSError(errno.EIO, "Input/output error")
    failed = f"cannot write the file '{tmp_path / 'f.bin'}' ([Errno 5] Input/output error)"
    assert _sentence(tmp_path, error) == f"{failed}. {FIX}"
    assert _sentence(tmp_path, error, None) == failed


def test_the_errno_is_read_from_what_safetensors_and_python_quote(tmp_path):
    """safetensors words its OSError as Rust does (`... (os error 13)`); callers that pass only the first line
    (`why`, no exception) quote Python's `[Errno 13] ...`."""
    denied = SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    assert "may not write in" in _sentence(tmp_path, denied)
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "is the disk full?" in _sentence(tmp_path, full)
    path = tmp_path / "f.bin"
    assert "may not write in" in write_failure("cannot write", path, "[Errno 30] Read-only file system: 'x'", KEPT)
    # torch words a full disk without an errno (`unexpected pos 4096 vs 2048`): asked about as one, as before
    assert "is the disk full?" in _sentence(tmp_path, RuntimeError("[enforce fail] unexpected pos 4096 vs 2048"))


def test_an_error_without_errno_in_a_folder_it_may_not_write_is_said_as_such(tmp_path, monkeypatch):
    """torch.save into a folder it may not write raises `RuntimeError: File ... cannot be opened.`, no errno."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a user in a read-only folder
    said = _sentence(tmp_path, RuntimeError("File f.bin cannot be opened."))
    assert "may not write in" in said and "disk full" not in said


def test_a_missing_folder_is_said_whatever_the_error(tmp_path):
    path = tmp_path / "gone" / "f.bin"
    assert write_failure("cannot write", path, "x", KEPT, OSError(errno.EACCES, "Permission denied")) == (
        f"cannot write: the folder '{path.parent}' does not exist (was it moved or deleted?); create it or choose "
        "another")


# ------------------------------------------------------------------------------------------ the token cache
def _docs_and_tokenizer():
    from hybridopt.data.corpus import Document
    from hybridopt.models.tokenizer import train_bpe_tokenizer

    docs = [Document(f"d{i}", f"document number {i} says hello to the cache") for i in range(20)]
    return docs, train_bpe_tokenizer((d.text for d in docs), 300)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder; the next test simulates it")
def test_a_read_only_token_cache_folder_is_said_as_such(tmp_path):
    from hybridopt.data.blocks import cached_token_stream

    docs, tokenizer = _docs_and_tokenizer()
    cache = tmp_path / "tokens"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with pytest.raises(UserError) as e:
            cached_token_stream(docs, tokenizer, cache, "tok")
    finally:
        cache.chmod(0o755)
    assert f"; this process may not write in '{cache}' (its permissions, or a read-only disk). Nothing was " \
           "written; point HYBRIDOPT_CACHE at a folder it may write, and run the command again" in str(e.value)
    assert "disk full" not in str(e.value) and list(cache.iterdir()) == []


def test_a_token_cache_write_denied_is_said_as_such(tmp_path, monkeypatch):
    """As root (which writes anywhere) the denial is simulated where the file is opened."""
    from hybridopt.data import blocks

    docs, tokenizer = _docs_and_tokenizer()
    cache = tmp_path / "tokens"

    def denied(tensors, filename, metadata=None):
        raise OSError(errno.EACCES, "Permission denied", filename)

    monkeypatch.setattr(blocks, "save_file", denied)
    with pytest.raises(UserError) as e:
        blocks.cached_token_stream(docs, tokenizer, cache, "tok")
    (name,) = [line for line in str(e.value).split("'") if line.endswith(".safetensors")]
    path = cache / os.path.basename(name)
    assert str(e.value) == (f"cannot write the token cache '{path}' ([Errno 13] Permission denied: "
                            f"'{cache / f'.{path.name}.tmp-{os.getpid()}'}'); this process may not write in "
                            f"'{cache}' (its permissions, or a read-only disk). Nothing was written; point "
                            "HYBRIDOPT_CACHE at a folder it may write, and run the command again")
    assert list(cache.iterdir()) == []  # no temporary, no lock file
