"""The teacher-logit cache: run the teacher once, distil from its stored top-k (offline distillation).

For every training block (`TokenBlocks`, `N` blocks of `T` tokens) and every position, the cache
stores the teacher's `k` most likely next tokens and their log-probabilities at the KD temperature,
computed over the whole vocabulary (so the mass outside the top-k is known: see `losses.topk_kl`):

    ids       (N, T, k)  int16 (vocabularies up to 32,767 tokens) or int32
    logprobs  (N, T, k)  float32, log softmax(z_t / temperature) of those tokens

in one safetensors file (no pickle), written atomically, read lazily block by block through
safetensors' memory map. The header's `__metadata__` names the format, its version, the key (a hash
of the teacher's config and weights, the token blocks, `k` and the temperature), `k`, the temperature,
the vocabulary size and `sha256`, a checksum of the two tensors' bytes (ids, then log-probabilities; files
written before it was added lack it and open unchecked by it). `open_cache` checks every header field and
every tensor's dtype and shape before reading any data, then reads the data once, in chunks, for the
checksum, ids inside the vocabulary and finite, non-positive log-probabilities, so a damaged file is found
before training starts; each batch read is checked again. A missing, stale or damaged cache is rebuilt by
`ensure_cache`, with a warning for the last two, under a lock per entry: a second process that wants the same
entry meanwhile waits for the first and reads what it wrote (`fileio.read_or_build`).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from hybridopt.fileio import atomic_write, read_or_build, read_safetensors_header
from hybridopt.data.blocks import TokenBlocks
from hybridopt.models.modeling import hash_model, vocab_size
from hybridopt.reporting import Reporter

class TopKTargets(NamedTuple):
    """The teacher's top-k tokens per position and their log-probabilities at the KD temperature.

    Attributes:
        ids: `(B, T, k)` token ids (any integer dtype).
        logprobs: `(B, T, k)` `log softmax(z_t / T)` of those tokens, over the full vocabulary.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor


FORMAT = "hybridopt-teacher-cache"
FORMAT_VERSION = "1"
_MAX_HEADER = 1 << 20  # a header of a few hundred bytes; anything larger is not ours
_CHECK_BYTES = 64 << 20  # how much of a tensor `open_cache` reads at a time to check it
_MAX_LOGPROB = 1e-4  # log-probabilities are <= 0; float32 rounding of log_softmax may give a hair above


def cache_key(teacher: torch.nn.Module, blocks: TokenBlocks, k: int, temperature: float) -> str:
    """A hash of everything the cached targets depend on."""
    h = hashlib.sha256(f"{FORMAT} v{FORMAT_VERSION} k={k} T={temperature!r} blocks={blocks.digest}".encode())
    hash_model(h, teacher)
    return h.hexdigest()[:24]


@dataclass
class TeacherCache:
    """An open cache: `targets(indices)` gives the top-k targets of those training blocks.

    Attributes:
        path: the safetensors file.
        k: tokens kept per position.
        temperature: the KD temperature the log-probabilities are at.
        vocab: the teacher's vocabulary size.
        num_blocks, seq_len: the shape of the blocks it covers.
    """

    path: Path
    k: int
    temperature: float
    vocab: int
    num_blocks: int
    seq_len: int

    def targets(self, indices: list[int]) -> TopKTargets:
        """`(ids, logprobs)`, each `(B, T, k)`, of the blocks `indices` (in that order).

        Raises:
            ValueError: the stored values are out of range (a damaged or forged file).
        """
        with safe_open(self.path, framework="pt") as f:
            ids_slice, lp_slice = f.get_slice("ids"), f.get_slice("logprobs")
            ids = torch.stack([ids_slice[int(i)] for i in indices])
            logprobs = torch.stack([lp_slice[int(i)] for i in indices])
        problem = _value_problem("ids", ids, self.vocab) or _value_problem("logprobs", logprobs, self.vocab)
        if problem:  # open_cache checked every value: the file changed since
            raise ValueError(f"teacher cache {self.path} {problem}")
        return TopKTargets(ids, logprobs)

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size


def open_cache(path: Path, key: str, blocks: TokenBlocks, vocab: int) -> TeacherCache:
    """Open the cache at `path` for these blocks: the header is checked before any data is read, then every
    stored value and the checksum (one pass, in chunks).

    Raises:
        ValueError: the file is not this cache (other key, format, version, shapes, dtypes or size), or its
            data is damaged (ids outside the vocabulary, log-probabilities not finite and <= 0, checksum).
    """
    path = Path(path)
    header, header_len = read_safetensors_header(path, _MAX_HEADER)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError("not a hybridopt teacher cache")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format_version')!r}, this hybridopt reads {FORMAT_VERSION}")
    if meta.get("key") != key:
        raise ValueError("made for another teacher, data, k or temperature")
    try:
        k, temperature, stored_vocab = int(meta["k"]), float(meta["temperature"]), int(meta["vocab"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("its metadata lacks k, temperature or vocab") from None
    if stored_vocab != vocab or not 1 <= k <= vocab or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"its metadata (k={k}, temperature={temperature}, vocab={stored_vocab}) does not fit")
    shape = [len(blocks), blocks.seq_len, k]
    expect = {"ids": ("I16", "I32"), "logprobs": ("F32",)}
    size = 0
    for name, dtypes in expect.items():
        info = header.get(name)
        if not isinstance(info, dict) or info.get("dtype") not in dtypes or info.get("shape") != shape:
            raise ValueError(f"tensor {name!r} is not {'/'.join(dtypes)} of shape {shape}")
        offsets = info.get("data_offsets")
        width = {"I16": 2, "I32": 4, "F32": 4}[info["dtype"]]
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or offsets[0] < 0 or offsets[1] - offsets[0] != math.prod(shape) * width):
            raise ValueError(f"tensor {name!r} has inconsistent data offsets")
        size = max(size, offsets[1])
    if path.stat().st_size < 8 + header_len + size:
        raise ValueError("the file is truncated")
    _check_data(path, meta.get("sha256"), vocab)
    return TeacherCache(path, k, temperature, vocab, len(blocks), blocks.seq_len)


def _value_problem(name: str, values: torch.Tensor, vocab: int) -> str | None:
    """What is wrong with stored `ids` (outside the vocabulary) or `logprobs` (not finite and <= 0); None if
    nothing."""
    if not values.numel():
        return None
    if name == "ids" and (int(values.min()) < 0 or int(values.max()) >= vocab):
        return f"holds token ids outside the vocabulary of {vocab}"
    if name == "logprobs" and (not bool(torch.isfinite(values).all()) or float(values.max()) > _MAX_LOGPROB):
        return "holds log-probabilities that are not finite and <= 0"
    return None


def _tensor_digest(h, values: torch.Tensor) -> None:
    """Add the bytes of `values` (as the file stores them: little-endian) to the hash `h`."""
    h.update(values.contiguous().reshape(-1).view(torch.uint8).numpy())


def _check_data(path: Path, digest: str | None, vocab: int) -> None:
    """Read both tensors once, in chunks of blocks, checking every value and (when the header has one) the
    checksum; raise ValueError on the first problem."""
    h = hashlib.sha256()
    with safe_open(path, framework="pt") as f:
        for name in ("ids", "logprobs"):
            data = f.get_slice(name)
            n, *rest = data.get_shape()
            step = max(1, _CHECK_BYTES // max(1, 4 * math.prod(rest)))  # blocks per read
            for lo in range(0, n, step):
                chunk = data[lo : min(lo + step, n)]
                problem = _value_problem(name, chunk, vocab)
                if problem:
                    raise ValueError(problem)
                _tensor_digest(h, chunk)
    if digest is not None and h.hexdigest() != digest:  # no digest: written before it was added
        raise ValueError("its checksum does not match its data (the file is damaged)")


@torch.no_grad()
def build_cache(teacher: torch.nn.Module, blocks: TokenBlocks, k: int, temperature: float, path: Path,
                batch_size: int, device: torch.device, reporter: Reporter | None = None) -> TeacherCache:
    """Run `teacher` over every block once and write its top-k log-probabilities to `path` (atomically)."""
    reporter = reporter or Reporter()
    vocab = vocab_size(teacher)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, {vocab}] (the teacher's vocabulary), got {k}")
    key = cache_key(teacher, blocks, k, temperature)
    id_dtype = torch.int16 if vocab <= torch.iinfo(torch.int16).max + 1 else torch.int32
    N, T = len(blocks), blocks.seq_len
    ids = torch.empty(N, T, k, dtype=id_dtype)
    logprobs = torch.empty(N, T, k, dtype=torch.float32)
    was_training = teacher.training
    teacher.eval()
    start = time.perf_counter()
    bar = reporter.progress(N, desc="teacher cache")
    try:
        for lo in range(0, N, batch_size):
            idx = list(range(lo, min(lo + batch_size, N)))
            input_ids, _ = blocks.batch(idx)
            logits = teacher(input_ids=input_ids.to(device)).logits.float()  # (B, T, V)
            values, top = F.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)  # (B, T, k)
            if not bool(torch.isfinite(values).all()):  # open_cache would refuse the file as damaged
                raise ValueError("the teacher's log-probabilities are not finite (its logits hold NaN or "
                                 "infinity); check the teacher's weights")
            ids[lo : lo + len(idx)] = top.to(id_dtype).cpu()
            logprobs[lo : lo + len(idx)] = values.cpu()
            bar.update(len(idx))
    finally:
        reporter.close_progress()
        teacher.train(was_training)
    h = hashlib.sha256()
    _tensor_digest(h, ids)
    _tensor_digest(h, logprobs)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "k": str(k),
                "temperature": repr(float(temperature)), "vocab": str(vocab), "sha256": h.hexdigest()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"ids": ids, "logprobs": logprobs}, str(tmp), metadata=metadata))
    cache = open_cache(path, key, blocks, vocab)
    reporter.line(f"Teacher cache: top-{k} of {vocab} tokens at temperature {temperature:g} for {N * T:,} tokens, "
                  f"{cache.nbytes / 2**20:.1f} MiB ({cache.nbytes / (N * T):.0f} B/token), "
                  f"built in {time.perf_counter() - start:.1f} s: {path}")
    return cache


def ensure_cache(teacher: torch.nn.Module, blocks: TokenBlocks, k: int, temperature: float, folder: Path,
                 batch_size: int, device: torch.device, reporter: Reporter | None = None) -> TeacherCache:
    """The cache for this teacher, blocks, `k` and temperature under `folder`: opened if it is there and
    intact, otherwise (missing, stale or damaged, with a warning for the last two) built."""
    reporter = reporter or Reporter()
    key = cache_key(teacher, blocks, k, temperature)
    path = Path(folder) / f"teacher-top{k}-{key}.safetensors"

    def read() -> TeacherCache | None:
        try:
            cache = open_cache(path, key, blocks, vocab_size(teacher))
        except (ValueError, OSError, UnicodeDecodeError) as e:
            reporter.warn(f"rebuilding the damaged teacher cache {path} ({e})")
            return None
        reporter.line(f"Teacher cache: top-{k} at temperature {temperature:g}, "
                      f"{cache.nbytes / 2**20:.1f} MiB, read from {path}")
        return cache

    # one teacher pass per entry: a process that wants it while another builds it waits, then reads its file
    return read_or_build(path, read,
                         lambda: build_cache(teacher, blocks, k, temperature, path, batch_size, device, reporter),
                         "the teacher cache", reporter.line)
