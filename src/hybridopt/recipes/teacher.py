"""`hybridopt teacher`: train a small Llama teacher (and its tokenizer) from scratch on your data or the
embedded corpus. The work is `hybridopt.training.default_teacher.train_teacher`; this recipe names the flags in errors."""

from __future__ import annotations

from pathlib import Path

from hybridopt.config import TeacherConfig
from hybridopt.data.splits import corpus_documents
from hybridopt.data.blocks import NotEnoughTokens
from hybridopt.errors import for_flag
from hybridopt.training.layout import OutputRefused, check_output
from hybridopt.reporting import Reporter
from hybridopt.training.default_teacher import train_teacher
from hybridopt.utils import resolve_device


def run_teacher(cfg: TeacherConfig, reporter: Reporter | None = None) -> Path:
    """Train the teacher `cfg` describes into `cfg.out` (default: the cache entry `distill` uses)."""
    with for_flag("--device"):
        resolve_device(cfg.device)
    if cfg.out:
        with for_flag("--out", OutputRefused):  # before reading any data; train_teacher checks it again
            check_output(cfg.out, "teacher")
    with for_flag("--data"):
        documents = corpus_documents(cfg.data)
    with for_flag("--out", OutputRefused), for_flag("--seq_len", NotEnoughTokens):
        return train_teacher(cfg, Path(cfg.out) if cfg.out else None, reporter, documents)
