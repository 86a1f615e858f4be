"""Per-step and per-epoch metrics as CSV (as the seed) and JSONL, safe across resumes."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from hybridopt.fileio import atomic_write, json_text

STEP_FIELDS = ("step", "epoch", "loss", "ce", "kl", "lr", "grad_norm", "tokens", "elapsed_s", "lr_mult",
               "trust_radius", "clipped")
EPOCH_FIELDS = ("epoch", "step", "loss", "lr", "val_loss", "val_ppl", "elapsed_s", "lr_mult", "trust_radius",
                "val_loss_worst_cluster", "val_loss_cluster_spread")


class MetricsLogger:
    """Append metrics rows to `<stem>.csv` (epochs), `<stem>_steps.csv` (steps) and `<stem>.jsonl` (both).

    On resume, rows past the checkpoint's step (written after it, before the interruption) are
    dropped by an atomic rewrite, so the files match an uninterrupted run; rows before it are kept. A row
    cut short (a full disk mid-write) is dropped with them.

    Args:
        path: the per-epoch CSV path.
        resume_step: the checkpoint's global step when resuming, else None (files must not exist).
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.epoch_path = path
        self.step_path = path.with_name(f"{path.stem}_steps.csv")
        self.jsonl_path = path.with_suffix(".jsonl")
        if resume_step is not None:
            self._truncate(resume_step)
        self._files = {}
        for kind, p, names in (("epoch", self.epoch_path, EPOCH_FIELDS), ("step", self.step_path, STEP_FIELDS)):
            new = not p.exists() or p.stat().st_size == 0
            f = open(p, "a", newline="")
            writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
            if new:
                writer.writeheader()
            self._files[kind] = (f, writer)
        self._jsonl = open(self.jsonl_path, "a")

    def _truncate(self, step: int) -> None:
        for p in (self.epoch_path, self.step_path):
            if p.exists():
                with open(p, newline="") as f:
                    reader = csv.DictReader(f)
                    names = reader.fieldnames
                    rows = [r for r in reader if _step_of(r.get("step")) <= step]
                if names:
                    def write(tmp, names=names, rows=rows):
                        with open(tmp, "w", newline="") as out:
                            w = csv.DictWriter(out, fieldnames=names)
                            w.writeheader()
                            w.writerows(rows)
                    atomic_write(p, write)
        if self.jsonl_path.exists():
            lines = [ln for ln in self.jsonl_path.read_text().splitlines() if _step_of(_record(ln).get("step")) <= step]
            atomic_write(self.jsonl_path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in lines)))

    def log(self, kind: str, row: dict) -> None:
        """Write one `kind` ('step' or 'epoch') row and flush it to disk."""
        f, writer = self._files[kind]
        writer.writerow({k: _fmt(v) for k, v in row.items()})
        f.flush()
        self._jsonl.write(json_text({"type": kind, **row}, indent=None) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._jsonl.close()


def _step_of(value) -> float:
    """A row's step, or infinity (dropped on resume) for a row cut short."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return math.inf


def _record(line: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def metrics_files(path: Path, baseline: bool = False) -> list[Path]:
    """The files a run with per-epoch metrics CSV `path` writes (`MetricsLogger`'s three; with `baseline`,
    the no-teacher run's three as well, named `<stem>_baseline*`)."""
    stems = [path] + ([path.with_name(f"{path.stem}_baseline.csv")] if baseline else [])
    return [f for p in stems for f in (p, p.with_name(f"{p.stem}_steps.csv"), p.with_suffix(".jsonl"))]


def check_new_metrics(path: Path, baseline: bool = False) -> None:
    """Refuse a per-epoch metrics CSV `path` that a new run could not write, or that would append to files there,
    before anything is made (refused when the metrics files open, a run has made its folder, which blocks a rerun).

    Raises:
        ValueError: `path` ends in .jsonl (the CSV and the JSONL rows would share it), is a folder, one of the files
            the run writes (`metrics_files`) exists, or the folder it goes in cannot be made or written.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        raise ValueError(f"'{path}' would hold both the per-epoch CSV rows and the JSONL rows; name the CSV, e.g. "
                         f"'{path.with_suffix('.csv')}' (the JSONL rows then go to '{path}')")
    if path.is_dir():
        raise ValueError(f"'{path}' is a folder; name a file, e.g. '{path / 'metrics.csv'}'")
    taken = [p for p in metrics_files(path, baseline) if p.exists()]
    if taken:
        raise ValueError(f"'{taken[0]}' exists; choose a new path (nothing is replaced)")
    folder = next(p for p in path.parents if p.exists())  # the folder it goes in, or the nearest that exists
    if not folder.is_dir():
        raise ValueError(f"'{folder}' is a file, so no folder can hold '{path}'; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in the folder '{folder}' (permission denied); choose another path")


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v
