"""Hostile inputs to the data and generation paths: a pipe or device as --data, a corpus file over the size
limit, a prompt that is not UTF-8 or longer than the model's context, and a teacher cache whose stored values or
bytes are damaged. Each is one sentence (exit 2 on the command line) or, for the cache, a rebuild with a warning,
before any long work."""

from __future__ import annotations

import json
import os
import struct
import threading
import time

import pytest
import torch

from hybridopt.cli import main
from hybridopt.data import corpus
from hybridopt.data.corpus import MAX_FILE_BYTES, load_documents
from hybridopt.data.teacher_cache import build_cache, cache_key, ensure_cache, open_cache
from hybridopt.reporting import Reporter

CPU = torch.device("cpu")


@pytest.fixture
def unblock(tmp_path):
    """`unblock(fifo)`: should a reader block opening `fifo` (the check is missing), open and close its other end
    after a few seconds, so the test fails on its message instead of hanging."""
    done = threading.Event()

    def start(fifo):
        def writer():
            deadline = time.monotonic() + 5
            while not done.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            while not done.is_set():
                try:  # succeeds only while a reader is blocked in open()
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
                time.sleep(0.05)

        threading.Thread(target=writer, daemon=True).start()

    yield start
    done.set()


# ------------------------------------------------------------------------------------------ full disk
def test_a_full_disk_while_writing_the_token_cache_is_one_sentence(tiny_teacher, corpus_file, tmp_path, monkeypatch,
                                                                   capsys):
    """safetensors reports the failed write as SafetensorError (a traceback before). Now one line naming the cache
    file; no temporary is left, and the run folder holds nothing that blocks the same command run again."""
    import re
    import resource
    import signal

    from conftest import tiny_distill_args

    monkeypatch.setenv("HYBRIDOPT_CACHE", str(tmp_path / "cache"))  # a cache of its own: the streams are written
    out = tmp_path / "run"
    argv = tiny_distill_args(tiny_teacher, corpus_file, out, "--epochs", "1", "--max_steps_per_epoch", "1",
                             "--no-baseline")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))  # writes past 64 KiB fail, as on a full disk
    try:
        assert main(argv) == 2
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    cache = tmp_path / "cache" / "tokens"
    assert re.fullmatch(re.escape(f"hybridopt: error: cannot write the token cache '{cache}/") + "[0-9a-f]{20}"
                        + re.escape(".safetensors' (Error while serializing: I/O error: File too large (os error 27)); "
                                    "is the disk full? Free some space, or point HYBRIDOPT_CACHE at another disk, and "
                                    "run the command again"), err), err
    assert list(cache.iterdir()) == []  # nothing half written
    assert main(argv) == 0  # the same command, once there is room


# ------------------------------------------------------------------------------------------ --data
def test_a_fifo_as_data_is_refused_before_it_is_opened(tiny_teacher, tmp_path, unblock, capsys):
    from conftest import tiny_distill_args

    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    unblock(fifo)
    assert main(tiny_distill_args(tiny_teacher, fifo, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"--data: '{fifo}' is a named pipe (FIFO), not a regular file" in err and len(err.splitlines()) == 1


def test_devices_pipes_and_links_to_them_are_refused(tmp_path, unblock):
    (tmp_path / "null.txt").symlink_to("/dev/null")
    with pytest.raises(ValueError, match=r"null.txt' \(a link to '/dev/null'\) is a character device"):
        load_documents([str(tmp_path / "null.txt")])
    # A pipe behind a link, and one inside a folder (which is refused, not skipped unseen).
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some text\n\nmore text")
    os.mkfifo(folder / "b.jsonl")
    unblock(folder / "b.jsonl")
    (tmp_path / "pipe.txt").symlink_to(folder / "b.jsonl")
    with pytest.raises(ValueError, match=r"pipe.txt' \(a link to .*b.jsonl'\) is a named pipe"):
        load_documents([str(tmp_path / "pipe.txt")])
    with pytest.raises(ValueError, match=r"b.jsonl' is a named pipe \(FIFO\), not a regular file"):
        load_documents([str(folder)])


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: takes no disk
        f.truncate(MAX_FILE_BYTES + 1)
    (tmp_path / "small.txt").write_text("fine\n")

    def no_reading(path):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(corpus, "_read_bytes", no_reading)
    with pytest.raises(ValueError, match=r"big.txt' is 2.0 GiB, over the 2 GiB a corpus file may hold; split it"):
        load_documents([str(tmp_path / "small.txt"), str(big)])  # refused before small.txt is read


def test_a_source_that_outgrows_the_check_is_read_only_up_to_the_limit(tmp_path, monkeypatch):
    """Between the check and the read a file can grow (or be swapped for a pipe): the read stops at the limit
    instead of reading to the end. Here a pipe that never ends while the test runs."""
    fifo = tmp_path / "a.txt"
    os.mkfifo(fifo)
    done = threading.Event()

    def writer():
        with open(fifo, "wb") as f:
            f.write(b"x" * 200)
            f.flush()
            done.wait(10)  # the end of the data comes only after 10 s, or when the test ends

    threading.Thread(target=writer, daemon=True).start()
    monkeypatch.setattr(corpus, "_check_regular_file", lambda path: None)  # as if it changed after the check
    monkeypatch.setattr(corpus, "MAX_FILE_BYTES", 64)
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match=r"a.txt' is over the .* GiB a corpus file may hold"):
            load_documents([str(fifo)])
    finally:
        done.set()
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------------ generate --prompt
def test_a_prompt_that_is_not_utf8_is_refused_in_one_sentence(tiny_teacher, capsys):
    # What argv gives Python for the bytes b"abc\xff" on POSIX.
    prompt = b"abc\xff".decode("utf-8", "surrogateescape")
    assert main(["generate", "--model", str(tiny_teacher), "--prompt", prompt, "--device", "cpu",
                 "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "hybridopt: error: --prompt: the prompt is not valid UTF-8 (byte 0xff at character 3); pass UTF-8 text"


def test_a_prompt_longer_than_the_context_generates_from_its_end(tiny_teacher, capsys):
    from hybridopt.recipes.generate import generate_text
    from hybridopt.training.saved import load_model

    model, tokenizer, _ = load_model(tiny_teacher, CPU)
    context = model.config.max_position_embeddings
    prompt = "The with statement is used to wrap a block. " * 200
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert n > 4 * context
    seen = []
    real = model.generate

    def spy(ids, **kw):
        seen.append((ids.shape[1], kw["max_new_tokens"]))
        return real(ids, **kw)

    model.generate = spy
    out = generate_text(model, tokenizer, prompt, max_new_tokens=8)
    assert seen == [(context - 8, 8)]  # the prompt's end, and room for every new token
    assert out.startswith(prompt.rstrip()) and len(out) > len(prompt.rstrip())  # the whole prompt is printed
    assert (f"note: the prompt's {n} tokens and 8 new ones do not fit the model's context of {context}; "
            f"generating from the prompt's last {context - 8} tokens") in capsys.readouterr().err
    # More new tokens than the context holds: one prompt token, and new ones up to the context's end.
    seen.clear()
    generate_text(model, tokenizer, "Hello", max_new_tokens=10 * context)
    assert seen == [(1, context - 1)]


# ------------------------------------------------------------------------------------------ teacher cache
def _poke(path, tensor: str, index: int, fmt: str, value, drop_checksum: bool = False) -> None:
    """Overwrite element `index` of `tensor` in a cache file with `value` (struct `fmt`); without the checksum in
    the header if asked (a cache from before checksums, or a forger who removed it)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start = 8 + n + header[tensor]["data_offsets"][0] + index * struct.calcsize(fmt)
    data[start : start + struct.calcsize(fmt)] = struct.pack(fmt, value)
    if drop_checksum:
        del header["__metadata__"]["sha256"]
        text = json.dumps(header).encode()
        text += b" " * (n - len(text))  # same length: the data stays where the offsets say
        data[8 : 8 + n] = text
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tensor,fmt,value,message", [
    ("ids", "<h", 30000, "holds token ids outside the vocabulary of 512"),
    ("ids", "<h", -3, "holds token ids outside the vocabulary of 512"),
    ("logprobs", "<f", float("nan"), "holds log-probabilities that are not finite and <= 0"),
    ("logprobs", "<f", 0.5, "holds log-probabilities that are not finite and <= 0"),
])
def test_out_of_range_values_are_refused_when_the_cache_is_opened(teacher_and_blocks, tmp_path, tensor, fmt, value,
                                                                  message):
    teacher, blocks = teacher_and_blocks
    cache = build_cache(teacher, blocks, 4, 1.0, tmp_path / "c.safetensors", 4, CPU, Reporter(quiet=True))
    # The last block: a check of only the first blocks misses it. No checksum, so the value check alone finds it.
    _poke(cache.path, tensor, len(blocks) * 16 * 4 - 1, fmt, value, drop_checksum=True)
    with pytest.raises(ValueError, match=message):
        open_cache(cache.path, cache_key(teacher, blocks, 4, 1.0), blocks, 512)


def test_flipped_bytes_fail_the_checksum_and_a_cache_without_one_still_opens(teacher_and_blocks, tmp_path):
    teacher, blocks = teacher_and_blocks
    key = cache_key(teacher, blocks, 4, 1.0)
    cache = build_cache(teacher, blocks, 4, 1.0, tmp_path / "c.safetensors", 4, CPU, Reporter(quiet=True))
    _, logprobs = cache.targets([5])
    _poke(cache.path, "logprobs", 5 * 16 * 4, "<f", float(logprobs[0, 0, 0]) - 0.25)  # still a valid value
    with pytest.raises(ValueError, match="its checksum does not match its data"):
        open_cache(cache.path, key, blocks, 512)
    # Written before the checksum was added: it opens, its values still checked.
    cache = build_cache(teacher, blocks, 4, 1.0, tmp_path / "old.safetensors", 4, CPU, Reporter(quiet=True))
    _poke(cache.path, "logprobs", 0, "<f", float(cache.targets([0])[1][0, 0, 0]), drop_checksum=True)
    assert open_cache(cache.path, key, blocks, 512).targets([0])[0].shape == (1, 16, 4)


def test_a_damaged_cache_is_rebuilt_with_a_warning_before_training(teacher_and_blocks, tmp_path, capsys):
    teacher, blocks = teacher_and_blocks
    first = ensure_cache(teacher, blocks, 4, 1.0, tmp_path, 4, CPU)
    good = first.targets(list(range(len(blocks))))
    _poke(first.path, "ids", 7 * 16 * 4 + 3, "<h", 20000)
    capsys.readouterr()
    rebuilt = ensure_cache(teacher, blocks, 4, 1.0, tmp_path, 4, CPU)
    captured = capsys.readouterr()
    assert "rebuilding the damaged teacher cache" in captured.err and "outside the vocabulary" in captured.err
    assert "built in" in captured.out
    ids, logprobs = rebuilt.targets(list(range(len(blocks))))
    assert torch.equal(ids, good.ids) and torch.equal(logprobs, good.logprobs)
