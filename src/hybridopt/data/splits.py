"""Corpus -> train/validation token blocks, shared by the teacher and distillation recipes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from hybridopt.fileio import atomic_write, read_or_build
from hybridopt.data.corpus import Document, check_splittable, embedded_corpus, load_documents, split_documents
from hybridopt.data.blocks import TokenBlocks, cached_token_stream
from hybridopt.utils import cache_dir


def embedded_corpus_cached() -> list[Document]:
    """`embedded_corpus()`, cached per Python version (the stdlib is what it reads)."""
    key = f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    path = cache_dir() / "corpus" / f"embedded-{key}.jsonl"

    def build() -> list[Document]:
        docs = embedded_corpus()
        text = "".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in docs)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return docs

    return read_or_build(path, lambda: _read_corpus_cache(path), build, "the embedded corpus cache")


def _read_corpus_cache(path: Path) -> list[Document] | None:
    """The cached embedded corpus, or None (with a warning; it is then rebuilt) if the file is damaged."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        docs = [Document(id=r["id"], text=r["text"]) for r in rows]
        if len(docs) < 2 or not all(isinstance(d.id, str) and isinstance(d.text, str) and d.text for d in docs):
            raise ValueError("not a list of documents")
        return docs
    except (OSError, ValueError, TypeError, KeyError) as e:  # UnicodeDecodeError and JSON errors are ValueErrors
        print(f"warning: ignoring the damaged corpus cache {path} ({str(e).splitlines()[0]}); reading the corpus again",
              file=sys.stderr)
        return None


def corpus_documents(data: list[str]) -> tuple[list[Document], str]:
    """The user's files when given, else the embedded corpus; with a short description.

    Raises:
        ValueError: a file is missing, unreadable, binary, not UTF-8 or empty, or there are fewer than 2 documents.
    """
    if data:
        docs = load_documents(data)
        check_splittable(docs)  # before any long work: split_documents would refuse it only later
        return docs, f"{len(docs)} documents from {len(data)} path(s)"
    docs = embedded_corpus_cached()
    return docs, f"embedded Python-docs corpus, {len(docs)} documents"


def token_splits(docs: list[Document], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                 val_fraction: float) -> tuple[TokenBlocks, TokenBlocks]:
    """Document-level split, tokenized (cached by content hash) and cut into blocks of `seq_len`.

    Raises:
        NotEnoughTokens: a split is shorter than one block.
    """
    train_docs, val_docs = split_documents(docs, val_fraction)
    cache = cache_dir() / "tokens"
    train = cached_token_stream(train_docs, tokenizer, cache, "tokenizing train split")
    val = cached_token_stream(val_docs, tokenizer, cache, "tokenizing validation split")
    return TokenBlocks(train, seq_len, "train"), TokenBlocks(val, seq_len, "validation")


