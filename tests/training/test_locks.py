"""One writer per run folder, bench folder, export folder and default-teacher cache entry: a second process is
refused (or, for the default teacher, waits and reads what the first saved), and nothing the first one writes is
touched."""

import importlib
import os
import signal
import threading
import time
from pathlib import Path


from conftest import fork_logged, tiny_distill_args
from hybridopt.training import default_teacher
from hybridopt.fileio import lock_file
from hybridopt.training.layout import LOCK_NAME, lock_run, occupied


def test_a_held_lock_is_refused_until_it_is_released(tmp_path):
    first = lock_file(tmp_path / "x.lock")
    assert first is not None and (tmp_path / "x.lock").read_text() == f"{os.getpid()}\n"
    assert lock_file(tmp_path / "x.lock") is None  # another open file description: what another process holds
    first.close()
    second = lock_file(tmp_path / "x.lock")
    assert second is not None
    second.close()


def test_the_lock_file_alone_does_not_make_a_folder_occupied(tmp_path):
    lock = lock_run(tmp_path / "run")
    assert (tmp_path / "run" / LOCK_NAME).is_file() and not occupied(tmp_path / "run")
    lock.close()


def test_a_second_distill_into_a_live_run_folder_is_refused_and_touches_nothing(tiny_teacher, corpus_file,
                                                                                  tmp_path, capsys):
    """What two `hybridopt distill --out X` started together did (both exit 0, one run's config beside the other's
    checkpoint), and `--resume X` while X trains (it deleted the live writer's checkpoint temporary)."""
    from hybridopt.cli import main
    from hybridopt.recipes.distill import run_distill
    from hybridopt.reporting import Reporter

    out = tmp_path / "run"
    run_distill(_cfg(tiny_teacher, corpus_file, out), Reporter(quiet=True),
                stop_after_epoch=1)
    live = lock_run(out)  # a process writing the run
    temporary = out / ".checkpoint.pt.tmp-99999"  # its checkpoint write in progress
    temporary.write_bytes(b"half a checkpoint")
    checkpoint = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["distill", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"hybridopt: error: --resume: '{out}' is in use: hybridopt process {os.getpid()} is writing it; "
                   "wait for it to finish, or choose another --out (nothing in it was touched)")
    assert temporary.read_bytes() == b"half a checkpoint" and (out / "checkpoint.pt").read_bytes() == checkpoint

    fresh = tmp_path / "fresh"
    held = lock_run(fresh)  # a run started a moment before this one, not yet past its lock
    assert main(tiny_distill_args(tiny_teacher, corpus_file, fresh, "--no-baseline")) == 2
    assert "is in use: hybridopt process" in capsys.readouterr().err
    assert sorted(p.name for p in fresh.iterdir()) == [LOCK_NAME]
    live.close()
    held.close()
    assert main(["distill", "--resume", str(out)]) == 0  # the writer is gone: the run continues


def _cfg(teacher, data, out):
    from conftest import tiny_distill_config

    return tiny_distill_config(teacher, data, out, epochs=2, max_steps_per_epoch=2, baseline=False)


def test_processes_that_need_the_default_teacher_at_once_train_it_once(tmp_path, monkeypatch):
    """Two first uses together trained into the same `.partial` folder; the second to finish died."""
    entry = tmp_path / "teachers" / "teacher-x"
    monkeypatch.setattr(default_teacher, "teacher_cache_path", lambda cfg, fingerprint: entry)
    # (threads share a pid, so they must not both write the embedded corpus's cache: that race is the test's)
    monkeypatch.setattr(default_teacher, "corpus_documents", lambda data: ([], "no corpus"))
    monkeypatch.setattr(default_teacher, "corpus_fingerprint", lambda docs: "0" * 64)
    trained = []

    def train(cfg, path, reporter):
        trained.append(path)
        time.sleep(0.5)  # long enough for the other thread to find the lock held
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / default_teacher.INFO_NAME).write_text("{}")
        return path

    monkeypatch.setattr(default_teacher, "train_teacher", train)
    from hybridopt.reporting import Reporter

    got, errors = [], []

    def use():
        try:
            got.append(default_teacher.ensure_default_teacher(Reporter(quiet=True)))
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert errors == [] and got == [entry, entry] and trained == [entry]


# ------------------------------------------------------------------------------ bench and export, two processes
def _fork_cli(argv: list[str], hold: str, ready: Path, log: Path) -> int:
    """Fork a process running `hybridopt ARGV` in which the function `hold` (`"module:name"`) touches `ready` and
    sleeps instead of running: a writer caught in the middle of its work, holding what it holds. Returns its pid."""
    def body() -> int:
        module, name = hold.split(":")

        def held(*args, **kwargs):
            ready.touch()
            time.sleep(120)

        setattr(importlib.import_module(module), name, held)
        from hybridopt.cli import main

        return main(argv)

    pid = fork_logged(log, body)
    deadline = time.monotonic() + 120
    while not ready.exists():
        done, _ = os.waitpid(pid, os.WNOHANG)
        assert not done and time.monotonic() < deadline, f"the first writer never got there: {log.read_text()}"
        time.sleep(0.02)
    return pid


def _stop(pid: int, timeout: float = 30.0) -> None:
    """Kill the child `pid` and reap it, failing the test if it is not gone within `timeout` seconds."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        assert time.monotonic() < deadline, f"child {pid} still had not exited {timeout:g} s after SIGKILL"
        time.sleep(0.01)


def _in_use(folder: Path, pid: int) -> str:
    return (f"hybridopt: error: --out: '{folder}' is in use: hybridopt process {pid} is writing it; wait for it to "
            "finish, or choose another --out (nothing in it was touched)\n")


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_second_export_into_a_folder_being_written_is_refused(hf_model, tmp_path, one_thread, capsys):
    """Two `hybridopt export --out X` at once could write one folder together (one's packed file beside the other's
    report); the second is refused, naming the first, until the first is gone."""
    from hybridopt.cli import main

    out = tmp_path / "packed"
    argv = ["export", "--model", str(hf_model), "--out", str(out)]
    first = _fork_cli(argv, "hybridopt.recipes.export_student:export_packed", tmp_path / "ready", tmp_path / "log")
    try:
        before = _snapshot(out)
        capsys.readouterr()
        assert main(argv) == 2
        assert capsys.readouterr().err == _in_use(out, first)
        assert _snapshot(out) == before and (out / LOCK_NAME).read_text() == f"{first}\n"
    finally:
        _stop(first)
    assert main(argv) == 0  # the first writer is gone
    capsys.readouterr()


def test_a_second_bench_into_a_folder_being_written_is_refused(tmp_path, one_thread, capsys):
    from hybridopt.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--task", "mlp", "--arms", "adamw_cosine", "--no_cost", "--out", str(out)]
    first = _fork_cli(argv, "hybridopt.recipes.bench:_bench", tmp_path / "ready", tmp_path / "log")
    try:
        before = _snapshot(out)
        capsys.readouterr()
        assert main(argv) == 2
        assert capsys.readouterr().err == _in_use(out, first)
        assert _snapshot(out) == before == {LOCK_NAME: f"{first}\n".encode()}
    finally:
        _stop(first)
    lock = lock_file(out / LOCK_NAME)  # free once its holder is gone
    assert lock is not None
    lock.close()
