"""Byte-level BPE tokenizers: trained with Hugging Face `tokenizers`, loaded with `transformers`."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hybridopt.errors import first_line


EOS_TOKEN = "<|endoftext|>"
# Files from which `AutoTokenizer` can build a tokenizer; a teacher folder needs one of them.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style, lossless round trip) on `texts`.

    Args:
        texts: training documents.
        vocab_size: final vocabulary size, the 256 byte symbols and `<|endoftext|>` included.

    Returns:
        A `PreTrainedTokenizerFast` whose BOS, EOS and PAD token are `<|endoftext|>`.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved beside a teacher, or say clearly that there is none."""
    path = Path(path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"'{path}' has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            "save it there with tokenizer.save_pretrained"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a broken tokenizer folder
        raise ValueError(f"cannot load the tokenizer in '{path}': {first_line(e)}") from None
