"""Running a GGUF file with llama.cpp, through llama-cpp-python (optional: it compiles llama.cpp on install):
the model, its logits, its context length, and text generation.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def have_llama_cpp() -> bool:
    """Whether llama-cpp-python is installed (it runs GGUF files; optional: it compiles llama.cpp on install)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_model(path: str | Path, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = False):
    """A `llama_cpp.Llama` for a GGUF file (needs `pip install llama-cpp-python`)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ValueError("running a GGUF through llama.cpp needs llama-cpp-python (pip install llama-cpp-python)") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                 logits_all=logits_all, verbose=False)


def llama_cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    """Next-token logits at every position of `tokens` from llama.cpp, `(len(tokens), vocab)` float32."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def context_length(path: str | Path, default: int = 2048) -> int:
    """The context a GGUF model was trained for (`{arch}.context_length`), or `default` when it does not say."""
    try:
        fields = gguf.GGUFReader(str(path)).fields
        return int(fields[f"{fields['general.architecture'].contents()}.context_length"].contents())
    except (KeyError, IndexError, ValueError):
        return default


def llama_cpp_continue(llm, ids: list[int], max_new_tokens: int, n_ctx: int, temperature: float = 0.0,
                       top_k: int = 0) -> list[int]:
    """The tokens llama.cpp adds after `ids` (a prompt longer than the context leaves room for the new tokens by
    keeping its end): at most `max_new_tokens`, fewer at the end-of-text token or where `n_ctx` is full."""
    ids = ids[-max(1, n_ctx - max_new_tokens):]
    out: list[int] = []
    for token in llm.generate(ids, temp=temperature, top_k=top_k if temperature > 0 else 1, top_p=1.0, min_p=0.0,
                              repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(out) >= max_new_tokens or len(ids) + len(out) >= n_ctx:
            break
        out.append(token)
    return out


def generate_gguf(path: str | Path, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                  seed: int = 0, n_threads: int | None = None) -> str:
    """Continue `prompt` with llama.cpp in the context the model was trained for: greedy when `temperature` is 0,
    else sampling (optionally top-k). Returns the prompt and its continuation, as `generate.generate_text` does."""
    n_ctx = context_length(path)
    llm = llama_cpp_model(path, n_ctx=n_ctx, n_threads=n_threads)
    llm.set_seed(seed)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False) or [llm.token_bos()]
    out = llama_cpp_continue(llm, ids, max_new_tokens, n_ctx, temperature, top_k)
    return prompt + llm.detokenize(out).decode("utf-8", errors="replace")
