"""Shared fixtures: a private cache, a tiny real-text corpus and a tiny teacher trained on it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

_CACHE = tempfile.mkdtemp(prefix="hybridopt-test-cache-")

# Property tests draw the same examples on every run and every machine (derandomized: seeded from each test's
# code), with no example database replaying past failures: a CI failure reproduces locally and a pass is not a
# lucky draw. Loaded here, before any test module builds its own `settings(...)`, which inherit it;
# `pytest --hypothesis-profile=default` draws fresh examples when hunting for new failures.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


def pytest_configure(config):
    # Never touch the user's cache: every test run gets its own, removed at the end.
    os.environ["HYBRIDOPT_CACHE"] = _CACHE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global torch, numpy and random state, whatever ran before it: a test that
    draws from the global generators draws the same values alone, in the suite, and on CI."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """The test runs on one intra-op thread, and the session gets its threads back after (a thread count left
    behind changes how later tests' float32 reductions round)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """About 40 pydoc topics as JSONL: real English, shipped with Python, a few hundred KB."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    names = sorted(topics)[:40]
    path.write_text("".join(json.dumps({"text": topics[n]}) + "\n" for n in names), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, corpus_file) -> Path:
    """A 2-layer, 64-wide teacher trained for a few seconds on `corpus_file`."""
    from hybridopt.config import TeacherConfig
    from hybridopt.training.default_teacher import train_teacher

    cfg = TeacherConfig(data=[str(corpus_file)], vocab_size=512, hidden=64, layers=2, intermediate=192, heads=2,
                        context=128, seq_len=64, batch_size=16, epochs=4, max_steps_per_epoch=60, lr=5e-3,
                        eval_every=4, device="cpu")
    return train_teacher(cfg, tmp_path_factory.mktemp("teacher") / "tiny-teacher")


@pytest.fixture(scope="module")
def teacher_and_blocks(tiny_teacher):
    """The tiny teacher loaded on CPU, and ten random 16-token blocks for it (the teacher-logit cache's tests)."""
    import torch

    from hybridopt.data.blocks import TokenBlocks
    from hybridopt.models.modeling import load_teacher

    teacher, _ = load_teacher(tiny_teacher, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    blocks = TokenBlocks(torch.randint(0, 500, (16 * 10 + 1,), generator=g), 16)
    return teacher, blocks


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory) -> Path:
    """A tiny full-precision Llama folder with its tokenizer, as a user would have one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridopt.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([f"line {i} of a small text about packing and tokens" for i in range(50)], 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32))
    path = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_distill_config(teacher: Path, data: Path, out: Path, **kw):
    """The DistillConfig of a distillation run that takes seconds on CPU: the tiny student (32 wide, one layer)
    on 32-token blocks, batches of 8; `kw` sets the run's length and anything else."""
    from hybridopt.config import DistillConfig

    return DistillConfig(**{**dict(teacher=str(teacher), data=[str(data)], out=str(out), student_hidden=32,
                                   student_layers=1, student_intermediate=64, student_heads=2, seq_len=32,
                                   batch_size=8, device="cpu"), **kw})


def tiny_distill_args(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments of a distillation run that takes a few seconds on CPU."""
    return ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--student_hidden", "32", "--student_layers", "1", "--student_intermediate", "64",
            "--student_heads", "2", "--seq_len", "32", "--batch_size", "8", "--epochs", "3",
            "--max_steps_per_epoch", "5", "--eval_every", "1", "--device", "cpu", *extra]


def fork_logged(log: Path, body) -> int:
    """Fork a child that runs `body()` with its stdout and stderr appended to `log`, and exits with what `body`
    returns (None: 0), or 70 with the traceback in `log` if it raises. Returns the child's pid."""
    import sys
    import traceback

    pid = os.fork()
    if pid == 0:
        rc = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
            rc = body() or 0
        except BaseException:  # noqa: BLE001  (the parent reads the log)
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(rc)
    return pid


def overwrite_gguf_field(path: Path, key: str, value: int) -> None:
    """Overwrite the integer field `key` of the GGUF file `path` in place (data untouched): how a test forges a
    GGUF header."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    reader.fields[key].parts[-1][0] = value
    reader.data.flush()
    del reader
    assert gguf.GGUFReader(str(path)).fields[key].contents() == value


def rewrite_safetensors_header(path: Path, edit) -> None:
    """Call `edit(header)` on the JSON header of a safetensors file and write it back, data untouched: how a
    test forges or damages a header."""
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the data 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
