"""A teacher trained from scratch: a byte-level BPE tokenizer and a small Llama, and the default teacher.

`hybridopt teacher` runs `train_teacher`. `hybridopt distill` without `--teacher` uses the default
teacher: `train_teacher` with the default config on the embedded corpus, cached under a key of corpus
and config, trained on first use (`ensure_default_teacher`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from hybridopt.optim import hybrid as hybrid_optimizer
from hybridopt.fileio import atomic_write, lock_file, lock_holder
from hybridopt.training.checkpoint import CHECKPOINT_NAME
from hybridopt.config import TeacherConfig, default_teacher_config
from hybridopt.data.corpus import Document, corpus_fingerprint, split_documents
from hybridopt.models.modeling import build_model, num_parameters, teacher_llama_config
from hybridopt.data.splits import corpus_documents, token_splits
from hybridopt.training.layout import OutputRefused, check_output, claim_output, lock_run, made_by, occupied
from hybridopt.reporting import Reporter
from hybridopt.models.tokenizer import train_bpe_tokenizer
from hybridopt.training.step import describe_optimizer
from hybridopt.training.trainer import Trainer
from hybridopt.utils import cache_dir, resolve_device, seed_everything

INFO_NAME = "teacher_info.json"


# Settings that change the trained teacher. New settings join this list only when they are not at a
# default that reproduces older teachers, so adding a flag does not retrain everybody's default teacher.
_KEY_FIELDS = ("data", "vocab_size", "hidden", "layers", "intermediate", "heads", "context", "val_fraction", "epochs",
               "max_steps_per_epoch", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
               "grad_clip", "seed")
_ADDED_HYBRID_FIELDS = {"hybrid_base": "adam", "min_scale": None, "controller": None, "radius_start": None}  # hybrid options older cache keys did not have


def teacher_cache_path(cfg: TeacherConfig, fingerprint: str) -> Path:
    """Cache entry of a teacher: named by its corpus and the settings that shape it."""
    values = asdict(cfg)
    key = {k: values[k] for k in _KEY_FIELDS}
    if cfg.hybrid:
        key.update({k: values[k] for k in ("hybrid", "trust_radius", "trust_region", "adapt_radius", "controller_lr",
                                           "learn_scale", "scale_lr", "scale_threshold")})
        # Options added later join the key only when they differ from what every earlier entry was trained with,
        # so those entries keep their names (and are never taken for a run that set them otherwise).
        key.update({k: values[k] for k, before in _ADDED_HYBRID_FIELDS.items() if values[k] != before})
        key["hybrid_rule"] = hybrid_optimizer.RULE_VERSION  # a teacher trained by an older rule is not this one
    cfg_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / "teachers" / f"teacher-{fingerprint[:8]}-{cfg_hash}"


def train_teacher(cfg: TeacherConfig, out: Path | None = None, reporter: Reporter | None = None,
                  documents: tuple[list[Document], str] | None = None) -> Path:
    """Train a tokenizer and teacher; save both in Hugging Face format to `out`.

    Work happens in `<out>.partial/`, which holds a checkpoint: an interrupted run resumes there,
    and `out` appears (by rename) only when the teacher is complete.

    Args:
        cfg: the teacher's settings.
        out: where the teacher goes (default: its cache entry).
        reporter: where the lines go.
        documents: `(documents, description)` already read from `cfg.data` (default: read them here).

    Returns:
        The teacher directory.

    Raises:
        OutputRefused: `out` names no folder, is a file or a folder with something in it, or its work folder
            `<out>.partial` holds something `hybridopt teacher` did not write.
        ValueError: the data is unusable (see `corpus_documents`); `NotEnoughTokens` for too little text.
    """
    reporter = reporter or Reporter()
    docs, desc = documents or corpus_documents(cfg.data)
    fingerprint = corpus_fingerprint(docs)
    out = check_output(out, "teacher").resolve() if out else teacher_cache_path(cfg, fingerprint)
    if occupied(out):  # a finished teacher, ours or not: never replaced (the rename below would fail anyway)
        what = "holds a trained teacher" if made_by(out) == "teacher" else "is not an empty folder"
        raise OutputRefused(f"'{out}' {what}; choose another (nothing in it is replaced)")
    work = out.with_name(out.name + ".partial")
    # Ours to resume only if it is marked, or holds what an older version left there (checkpoint, tokenizer).
    check_output(work, "teacher", legacy=(CHECKPOINT_NAME, "tokenizer.json"))
    lock = lock_run(work)  # one process trains into a work folder; held until the teacher is renamed into place
    try:
        if occupied(out):  # finished by the process that held the work folder before this one
            raise OutputRefused(f"'{out}' holds a trained teacher; choose another (nothing in it is replaced)")
        claim_output(work, "teacher")
        return _train(cfg, out, work, docs, desc, fingerprint, reporter)
    finally:
        lock.close()


def _train(cfg: TeacherConfig, out: Path, work: Path, docs: list[Document], desc: str, fingerprint: str,
           reporter: Reporter) -> Path:
    """`train_teacher` once its work folder is held: train (or resume) there, then rename it to `out`."""
    resume = (work / CHECKPOINT_NAME).exists()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    train_docs, _ = split_documents(docs, cfg.val_fraction)
    reporter.line(f"Teacher corpus: {desc}; training a {cfg.vocab_size}-token byte-level BPE tokenizer")
    tokenizer = train_bpe_tokenizer((d.text for d in train_docs), cfg.vocab_size)
    tokenizer.save_pretrained(work)
    train, val = token_splits(docs, tokenizer, cfg.seq_len, cfg.val_fraction)
    shape = teacher_llama_config(tokenizer, cfg.hidden, cfg.layers, cfg.intermediate, cfg.heads, cfg.context)
    model = build_model(shape, cfg.seed).to(device)
    reporter.line(f"Teacher: Llama, {num_parameters(model) / 1e6:.2f}M parameters, {cfg.layers} layers x {cfg.hidden} "
                  f"hidden; {train.num_tokens:,} training tokens, {val.num_tokens:,} validation tokens"
                  + (f"; resuming from {work}" if resume else ""))
    trainer = Trainer(cfg, model, train, val, work, device, name="teacher", config_dict=asdict(cfg), reporter=reporter)
    if (line := describe_optimizer(trainer.optimizer)) is not None:
        reporter.line(line)
    trainer.setup(resume=resume)
    trainer.train()
    trainer.cleanup()
    result = trainer.evaluate()
    model.save_pretrained(work, safe_serialization=True)
    info = {"val_loss": result["loss"], "val_ppl": result["ppl"], "val_tokens": result["tokens"],
            "parameters": num_parameters(model), "corpus": desc, "corpus_fingerprint": fingerprint,
            "config": asdict(cfg)}
    atomic_write(work / INFO_NAME, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    (work / CHECKPOINT_NAME).unlink()
    work.rename(out)  # fails rather than replace a folder that filled up meanwhile
    reporter.line(f"Teacher saved to {out} (validation loss {result['loss']:.4f}, perplexity {result['ppl']:.2f})")
    return out


def ensure_default_teacher(reporter: Reporter | None = None) -> Path:
    """The default teacher's directory, training it first (once, with progress) if it is missing. Processes that
    need it at once train it once: the others wait for the first and then read what it saved."""
    cfg = default_teacher_config()
    docs, _ = corpus_documents([])
    path = teacher_cache_path(cfg, corpus_fingerprint(docs))
    if _ready(path):
        return path
    reporter = reporter or Reporter()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    lock = lock_file(lock_path)
    if lock is None:
        reporter.line(f"Waiting for {lock_holder(lock_path)}, which is training the default teacher into {path}")
        lock = lock_file(lock_path, blocking=True)
    try:
        if _ready(path):
            return path
        reporter.line(f"No default teacher cached yet: training one on the embedded corpus into {path} "
                      "(one time; about 4 minutes on 2 CPU cores)")
        return train_teacher(cfg, path, reporter)
    finally:
        lock.close()


def _ready(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / INFO_NAME).is_file()
