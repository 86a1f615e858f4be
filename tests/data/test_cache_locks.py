"""One builder per cache entry (token streams, data clusters, teacher logits, the embedded corpus), with two real
processes: a second process that wants an entry while the first builds it waits, says for whom, and then reads
what the first wrote instead of building it again; the lock file is no entry, and one left by a killed builder
makes nobody wait."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import fork_logged
from hybridopt.fileio import entry_lock_path
from hybridopt.models.tokenizer import train_bpe_tokenizer

CPU = torch.device("cpu")
# Children fork from this process: OpenMP (torch's, faiss's) must not have a team of several threads here.
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Site:
    """A cache and how a test drives it.

    Attributes:
        run: get the entry: read it, or build it (the cache's own function, as the recipes call it).
        module, build: the function, `module.build`, that computes an entry: held in the first process, counted
            in the others.
        folder: where the cache's entries are.
        digest: what the result holds, as text (equal for equal results).
    """

    run: Callable[[], object]
    module: object
    build: str
    folder: Path
    digest: Callable[[object], str]


def _tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _tokens_site(tmp_path: Path, request) -> Site:
    from hybridopt.data import blocks
    from hybridopt.data.corpus import Document

    docs = [Document(f"d{i}", f"document number {i} says hello to the cache") for i in range(20)]
    tokenizer = train_bpe_tokenizer((d.text for d in docs), 300)
    folder = tmp_path / "tokens"
    return Site(lambda: blocks.cached_token_stream(docs, tokenizer, folder, "tok"), blocks, "tokenize_documents",
                folder, _tensor_digest)


def _teacher_logits_site(tmp_path: Path, request) -> Site:
    from hybridopt.data import teacher_cache

    teacher, blocks = request.getfixturevalue("teacher_and_blocks")
    folder = tmp_path / "teacher-logits"

    def digest(cache) -> str:
        return _tensor_digest(*cache.targets(list(range(len(blocks)))))

    return Site(lambda: teacher_cache.ensure_cache(teacher, blocks, 4, 1.0, folder, 4, CPU), teacher_cache,
                "build_cache", folder, digest)


def _clusters_site(tmp_path: Path, request) -> Site:
    from hybridopt.data import clusters
    from hybridopt.data.blocks import TokenBlocks

    teacher, _ = request.getfixturevalue("teacher_and_blocks")
    g = torch.Generator().manual_seed(0)
    train = TokenBlocks(torch.randint(0, 500, (16 * 24 + 1,), generator=g), 16)
    val = TokenBlocks(torch.randint(0, 500, (16 * 6 + 1,), generator=g), 16)
    folder = tmp_path / "clusters"

    def digest(c) -> str:
        return _tensor_digest(*(torch.from_numpy(a) for a in (c.labels, c.val_labels, c.centroids)))

    return Site(lambda: clusters.cluster_data(teacher, train, val, 3, 0, 8, CPU, cache=folder), clusters, "_cluster",
                folder, digest)


def _corpus_site(tmp_path: Path, request) -> Site:
    from hybridopt.data import splits
    from hybridopt.data.corpus import Document

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("HYBRIDOPT_CACHE", str(tmp_path / "cache"))
    # the real corpus reads the whole standard library: seconds, and nothing this test is about
    monkeypatch.setattr(splits, "embedded_corpus", lambda: [Document(f"d{i}", f"text {i}") for i in range(3)])
    return Site(splits.embedded_corpus_cached, splits, "embedded_corpus", tmp_path / "cache" / "corpus",
                lambda docs: json.dumps([(d.id, d.text) for d in docs]))


SITES = {"token cache": _tokens_site, "teacher cache": _teacher_logits_site, "data clusters": _clusters_site,
         "embedded corpus cache": _corpus_site}
WHAT = {"token cache": "the token cache", "teacher cache": "the teacher cache", "data clusters": "the data clusters",
        "embedded corpus cache": "the embedded corpus cache"}


# ------------------------------------------------------------------------------------------ processes
def _fork(site: Site, wrap: Callable, out: Path, log: Path) -> int:
    """Fork a process that replaces `site.module.build` by `wrap(original)`, runs `site.run()` and writes its
    result's digest to `out`; its output goes to `log`. Exit 0, or 70 with the traceback in `log`."""
    log.touch()

    def body() -> None:
        setattr(site.module, site.build, wrap(getattr(site.module, site.build)))
        out.write_text(site.digest(site.run()))

    return fork_logged(log, body)


def _held(started: Path, go: Path) -> Callable:
    """A build that says it has started (`started`), then waits for `go` (at most 120 s) before it computes."""

    def wrap(original):
        def held(*args, **kwargs):
            started.touch()
            deadline = time.monotonic() + 120
            while not go.exists():
                assert time.monotonic() < deadline, "never told to go on"
                time.sleep(0.01)
            return original(*args, **kwargs)
        return held
    return wrap


def _counted(marker: Path) -> Callable:
    """A build that leaves `marker` (the test fails if it does: the entry was built again), then computes."""

    def wrap(original):
        def counted(*args, **kwargs):
            marker.touch()
            return original(*args, **kwargs)
        return counted
    return wrap


def _until(predicate: Callable[[], bool], pids: dict[int, Path], what: str, timeout: float = 120.0) -> None:
    """Poll until `predicate()` holds; fail if one of `pids` (pid -> its log) exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for pid, log in pids.items():
            done, _ = os.waitpid(pid, os.WNOHANG)
            assert not done, f"process {pid} exited before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{timeout:.0f} s passed before {what}"
        time.sleep(0.01)


def _reap(pid: int, log: Path, timeout: float = 120.0) -> int:
    """The exit code of `pid`; killed and the test failed if it is still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} still ran after {timeout:.0f} s; killed:\n{log.read_text()}")
        time.sleep(0.01)


def _entries(folder: Path) -> list[str]:
    """The cache's entries, as its readers find them (no hidden file is one: temporaries, locks)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", SITES)
def test_a_second_builder_waits_for_the_first_and_reads_its_entry(name, tmp_path, request):
    """Before: both built the entry (the second's atomic rename replaced the first's). Now the second says
    `Waiting for hybridopt process PID, which is building <the cache> <entry>` and reads the first's entry."""
    site = SITES[name](tmp_path, request)
    started, go, again = tmp_path / "started", tmp_path / "go", tmp_path / "built-again"
    logs = {i: tmp_path / f"log{i}" for i in (1, 2)}
    first = _fork(site, _held(started, go), tmp_path / "out1", logs[1])
    second = None
    try:
        _until(started.exists, {first: logs[1]}, "the first process started building")
        assert _entries(site.folder) == []  # its lock file is there, and is no entry
        (lock,) = site.folder.glob(".*.lock")
        assert lock.read_text() == f"{first}\n"
        second = _fork(site, _counted(again), tmp_path / "out2", logs[2])
        _until(lambda: "Waiting for" in logs[2].read_text() or again.exists(), {first: logs[1], second: logs[2]},
               "the second process waited or built")
        assert not again.exists()
        (entry,) = [line for line in logs[2].read_text().splitlines() if line.startswith("Waiting for")]
        assert entry.startswith(f"Waiting for hybridopt process {first}, which is building {WHAT[name]} "
                                f"{site.folder}/")
        time.sleep(0.3)  # the second stays waiting while the first builds
        assert os.waitpid(second, os.WNOHANG) == (0, 0) and not again.exists()
        go.touch()
        assert _reap(first, logs[1]) == 0, logs[1].read_text()
        written = os.stat(site.folder / _entries(site.folder)[0])
        assert _reap(second, logs[2]) == 0, logs[2].read_text()
    finally:
        for pid in (first, second):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    _reap(pid, logs[1])
                except (ProcessLookupError, ChildProcessError):
                    pass
    assert not again.exists(), "the second process built the entry again"
    assert (tmp_path / "out2").read_text() == (tmp_path / "out1").read_text()
    (name_,) = _entries(site.folder)
    now = os.stat(site.folder / name_)
    assert (now.st_ino, now.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # the first's file, unreplaced
    assert lock == entry_lock_path(site.folder / name_)  # the lock was this entry's
    assert sorted(p.name for p in site.folder.iterdir()) == [name_]  # no lock file or temporary left
    assert logs[2].read_text().count("Waiting for") == 1


@pytest.mark.parametrize("name", SITES)
def test_a_lock_file_left_by_a_killed_builder_is_no_entry(name, tmp_path, request, monkeypatch, capfd):
    """A builder killed mid-build leaves its lock file and no entry: the next one neither waits nor takes the
    lock file for an entry (damaged or not); it builds the entry once, and later calls read it."""
    site = SITES[name](tmp_path, request)
    started, log = tmp_path / "started", tmp_path / "log"
    pid = _fork(site, _held(started, tmp_path / "never"), tmp_path / "out", log)
    try:
        _until(started.exists, {pid: log}, "the first process started building")
    finally:
        os.kill(pid, signal.SIGKILL)
        _reap(pid, log)
    left = sorted(site.folder.iterdir())  # its lock file (checked below, after what matters: how it is read)
    built = []
    original = getattr(site.module, site.build)
    monkeypatch.setattr(site.module, site.build, lambda *a, **kw: built.append(1) or original(*a, **kw))
    capfd.readouterr()
    result = site.digest(site.run())
    out = capfd.readouterr()
    assert "Waiting for" not in out.out + out.err and "damaged" not in out.err and "warning" not in out.err
    assert built == [1]
    assert site.digest(site.run()) == result and built == [1]  # read from the entry
    (entry,) = _entries(site.folder)
    assert left == [entry_lock_path(site.folder / entry)]  # the killed builder left its lock file, and no entry
    assert not left[0].exists()  # removed by the process that held it next
