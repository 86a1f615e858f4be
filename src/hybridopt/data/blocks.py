"""Token streams cut into fixed-length training blocks.

Documents are tokenized, each followed by EOS, and concatenated into one stream per split.
Block `i` is `stream[i*T : i*T + T + 1]`: inputs are its first `T` tokens, targets its last `T`,
so every token after the first is predicted exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hybridopt.errors import UserError, first_line
from hybridopt.fileio import WRITE_ERRORS, atomic_write, read_or_build, write_failure
from hybridopt.data.corpus import Document


def tokenize_documents(
    docs: list[Document], tokenizer: PreTrainedTokenizerBase, desc: str = "tokenizing"
) -> torch.Tensor:
    """Tokenize documents into one int64 stream, EOS after each document (if the tokenizer has one)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch = 256
    for start in tqdm(range(0, len(docs), batch), desc=desc, unit="batch", leave=False, disable=None):
        texts = [d.text for d in docs[start : start + batch]]
        for seq in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            if eos is not None:
                ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def cached_token_stream(
    docs: list[Document], tokenizer: PreTrainedTokenizerBase, cache: Path | None, desc: str
) -> torch.Tensor:
    """`tokenize_documents`, memoised on disk by a hash of the tokenizer and the documents (one process tokenizes
    an entry; others wanting it meanwhile wait and read it: `fileio.read_or_build`).

    Raises:
        UserError: the entry cannot be written (a full disk, a folder it may not write): one sentence.
    """
    if cache is None:
        return tokenize_documents(docs, tokenizer, desc)
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode() if tokenizer.is_fast else repr(tokenizer.get_vocab()).encode())
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    path = cache / f"{h.hexdigest()[:20]}.safetensors"

    def build() -> torch.Tensor:
        tokens = tokenize_documents(docs, tokenizer, desc)
        try:
            atomic_write(path, lambda tmp: save_file({"tokens": tokens}, str(tmp)))
        except WRITE_ERRORS as e:  # safetensors reports a failed write as SafetensorError
            raise UserError(write_failure(f"cannot write the token cache '{path}'", path, first_line(e),
                                          "Free some space, or point HYBRIDOPT_CACHE at another disk, and run the "
                                          "command again", e, "Nothing was written; point HYBRIDOPT_CACHE at a "
                                          "folder it may write, and run the command again")) from None
        return tokens

    # one tokenizer per entry: a process that wants it while another tokenizes waits, then reads its file
    return read_or_build(path, lambda: _read_token_cache(path, len(tokenizer)), build, "the token cache")


def _read_token_cache(path: Path, vocab: int) -> torch.Tensor | None:
    """The cached stream at `path`, or None (with a warning; it is then rebuilt) if the file is damaged:
    unreadable, not one 1-D int64 tensor, or holding ids outside the vocabulary."""
    try:
        tensors = load_file(path)
        tokens = tensors.get("tokens")
        if len(tensors) != 1 or tokens is None or tokens.dtype != torch.int64 or tokens.dim() != 1:
            raise ValueError("not one 1-D int64 tensor 'tokens'")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"token ids outside the vocabulary of {vocab}")
        return tokens
    except Exception as e:  # safetensors raises its own error type for malformed files
        print(f"warning: ignoring the damaged token cache {path} ({str(e).splitlines()[0]}); tokenizing again",
              file=sys.stderr)
        return None


class NotEnoughTokens(ValueError):
    """A split holds fewer tokens than one block."""


class TokenBlocks(Dataset):
    """Fixed-length `(input_ids, labels)` blocks over a token stream.

    Args:
        stream: 1-D token ids.
        seq_len: tokens per block, `T`.
        split: name used in error messages.
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, split: str = "train"):
        assert stream.dim() == 1
        self.stream = stream
        self.seq_len = seq_len
        self.num_blocks = (len(stream) - 1) // seq_len
        if self.num_blocks < 1:
            raise NotEnoughTokens(
                f"the {split} split has {len(stream)} tokens, fewer than one sequence of {seq_len} tokens "
                "plus one; add text or use shorter sequences"
            )

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return self.stream[start : start + self.seq_len + 1]

    def batch(self, indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather blocks into `(input_ids, labels)`, each `(B, T)`."""
        blocks = torch.stack([self[int(i)] for i in indices])  # (B, T+1)
        return blocks[:, :-1], blocks[:, 1:]

    @functools.cached_property
    def digest(self) -> str:
        """A hash of the block length and the token stream: equal digests, equal blocks."""
        h = hashlib.sha256(f"T={self.seq_len} {tuple(self.stream.shape)} {self.stream.dtype}".encode())
        h.update(self.stream.numpy().tobytes())
        return h.hexdigest()

    @property
    def num_tokens(self) -> int:
        """Predicted tokens in this dataset."""
        return self.num_blocks * self.seq_len
