"""The files of a distillation run, named once.

    <run>/
      run_config.json        the resolved config (what --resume reads back)
      checkpoint.pt          model, optimizer, scheduler, RNG and data position (every epoch)
      precision_plan.json    with --param_clusters: the width of every quantized layer
      metrics*.csv/jsonl     with --save_metrics
      student/               the full-precision (latent) student, Hugging Face format, with its tokenizer
      export/                with a quantized run: model.packed.safetensors, config, tokenizer, quant_report.json
      baseline/              the same student trained without a teacher (its own checkpoint)
      results.json           everything measured, at the end
      .hybridopt             the marker: this folder was made by `hybridopt distill` (see `claim_output`)
      .hybridopt.lock        held (flock) by the process writing the run, so a second one is refused

Every output folder a command writes (a run, an export, a teacher, a bench) is either new or one the tool
made: `check_output` refuses anything else before any work starts, and `claim_output` creates the folder
with a small marker file naming the command, so a later export into it, or a `--resume`, knows it is ours.
A process writing a run folder holds `lock_file` (fileio) on its `.hybridopt.lock` for as long as it writes: a second
run, or a `--resume`, into the same folder is refused while the first is alive (the kernel drops the lock when
a process dies, however it dies).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hybridopt.fileio import atomic_write, lock_file, lock_holder
from hybridopt.training.checkpoint import CHECKPOINT_NAME

RUNS_ROOT = Path("hybridopt-runs")
RUN_CONFIG = "run_config.json"
RESULTS = "results.json"
PLAN_NAME = "precision_plan.json"
METRICS_NAME = "metrics.csv"


MARKER = ".hybridopt"
LOCK_NAME = ".hybridopt.lock"


class OutputRefused(ValueError):
    """An output path that names no folder, or a folder the user owns: nothing is written there."""


def occupied(path: Path) -> bool:
    """Whether something is at `path` that a new output must not replace: a file, or a folder with anything in it
    (but the lock file of a process that is about to write there)."""
    return path.exists() and (not path.is_dir() or any(p.name != LOCK_NAME for p in path.iterdir()))


def lock_run(folder: Path) -> IO:
    """Create the run folder `folder` if need be and hold its lock.

    Raises:
        OutputRefused: another live process holds it (a run writing there, or a `--resume` of it).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_file(folder / LOCK_NAME)
    if lock is None:
        raise OutputRefused(f"'{folder}' is in use: {lock_holder(folder / LOCK_NAME)} is writing it; wait for it to "
                            "finish, or choose another --out (nothing in it was touched)")
    return lock


def made_by(path: Path) -> str | None:
    """The command whose marker `path` holds (`"export"`, `"distill"`, ...), or None (no marker, or not ours)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker.get("command") if isinstance(marker, dict) and marker.get("tool") == "hybridopt" else None


def check_output(path: str | Path, command: str, legacy: tuple[str, ...] = ()) -> Path:
    """`path` as an output folder of `command`, refused unless it is new, empty, or made by `command`.

    Args:
        path: the folder asked for.
        command: the command that writes it (`"export"`, `"teacher"`, ...), as its marker names it.
        legacy: files that make a folder without a marker ours: what `command` wrote before markers existed
            (an export's packed file, a run's run_config.json).

    Raises:
        OutputRefused: `path` names no folder (`.`, `..`, `/`), is a file, or is a folder with something in it
            that `command` did not make.
    """
    path = Path(path).expanduser()
    if path.name in ("", ".."):  # `.`, `./`, `/`, `..`: the folder has no name of its own
        raise OutputRefused(f"'{path}' is not a name for a new folder; name one, e.g. {path / 'out'}")
    if path.exists() and not path.is_dir():
        raise OutputRefused(f"'{path}' is a file; choose a folder (nothing is replaced)")
    if occupied(path) and made_by(path) != command and not any((path / f).exists() for f in legacy):
        raise OutputRefused(f"'{path}' exists and holds something hybridopt {command} did not write; "
                            "choose another (nothing in it is replaced)")
    return path


def claim_output(path: str | Path, command: str) -> Path:
    """Create the output folder `path` (parents too) and mark it as made by `command` (kept if already there)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if made_by(path) != command:
        text = json.dumps({"tool": "hybridopt", "command": command}) + "\n"
        atomic_write(path / MARKER, lambda tmp: Path(tmp).write_text(text))
    return path


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def plan(self) -> Path:
        return self.root / PLAN_NAME

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_NAME

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_NAME
