"""Teacher loading and student construction (Hugging Face `transformers` models)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from hybridopt.config import StudentConfig
from hybridopt.models.tokenizer import load_tokenizer


def context_length(config: PretrainedConfig) -> int | None:
    """The longest sequence a model config admits, whatever the architecture calls it."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the output head: the size of the distribution the student must match."""
    return model.get_output_embeddings().weight.shape[0]


def load_teacher(path: str | Path, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a local causal LM and its tokenizer, frozen and in eval mode, its weights in `dtype`: a Hugging Face
    folder (loaded straight into `dtype`), or a GGUF file (or a folder holding one and no config.json),
    dequantized.

    Raises:
        ValueError: the folder is missing, has no config or weights, or has no tokenizer; or a GGUF of an
            architecture or tensor type transformers cannot load.
    """
    from hybridopt.export.gguf_read import find_gguf, load_gguf

    path = Path(path).expanduser()
    if find_gguf(path) is not None:
        model, tokenizer = load_gguf(path, device)
        return model.to(dtype), tokenizer
    if not path.is_dir():
        raise ValueError(f"'{path}' is not a directory; pass a local Hugging Face model folder or a .gguf file")
    if not (path / "config.json").is_file():
        raise ValueError(f"'{path}' has no config.json; save the model there with save_pretrained")
    tokenizer = load_tokenizer(path)
    try:
        AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                                     trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for broken folders
        raise ValueError(f"cannot load the model in '{path}': {str(e).splitlines()[0]}") from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def student_config(teacher_config: PretrainedConfig, teacher_vocab: int, cfg: StudentConfig,
                   tokenizer: PreTrainedTokenizerBase, max_positions: int) -> LlamaConfig:
    """A Llama config sharing the teacher's vocabulary, with the size asked for in `cfg`."""
    return LlamaConfig(
        vocab_size=teacher_vocab,
        hidden_size=cfg.student_hidden,
        intermediate_size=cfg.student_intermediate,
        num_hidden_layers=cfg.student_layers,
        num_attention_heads=cfg.student_heads,
        num_key_value_heads=cfg.student_kv_heads or cfg.student_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def teacher_llama_config(tokenizer: PreTrainedTokenizerBase, hidden: int, layers: int, intermediate: int, heads: int,
                         context: int) -> LlamaConfig:
    """The Llama config of a teacher trained from scratch by `hybridopt teacher`."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama model; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def hash_model(h: "hashlib._Hash", model: torch.nn.Module) -> None:
    """Feed a model's config (not where it was loaded from) and every weight's bytes into the hash `h`:
    equal digests, equal models. Keys the caches computed from a teacher."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def hidden_matrices(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(the trainable 2-D weights inside the model, every other trainable parameter): the matrices Muon's
    orthogonalised step suits, and the embeddings, input and output layers (`get_input_embeddings` and
    `get_output_embeddings`, as transformers models name them), norms and biases it does not."""
    io = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for name in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, name, lambda: None)()
        if layer is not None:
            io |= {id(p) for p in layer.parameters()}
    hidden, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (hidden if p.dim() == 2 and id(p) not in io else rest).append(p)
    return hidden, rest


def param_groups(model: torch.nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """Weight decay on matrices only (not norms or biases). With `muon`: the hidden matrices in a group of their
    own and every other group `"orthogonalize": False` (for `HybridOptimizer(base="muon")`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not muon:
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    hidden, rest = hidden_matrices(model)
    groups = [{"params": hidden, "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "orthogonalize": False},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "orthogonalize": False}]
    return [g for g in groups if g["params"]]
