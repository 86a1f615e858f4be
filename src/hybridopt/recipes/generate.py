"""Text generation from a student: packed exports and Hugging Face folders alike."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from hybridopt.export.packed import PACKED_NAME, load_packed
from hybridopt.training.layout import RunLayout
from hybridopt.models.tokenizer import load_tokenizer


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
    """Model, tokenizer and a description (packed or full precision) from a folder."""
    folder = resolve_model_dir(path)
    tokenizer = load_tokenizer(folder)
    if (folder / PACKED_NAME).is_file():
        return load_packed(folder, device), tokenizer, f"packed export {folder / PACKED_NAME}"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                                     trust_remote_code=False)
    except Exception as e:  # transformers raises many types for broken folders
        raise ValueError(f"cannot load the model in '{folder}': {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer, f"full-precision model {folder}"


@torch.no_grad()
def generate_text(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> str:
    """Continue `prompt`: greedy when `temperature` is 0, else sampling (optionally top-k)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if ids.numel() == 0:
        ids = torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id or 0]], device=device)
    torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=sampling,
        temperature=temperature if sampling else None, top_k=top_k if sampling and top_k else None,
        top_p=None, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)
