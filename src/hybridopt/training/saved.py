"""A trained student loaded back: from a run folder (its packed export, else its full-precision student), an
export folder, or any Hugging Face causal-LM folder. What `generate`, `inspect` and `export` read."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from hybridopt.errors import first_line
from hybridopt.export.packed import PACKED_NAME, load_packed
from hybridopt.models.modeling import check_teacher_files, check_tokenizer_fits
from hybridopt.models.tokenizer import load_tokenizer
from hybridopt.training.layout import RunLayout


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder means its packed export if there is one, else its full-precision student."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"'{path}' is not a directory")
    run = RunLayout(path)
    for candidate in (path, run.export, run.student):
        if (candidate / PACKED_NAME).is_file() or (candidate / "config.json").is_file():
            return candidate
    raise ValueError(f"'{path}' holds no model ({PACKED_NAME} or config.json)")


def load_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """Model, tokenizer and a description (packed or full precision) from a folder.

    Raises:
        ValueError: no model there, or (a Hugging Face folder) weights not in safetensors, a config.json its
            safetensors headers do not back, or a tokenizer larger than the embedding, found before anything is built.
    """
    folder = resolve_model_dir(path)
    tokenizer = load_tokenizer(folder)
    if (folder / PACKED_NAME).is_file():
        return load_packed(folder, device), tokenizer, f"packed export {folder / PACKED_NAME}"
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for broken folders
        raise ValueError(f"cannot load the model in '{folder}': {first_line(e)}") from None
    # Untrusted like a teacher folder: what config.json claims is checked against the safetensors headers (and
    # the attention set to a built-in one) before anything is allocated.
    check_tokenizer_fits(folder, tokenizer, check_teacher_files(folder, config))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, local_files_only=True,
                                                     dtype=torch.float32, trust_remote_code=False,
                                                     attn_implementation=config._attn_implementation)
    except Exception as e:  # transformers raises many types for broken folders
        raise ValueError(f"cannot load the model in '{folder}': {first_line(e)}") from None
    return model.to(device).eval(), tokenizer, f"full-precision model {folder}"
