"""Text generation from a student: packed exports and Hugging Face folders alike.

A prompt must be UTF-8 text (`check_prompt`: bytes from the command line that are not UTF-8 are refused). A
prompt longer than the model's context is cut to its last tokens, leaving room for the new ones, with a note on
stderr, as the llama.cpp path (`llama_cpp.llama_cpp_continue`) does; the whole prompt is still printed.
"""

from __future__ import annotations

import sys

import torch
from transformers import PreTrainedTokenizerBase

from hybridopt.errors import for_flag


def check_prompt(prompt: str) -> None:
    """Raise ValueError unless `prompt` encodes as UTF-8: on POSIX, command-line bytes that are not UTF-8 reach
    Python as lone surrogates (`\\udcff` for byte 0xff), which no tokenizer can encode."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(prompt[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise ValueError(f"the prompt is not valid UTF-8 ({what} at character {e.start}); pass UTF-8 text") from None


@torch.no_grad()
def generate_text(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> str:
    """Continue `prompt`: greedy when `temperature` is 0, else sampling (optionally top-k).

    A prompt and new tokens longer than the model's context (`max_position_embeddings`) generate from the
    prompt's last tokens (at least one), and stop where the context is full; a note on stderr says so.

    Raises:
        UserError: the prompt is not UTF-8 (`--prompt`).
    """
    with for_flag("--prompt"):
        check_prompt(prompt)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if ids.numel() == 0:
        ids = torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id or 0]], device=device)
    full, ids, max_new_tokens = _fit_context(ids, max_new_tokens, getattr(model.config, "max_position_embeddings", None))
    torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=sampling,
        temperature=temperature if sampling else None, top_k=top_k if sampling and top_k else None,
        top_p=None, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    # The whole prompt, then what was generated (decoded together: a cut can fall inside a character's bytes).
    return tokenizer.decode(torch.cat([full[0], out[0, ids.shape[1]:]]), skip_special_tokens=True)


def _fit_context(ids: torch.Tensor, max_new_tokens: int, context: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(all prompt ids, the ids to generate from, new tokens)`: the prompt's end and as many new tokens as
    `context` holds, the new tokens first (as llama.cpp does), with a note on stderr when anything is cut."""
    n = ids.shape[1]
    if not context or n + max_new_tokens <= context:
        return ids, ids, max_new_tokens
    keep = max(1, context - max_new_tokens)
    new = min(max_new_tokens, context - min(n, keep))
    note = f"note: the prompt's {n} tokens and {max_new_tokens} new ones do not fit the model's context of {context}"
    if n > keep:
        note += f"; generating from the prompt's last {keep} tokens"
    if new < max_new_tokens:
        note += f"; generating {new} new tokens"
    print(note, file=sys.stderr)
    return ids, ids[:, -keep:], new
