"""Fault injection: `hybridopt distill` killed at random moments, resumed, killed again, until it finishes.

Each attempt runs the `hybridopt` command (`hybridopt.cli.main`) in a child process forked from this one (so
the imports are done once, not once per attempt) and sends it SIGKILL, SIGTERM, SIGINT or two SIGINTs, either
at a random moment after training has started or while it is inside a checkpoint write (the child holds the
write open between the temporary file and the rename: its `torch.save` sleeps after writing a checkpoint).
The next attempt is `hybridopt distill --resume RUN`. When the run finishes, its student weights, per-step and
per-epoch metrics and results must equal those of the same run never interrupted, and every step must appear
in the metrics exactly once.

    pytest tests/test_faults.py            # 3 kills
    pytest -m slow tests/test_faults.py -s # 24 kills, one line per kill
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import random
import signal
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_distill_args, tiny_distill_config
from hybridopt.training.trainer import Trainer, TrainerCallback

SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGINT twice")


@dataclass
class Attempt:
    """One start of the command and what happened to it."""

    signal: str | None  # None: left to finish
    moment: str  # "random" or "checkpoint write"
    delay: float  # seconds after training started (random moments)
    status: str = ""  # how the process ended: "exit N" or "killed by SIGNAL"
    killed: bool = False  # the signal reached a running process
    step_before: str = ""  # the checkpoints' steps (student/baseline) when it started
    step_after: str = ""  # ... and when it ended


# The runs are forked from this process, and a child of a process whose OpenMP team had more than one thread
# waits forever at its first parallel region (libgomp is not fork-safe): every run here, unbroken or killed,
# trains on one intra-op thread.
pytestmark = pytest.mark.usefixtures("one_thread")


class NonFinite(TrainerCallback):
    """A NaN loss at the steps in `loss` and an infinite gradient at those in `grad` (counted from 1)."""

    def __init__(self, loss=(), grad=()):
        self.loss, self.grad = set(loss), set(grad)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.loss else loss

    def on_backward(self, step: int, params: list[torch.Tensor]) -> None:
        if step in self.grad:
            next(p.grad for p in params if p.grad is not None).view(-1)[0] = float("inf")


def _hold_checkpoint_writes(seconds: float) -> None:
    """In the child: every checkpoint write sleeps `seconds` between its temporary file and the rename."""
    save = torch.save

    def held(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if Path(f).name.startswith(".checkpoint.pt.tmp-"):
            time.sleep(seconds)

    torch.save = held


def _child(argv: list[str], log: Path, hold: float) -> None:
    """In the forked child: a fresh process's signal dispositions, output to `log`, the CLI, then exit."""
    rc = 70
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if hold:
            _hold_checkpoint_writes(hold)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        from hybridopt.cli import main

        rc = main(argv)
    except BaseException as e:  # noqa: BLE001  (a traceback the CLI let through is what we look for)
        import traceback

        traceback.print_exc()
        rc = 71 if not isinstance(e, SystemExit) else (e.code or 0)
    finally:
        sys.stdout.flush()
        os._exit(rc)


def _step(out: Path) -> str:
    """The global steps of the run's checkpoints, the student's and the baseline's ("-" where there is none)."""
    steps = []
    for path in (out / "checkpoint.pt", out / "baseline" / "checkpoint.pt"):
        if path.is_file():
            steps.append(str(torch.load(path, map_location="cpu", weights_only=True)["position"]["global_step"]))
        elif path.parent == out or (out / "baseline").is_dir():
            steps.append("-")
    return "/".join(steps)


class _Child:
    """A forked child and its exit code, reaped once."""

    def __init__(self, argv: list[str], log: Path, hold: float = 0.0):
        self.pid, self.code = os.fork(), None
        if self.pid == 0:
            _child(argv, log, hold)

    def poll(self) -> bool:
        """Whether it has exited (its code recorded)."""
        if self.code is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code is not None

    def wait(self, timeout: float = 600.0) -> int:
        """Its exit code, once it has exited; killed, and the test failed, if it runs past `timeout` seconds (a
        hung child must not hang the suite)."""
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                reaped = time.monotonic() + 10
                while not self.poll() and time.monotonic() < reaped:
                    time.sleep(0.01)
                raise AssertionError(f"the child {self.pid} was still running after {timeout:g} s; it was killed")
            time.sleep(0.01)
        return self.code

    def wait_for(self, predicate, timeout: float = 120.0) -> bool:
        """Poll until `predicate()` holds (True) or the child has exited (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.poll():
                return False
            time.sleep(0.005)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the child neither reached the fault point nor exited")


def run_attempt(argv: list[str], out: Path, log: Path, attempt: Attempt) -> int:
    """Start the command, inject `attempt`'s fault (if the process is still running by then), wait for it to
    end; returns its exit code (negative: killed by that signal)."""
    hold = 0.4 if attempt.moment == "checkpoint write" else 0.0
    attempt.step_before = _step(out)
    log.touch()
    start = log.stat().st_size
    child = _Child(argv, log, hold)

    def training_started() -> bool:
        with open(log) as f:
            f.seek(start)
            return "Distilling:" in f.read()

    def in_checkpoint_write() -> bool:
        return any(out.glob(".checkpoint.pt.tmp-*")) or any(out.glob("baseline/.checkpoint.pt.tmp-*"))

    if attempt.signal is not None and child.wait_for(training_started):
        if attempt.moment == "random":
            time.sleep(attempt.delay)
        if (child.wait_for(in_checkpoint_write) if attempt.moment == "checkpoint write" else not child.poll()):
            for sig in ["SIGINT", "SIGINT"] if attempt.signal == "SIGINT twice" else [attempt.signal]:
                os.kill(child.pid, getattr(signal, sig))
                time.sleep(0.02)
            attempt.killed = True
    code = child.wait()
    attempt.killed &= code != 0  # a signal after the last line changes nothing
    attempt.step_after = _step(out)
    attempt.status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    return code


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]


def _results(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    for key in ("student", "baseline"):
        if key in res:
            res[key].pop("train_seconds")
            for row in res[key]["history"]:
                row.pop("elapsed_s")
    for key in ("path", "out"):
        res["student"].pop(key, None)
        res["config"].pop(key, None)
    return res


def assert_same_run(out: Path, ref: Path, total_steps: int) -> None:
    """`out` ended exactly where the unbroken `ref` did, with every step logged once."""
    for name in ("model.safetensors",):
        a, b = load_file(out / "student" / name), load_file(ref / "student" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "student weights differ"
    for name in sorted(p.name for p in ref.glob("metrics*.csv")):
        assert _rows(out / name) == _rows(ref / name), name
    assert [int(r["step"]) for r in _rows(out / "metrics_steps.csv")] == list(range(1, total_steps + 1))
    assert _results(out) == _results(ref)
    assert not list(out.glob("**/.*.tmp-*")), "a temporary file was left behind"


def _finished(out: Path) -> bool:
    return (out / "results.json").is_file()


def fault_campaign(tiny_teacher: Path, corpus_file: Path, tmp_path: Path, kills: int, seed: int,
                   extra: tuple[str, ...] = ()) -> list[Attempt]:
    """Run the tiny distillation unbroken once, then again under faults until `kills` signals have reached a
    running process (starting a fresh run whenever one finishes); every run must match the unbroken one."""
    rng = random.Random(seed)
    flags = ("--epochs", "4", "--max_steps_per_epoch", "6", "--eval_every", "2", "--save_metrics", *extra)
    ref = tmp_path / "unbroken"
    t0 = time.monotonic()
    clock = Attempt(None, "random", 0.0)
    assert run_attempt(tiny_distill_args(tiny_teacher, corpus_file, ref, *flags), ref, tmp_path / "unbroken.log",
                       clock) == 0, (tmp_path / "unbroken.log").read_text()
    span = time.monotonic() - t0
    total = json.loads((ref / "results.json").read_text())["student"]["steps"]
    attempts, delivered, runs = [], 0, 0
    while delivered < kills:
        runs += 1
        out, log = tmp_path / f"run{runs}", tmp_path / f"run{runs}.log"
        argv = tiny_distill_args(tiny_teacher, corpus_file, out, *flags)
        while not _finished(out):
            started = (out / "run_config.json").is_file()
            if delivered < kills:
                attempt = Attempt(rng.choice(SIGNALS), rng.choice(("random", "random", "checkpoint write")),
                                  rng.uniform(0, span / 2))
            else:
                attempt = Attempt(None, "random", 0.0)
            code = run_attempt(["distill", "--resume", str(out)] if started else argv, out, log, attempt)
            attempts.append(attempt)
            delivered += attempt.killed
            text = log.read_text()
            assert "Traceback" not in text, text
            if attempt.signal is None:
                assert code == 0, text
            late = "" if attempt.killed or attempt.signal is None else " (the signal came too late)"
            when = f", {attempt.delay:.2f} s into training" if attempt.moment == "random" else ""
            print(f"\nrun {runs}: {attempt.signal or 'no fault'} ({attempt.moment}{when}): {attempt.status}{late}; "
                  f"checkpoint at step {attempt.step_before} -> {attempt.step_after}", end="")
            assert len(attempts) < 4 * kills + 10, "the run never finishes"
        assert_same_run(out, ref, total)
    return attempts


def test_a_kill_inside_the_first_checkpoint_write_then_resume_matches_an_unbroken_run(tiny_teacher, corpus_file,
                                                                                      tmp_path):
    """No checkpoint yet, six step rows already logged: --resume starts again from step 0 and logs each step once."""
    flags = ("--epochs", "2", "--max_steps_per_epoch", "6", "--eval_every", "2", "--save_metrics", "--no-baseline")
    ref, out = tmp_path / "unbroken", tmp_path / "killed"
    assert run_attempt(tiny_distill_args(tiny_teacher, corpus_file, ref, *flags), ref, tmp_path / "ref.log",
                       Attempt(None, "random", 0.0)) == 0
    attempt = Attempt("SIGKILL", "checkpoint write", 0.0)
    assert run_attempt(tiny_distill_args(tiny_teacher, corpus_file, out, *flags), out, tmp_path / "log",
                       attempt) == -signal.SIGKILL
    assert attempt.step_after == "-" and len(_rows(out / "metrics_steps.csv")) == 6
    assert list(out.glob(".checkpoint.pt.tmp-*"))  # what the kill cut short
    assert run_attempt(["distill", "--resume", str(out)], out, tmp_path / "log", Attempt(None, "random", 0.0)) == 0
    assert_same_run(out, ref, 12)


def test_three_kills_then_resume_match_an_unbroken_run(tiny_teacher, corpus_file, tmp_path):
    attempts = fault_campaign(tiny_teacher, corpus_file, tmp_path, kills=3, seed=0, extra=("--no-baseline",))
    assert sum(a.killed for a in attempts) == 3


@pytest.mark.slow
def test_many_kills_with_hybrid_qat_and_baseline_match_an_unbroken_run(tiny_teacher, corpus_file, tmp_path):
    attempts = fault_campaign(tiny_teacher, corpus_file, tmp_path, kills=24, seed=1,
                              extra=("--hybrid", "--qat", "--ternary"))
    killed = [a for a in attempts if a.killed]
    assert len(killed) == 24
    assert {a.signal for a in killed} == set(SIGNALS) and {a.moment for a in killed} == {"random", "checkpoint write"}


# ---------------------------------------------------------------- non-finite steps, full disk, broken config

def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_injected_non_finite_steps_are_skipped_logged_and_the_run_finishes(tiny_teacher, corpus_file, tmp_path,
                                                                          monkeypatch, capsys):
    from hybridopt.cli import main

    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "callbacks", [NonFinite(loss=[3], grad=[6])])
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--epochs", "2", "--max_steps_per_epoch", "4",
                                  "--no-baseline", "--save_metrics")) == 0
    err = capsys.readouterr().err
    assert "warning: non-finite loss at step 3; step skipped" in err
    assert "warning: non-finite gradient at step 6; step skipped" in err
    rows = _csv(out / "metrics_steps.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 9)]
    assert rows[2]["loss"] == "nan" and rows[5]["grad_norm"] == "inf" and math.isfinite(float(rows[5]["loss"]))
    assert all(math.isfinite(float(r["loss"])) and math.isfinite(float(r["grad_norm"]))
               for i, r in enumerate(rows) if i != 2 and i != 5)
    res = json.loads((out / "results.json").read_text())["student"]
    assert res["skipped_steps"] == 2 and res["steps"] == 8
    # strict JSON: the skipped steps' nan and inf are null in the JSONL metrics and results.json's history
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))  # noqa: E731
    steps = [r for r in map(strict, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert steps[2]["loss"] is None and steps[5]["grad_norm"] is None
    strict((out / "results.json").read_text())
    weights = load_file(out / "student" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_streak_of_non_finite_steps_stops_the_run_with_a_usable_checkpoint(tiny_teacher, corpus_file, tmp_path,
                                                                           monkeypatch, capsys):
    """19 in a row are skipped and the run finishes; 20 (MAX_NONFINITE_STREAK) stop it, checkpointed after the
    20th, exit 2 with one sentence; --resume then finishes the run with every step logged once."""
    from hybridopt.cli import main
    from hybridopt.training.trainer import MAX_NONFINITE_STREAK

    assert MAX_NONFINITE_STREAK == 20
    flags = ("--epochs", "6", "--max_steps_per_epoch", "5", "--no-baseline", "--save_metrics")
    monkeypatch.setattr(Trainer, "callbacks", [NonFinite(loss=range(3, 22))])
    assert main(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "nineteen", *flags)) == 0
    assert json.loads((tmp_path / "nineteen" / "results.json").read_text())["student"]["skipped_steps"] == 19
    capsys.readouterr()

    out = tmp_path / "twenty"
    monkeypatch.setattr(Trainer, "callbacks", [NonFinite(loss=range(3, 23))])
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, *flags)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"hybridopt: error: training stopped at step 22: the loss or gradient was non-finite for 20 "
                    f"steps in a row (steps 3-22, all skipped), so the run has diverged or its data is broken; the "
                    f"checkpoint in '{out}' holds the weights from before them: start a new run with a lower --lr "
                    "or check --data (--resume would continue from there)")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["position"]["global_step"] == 22 and state["position"]["skipped_steps"] == 20
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (out / "results.json").exists()

    monkeypatch.setattr(Trainer, "callbacks", ())
    assert main(["distill", "--resume", str(out)]) == 0
    assert [int(r["step"]) for r in _csv(out / "metrics_steps.csv")] == list(range(1, 31))
    res = json.loads((out / "results.json").read_text())["student"]
    assert res["skipped_steps"] == 20 and res["steps"] == 30 and res["loss"] == res["loss"]  # not NaN


def test_a_full_disk_while_checkpointing_is_one_sentence_and_resume_finishes_the_run(tiny_teacher, corpus_file,
                                                                                   tmp_path, monkeypatch, capsys):
    """torch.save reports a full disk as RuntimeError: exit 2, one line; the epoch-1 checkpoint survives and
    --resume ends exactly where an unbroken run ends."""
    from hybridopt.cli import main

    flags = ("--epochs", "3", "--max_steps_per_epoch", "4", "--no-baseline", "--save_metrics")
    assert main(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "unbroken", *flags)) == 0
    out = tmp_path / "full"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: the disk fills up halfway through it
            open(f, "wb").write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 2048")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    capsys.readouterr()
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, *flags)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"hybridopt: error: cannot write the checkpoint '{out / 'checkpoint.pt'}' ([enforce fail at "
        "inline_container.cc:626] . unexpected pos 4096 vs 2048); is the disk full? The previous checkpoint is "
        "kept; free space and continue with --resume")
    assert "Traceback" not in err
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["position"]["global_step"] == 4
    assert not list(out.glob(".*.tmp-*"))
    assert main(["distill", "--resume", str(out)]) == 0
    assert _rows(out / "metrics_steps.csv") == _rows(tmp_path / "unbroken" / "metrics_steps.csv")
    assert _results(out) == _results(tmp_path / "unbroken")


def test_a_full_disk_while_saving_the_student_keeps_the_earlier_student_and_resume_finishes(tiny_teacher, corpus_file,
                                                                                           tmp_path, monkeypatch, capsys):
    """The end-of-run save (save_pretrained, through safetensors) fails half written, as on a full disk: it was a
    SafetensorError traceback over a torn model.safetensors. Now: exit 2, one line naming the folder; the student
    an earlier attempt saved is left whole; --resume saves it again."""
    import transformers
    from safetensors import SafetensorError

    from hybridopt.cli import main

    out = tmp_path / "run"
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--epochs", "2", "--max_steps_per_epoch", "3",
                                  "--no-baseline")) == 0
    student = {p.name: p.read_bytes() for p in (out / "student").iterdir()}
    assert "model.safetensors" in student
    (out / "results.json").unlink()  # killed after the student's save, before the results: --resume saves it again

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a model")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    capsys.readouterr()
    assert main(["distill", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"hybridopt: error: cannot write the student '{out / 'student'}' (Error while serializing: I/O error: No "
        "space left on device (os error 28)); is the disk full? Nothing in it was replaced; free some space and "
        "continue with --resume")
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (out / "student").iterdir()} == student
    assert not list(out.glob("**/.*.tmp-*")) and not (out / "results.json").exists()
    monkeypatch.undo()
    assert main(["distill", "--resume", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in (out / "student").iterdir()} == student  # the same run saved again


def _full_disk_for(prefix: str):
    """A `Path.write_text` that writes half of a file whose name starts with `prefix` (an atomic write's
    temporary) and then fails as a full disk does; every other file is written."""
    write_text = Path.write_text

    def write(self, data, *args, **kwargs):
        if self.name.startswith(prefix):
            write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, data, *args, **kwargs)

    return write


@pytest.mark.parametrize("name,written", [("results", "results.json"),
                                          ("quantization report", "export/quant_report.json")])
def test_a_full_disk_at_the_results_or_the_quant_report_is_one_sentence_and_resume_writes_it(
        tiny_teacher, corpus_file, tmp_path, monkeypatch, capsys, name, written):
    """Both fell through to the CLI's general `No space left on device (FILE)` line, which named a temporary file
    and said nothing of what was kept. Now: exit 2, one sentence naming the file, the student (and export)
    kept, and --resume writes it."""
    from hybridopt.cli import main

    out = tmp_path / "run"
    path = out / written
    monkeypatch.setattr(Path, "write_text", _full_disk_for(f".{path.name}.tmp-"))
    flags = ("--epochs", "2", "--max_steps_per_epoch", "3", "--ternary", "--qat", "--no-baseline")
    capsys.readouterr()
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, *flags)) == 2
    err = capsys.readouterr().err
    kept = ("The student and its export are saved; free some space and continue with --resume, which writes them "
            "again" if name == "results" else "The packed model beside it is whole; free some space and continue "
            "with --resume")
    assert err.splitlines()[-1] == (f"hybridopt: error: cannot write the {name} '{path}' ([Errno 28] No space left on "
                                    f"device: '{path.parent / f'.{path.name}.tmp-{os.getpid()}'}'); is the disk "
                                    f"full? {kept}")
    assert "Traceback" not in err
    assert not path.exists() and not list(out.glob("**/.*.tmp-*"))
    assert (out / "student" / "model.safetensors").is_file()
    assert (out / "export" / "model.packed.safetensors").is_file()
    monkeypatch.undo()
    assert main(["distill", "--resume", str(out)]) == 0
    assert json.loads(path.read_text()) and json.loads((out / "results.json").read_text())["student"]["steps"] == 6


def test_a_full_disk_at_the_quant_report_of_an_export_is_one_sentence(hf_model, tmp_path, monkeypatch, capsys):
    from hybridopt.cli import main

    out = tmp_path / "packed"
    path = out / "quant_report.json"
    monkeypatch.setattr(Path, "write_text", _full_disk_for(f".{path.name}.tmp-"))
    capsys.readouterr()
    assert main(["export", "--model", str(hf_model), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"hybridopt: error: cannot write the quantization report '{path}' ([Errno 28] No space left on device: "
        f"'{out / f'.{path.name}.tmp-{os.getpid()}'}'); is the disk full? The packed model beside it is whole; free "
        "some space and run the command again\n")
    assert not path.exists() and (out / "model.packed.safetensors").is_file()


def test_a_trainer_whose_folder_is_missing_says_so(tmp_path):
    """A Trainer given an out_dir that does not exist (or one removed while it runs) said `is the disk full?`."""
    from transformers import LlamaConfig

    from hybridopt.config import TrainConfig
    from hybridopt.data.blocks import TokenBlocks
    from hybridopt.errors import UserError
    from hybridopt.models.modeling import build_model
    from hybridopt.reporting import Reporter

    cfg = TrainConfig(epochs=1, max_steps_per_epoch=2, batch_size=4, seq_len=8, eval_every=1, device="cpu")
    model = build_model(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=16), 0)
    stream = torch.randint(32, (200,), generator=torch.Generator().manual_seed(0))
    train, val = TokenBlocks(stream[:160], 8), TokenBlocks(stream[160:], 8, "validation")
    missing = tmp_path / "missing"
    trainer = Trainer(cfg, model, train, val, missing, torch.device("cpu"), reporter=Reporter(quiet=True))
    trainer.setup()
    with pytest.raises(UserError) as e:
        trainer.train()
    assert str(e.value) == (f"cannot write the checkpoint '{missing / 'checkpoint.pt'}': the folder '{missing}' does "
                            "not exist (was it moved or deleted?); create it or choose another")
    assert not missing.exists()


@pytest.mark.parametrize("text, why", [
    (b"{not json", "Expecting property name"),
    (b"[1, 2]", "not a JSON object"),
    (b"\xff\xfe", "can't decode byte 0xff"),
    (b'{"seed": "zero"}', "seed is 'zero'"),
    (b'{"epochs": 0}', "--epochs must be positive, got 0"),
    (b'{"data": [1]}', "data is [1]"),
])
def test_a_damaged_run_config_on_resume_is_one_sentence(tmp_path, capsys, text, why):
    from hybridopt.cli import main

    (tmp_path / "run_config.json").write_bytes(text)
    assert main(["distill", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybridopt: error: the run config '{tmp_path / 'run_config.json'}' is unreadable (")
    assert why in err and err.endswith("); it was not written by hybridopt or is damaged\n") and err.count("\n") == 1


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_between_the_update_and_its_counters_resumes_exactly(tiny_teacher, corpus_file, tmp_path,
                                                                      monkeypatch, sig):
    """The signal lands right after optimizer.step() of step 6, before the step counters advance: the checkpoint
    must hold that update and count it (step 6), so --resume ends where an unbroken run ends. (Saving from an
    exception raised there would store the update without its count, and the resumed run would differ.)"""
    from hybridopt.training import trainer as training
    from hybridopt.config import DistillConfig
    from hybridopt.recipes.distill import run_distill
    from hybridopt.reporting import Reporter

    def cfg(out, **kw):
        return tiny_distill_config(tiny_teacher, corpus_file, out, **{**dict(
            epochs=4, max_steps_per_epoch=4, eval_every=2, save_metrics=True, baseline=False), **kw})

    straight = run_distill(cfg(tmp_path / "unbroken"), Reporter(quiet=True))
    real_build = training.build_optimizer

    def build(*args, **kwargs):
        opt, steps = real_build(*args, **kwargs), []
        real_step = opt.step

        def step(self, *a, **k):
            out = real_step(*a, **k)
            steps.append(1)
            if len(steps) == 6:
                signal.raise_signal(getattr(signal, sig))  # the handler runs here, between update and counters
            return out

        opt.step = types.MethodType(step, opt)  # bound, as the lr scheduler expects
        return opt

    monkeypatch.setattr(training, "build_optimizer", build)
    out = tmp_path / "stopped"
    with pytest.raises(training.StopRequested):
        run_distill(cfg(out), Reporter(quiet=True))
    monkeypatch.undo()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["position"]["global_step"] == 6 and state["position"]["step_in_epoch"] == 2
    resumed = run_distill(DistillConfig(resume=str(out)), Reporter(quiet=True))
    assert resumed["student"]["loss"] == straight["student"]["loss"]
    assert _rows(out / "metrics_steps.csv") == _rows(tmp_path / "unbroken" / "metrics_steps.csv")


def test_metrics_rows_cut_short_by_a_full_disk_are_dropped_on_resume(tmp_path):
    """The disk filled up in the middle of the last rows: the resumed run rewrites the files without them."""
    from hybridopt.training.metrics import MetricsLogger

    path = tmp_path / "metrics.csv"
    m = MetricsLogger(path)
    for step in (1, 2, 3):
        m.log("step", {"step": step, "epoch": 1, "loss": 1.0})
    m.log("epoch", {"epoch": 1, "step": 3, "loss": 1.0})
    m.close()
    with open(tmp_path / "metrics_steps.csv", "a") as f:
        f.write("4,1,0.9")  # no newline: cut short
    with open(path, "a") as f:
        f.write("2,")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "st')
    MetricsLogger(path, resume_step=3).close()
    assert [r["step"] for r in _csv(tmp_path / "metrics_steps.csv")] == ["1", "2", "3"]
    assert [r["epoch"] for r in _csv(path)] == ["1"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in records] == [("step", 1), ("step", 2), ("step", 3), ("epoch", 3)]


def test_resume_removes_what_a_kill_inside_an_export_write_left(tiny_teacher, corpus_file, tmp_path):
    """A kill while the student, the packed file or its report is written (every resume after the student's
    training writes them again) leaves `.NAME.tmp-PID` in student/ or export/; the next --resume removes it, and
    nothing else of the run."""
    from hybridopt.cli import main

    out = tmp_path / "run"
    flags = ("--epochs", "2", "--max_steps_per_epoch", "3", "--ternary", "--qat", "--no-baseline")
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, *flags)) == 0
    export = sorted(p.name for p in (out / "export").iterdir())
    stale = [out / "export" / ".quant_report.json.tmp-999999", out / "export" / ".model.packed.safetensors.tmp-999998"]
    for p in stale:
        p.write_bytes(b"cut short")
    for folder in ("student", "export"):  # a save_pretrained's folder (fileio.atomic_save), cut short
        (out / folder / ".save.tmp-999997").mkdir()
        (out / folder / ".save.tmp-999997" / "model.safetensors").write_bytes(b"cut short")
    student = sorted(p.name for p in (out / "student").iterdir() if not p.name.startswith(".save.tmp-"))
    (out / "results.json").unlink()  # killed inside the export write, before the results were written
    assert main(["distill", "--resume", str(out)]) == 0
    assert sorted(p.name for p in (out / "export").iterdir()) == export
    assert sorted(p.name for p in (out / "student").iterdir()) == student


def test_a_run_whose_weights_overflow_ends_with_one_sentence_and_exports_nothing(tiny_teacher, corpus_file, tmp_path,
                                                                               capsys):
    """--lr 1e308: the first AdamW step overflows the weights, the run is too short for the non-finite streak to
    stop it, and it used to save and export a NaN student with exit 0."""
    from hybridopt.cli import main

    out = tmp_path / "run"
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--lr", "1e308", "--epochs", "1",
                                  "--max_steps_per_epoch", "3", "--no-baseline")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("hybridopt: error: training ended with non-finite weights in ")
    assert "so nothing was saved or exported; start a new run with a lower --lr" in last
    assert (out / "checkpoint.pt").is_file()  # what was written stays
    assert not (out / "student").exists() and not (out / "results.json").exists()


def test_json_files_hold_no_bare_nan():
    """results.json, the quantization report and the JSONL metrics go through fileio.json_text: a non-finite
    value (a skipped step's gradient norm, a diverged loss) is null, which every JSON reader accepts."""
    import json as _json

    from hybridopt.fileio import json_text

    text = json_text({"loss": float("nan"), "ppl": float("inf"), "rows": [1.5, float("-inf"), {"g": float("nan")}]})
    assert "NaN" not in text and "Infinity" not in text
    assert _json.loads(text) == {"loss": None, "ppl": None, "rows": [1.5, None, {"g": None}]}
    assert "\n" not in json_text({"a": [1, 2]}, indent=None)
