"""Teacher loading and student construction (Hugging Face `transformers` models)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from hybridopt.config import StudentConfig
from hybridopt.errors import first_line
from hybridopt.fileio import read_safetensors_header
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

    A folder is untrusted: before anything is allocated, the shapes its config.json claims are built on the meta
    device and checked against the safetensors headers (`check_teacher_files`); the attention implementation is
    always a built-in one (a config naming a hub kernel would make transformers download it); and every weight
    the model has must come from the files (none left randomly initialised).

    Raises:
        ValueError: the folder is missing, has no config or weights, or has no tokenizer; its config claims
            shapes its safetensors do not hold, or the files lack a weight; its tokenizer is larger than its
            embedding; or a GGUF of an architecture or tensor type transformers cannot load.
    """
    from hybridopt.export.gguf_read import find_gguf, load_gguf

    path = Path(path).expanduser()
    if find_gguf(path) is not None:
        model, tokenizer = load_gguf(path, device)
        check_tokenizer_fits(path, tokenizer, model)
        return model.to(dtype), tokenizer
    if not path.is_dir():
        raise ValueError(f"'{path}' is not a directory; pass a local Hugging Face model folder or a .gguf file")
    if not (path / "config.json").is_file():
        raise ValueError(f"'{path}' has no config.json; save the model there with save_pretrained")
    tokenizer = load_tokenizer(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for broken folders
        raise ValueError(f"cannot load the model in '{path}': {first_line(e)}") from None
    skeleton = check_teacher_files(path, config)
    check_tokenizer_fits(path, tokenizer, skeleton)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, local_files_only=True, dtype=dtype, trust_remote_code=False,
            attn_implementation=config._attn_implementation, output_loading_info=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for broken folders
        raise ValueError(f"cannot load the model in '{path}': {first_line(e)}") from None
    missing = set(info.get("missing_keys") or ())
    if missing:
        first = next((k for k in model.state_dict() if k in missing), sorted(missing)[0])
        raise ValueError(f"'{path}' lacks the weight {first} ({len(missing)} missing in all), which would be left "
                         "randomly initialised; save the whole model with save_pretrained")
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


# dtypes a safetensors header may name, and their sizes in bytes
_SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# config fields that size tensors, the first to blame when a claimed shape is not in the files
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_hidden_layers", "num_local_experts", "num_experts", "n_routed_experts",
                "moe_intermediate_size", "max_position_embeddings")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the safetensors files transformers would load from the folder `path`
    (model.safetensors, or the shards model.safetensors.index.json lists), from their headers alone, each
    entry checked against its file's size.

    Raises:
        ValueError: no safetensors weights there, or an index or header that is damaged.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"'{index}' is not a safetensors index (a JSON object with a weight_map)") from None
        if not names or any(not isinstance(n, str) or Path(n).name != n for n in names):
            raise ValueError(f"'{index}' must name shard files in its own folder")
    elif (path / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise ValueError(f"'{path}' holds no model.safetensors; hybridopt reads model weights from safetensors "
                         "only (save the model with save_pretrained)")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        file = path / name
        try:
            header, n = read_safetensors_header(file)
            data_bytes = file.stat().st_size - 8 - n
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                shape, (start, end) = entry["shape"], entry["data_offsets"]
                if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                        and type(start) is int and type(end) is int and 0 <= start <= end <= data_bytes
                        and end - start == math.prod(shape) * _SAFETENSORS_BYTES[entry["dtype"]]):
                    raise ValueError(f"tensor {key} does not fit the file")
                shapes[key] = tuple(shape)
        except FileNotFoundError:
            raise ValueError(f"'{file}' is missing (the folder's safetensors index lists it)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"'{file}' is not a readable safetensors file ({e})") from None
    return shapes


def _blame(config: PretrainedConfig, dims: set[int], tensor: str = "") -> str:
    """The config fields to blame for sizes `dims` the files do not hold, as "name value": a field whose value is
    among them, those that size attention first for an attention tensor (heads times head_dim rarely equals a
    field); "its sizes" when none fits."""
    values = {k: v for k, v in config.get_text_config().to_dict().items() if type(v) is int}
    attention = re.search(r"attn|attention|q_proj|k_proj|v_proj|query|key|value", tensor)
    if attention:
        heads = [f"{k} {values[k]}" for k in ("num_attention_heads", "num_key_value_heads", "head_dim") if k in values]
        if heads and not any(values.get(k) in dims for k in ("hidden_size",)):
            return ", ".join(heads)
    for name in (*_SIZE_FIELDS, *sorted(values)):
        if values.get(name) in dims:
            return f"{name} {values[name]}"
    return "its sizes"


def check_teacher_files(path: Path, config: PretrainedConfig) -> torch.nn.Module:
    """Check what a teacher folder's config claims against the safetensors it holds, allocating nothing: every
    layer claimed has tensors in the files; the model built from the config on the meta device (no storage) has
    no more values than the files hold; and each of its weights found in the files by name has the shape the
    config implies. Also sets the config's attention implementation to a built-in one (SDPA where the model
    supports it, else eager), whatever the file says, so building the model never looks up the hub.

    Returns the meta-device model (shapes only).

    Raises:
        ValueError: one sentence naming the folder and the config field whose claim the files do not back.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    shapes = safetensors_shapes(path)
    held = sum(math.prod(s) for s in shapes.values())
    text = config.get_text_config()
    # Layers come first: each claimed layer costs Python objects even on the meta device.
    layers = getattr(text, "num_hidden_layers", None)
    if layers is not None:
        indices = {int(m.group(1)) for k in shapes if (m := re.search(r"\.(\d+)\.", "." + k))}
        if type(layers) is not int or layers < 0:
            raise ValueError(f"'{path}': config.json's num_hidden_layers must be a non-negative integer, got {layers!r}")
        absent = next((i for i in range(min(layers, len(indices) + 1)) if i not in indices), None)
        if absent is not None:
            raise ValueError(f"'{path}': config.json claims num_hidden_layers {layers} but its safetensors hold no "
                             f"tensor of layer {absent}; the config does not describe these weights")
    held_dims = {d for s in shapes.values() for d in s}
    for name in _SIZE_FIELDS[:-1]:  # an absurd size (1e15) could overflow a shape before the totals are known
        value = getattr(text, name, None)
        if type(value) is int and value > max(held, 1):
            raise ValueError(f"'{path}': config.json claims {name} {value}, more than the {held} values its "
                             "safetensors hold")
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"'{path}' holds a {config.model_type!r} model, which is not a causal language model "
                         "transformers knows") from None
    config._attn_implementation = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    try:
        with torch.device("meta"):
            skeleton = cls._from_config(config)
    except Exception as e:  # noqa: BLE001 - inconsistent sizes raise anything from ValueError to RuntimeError
        raise ValueError(f"cannot load the model in '{path}': {first_line(e)}") from None
    prefix = getattr(skeleton, "base_model_prefix", "")
    for name, p in skeleton.named_parameters():
        stored = next((shapes[k] for k in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}") if k in shapes),
                      None)
        if stored is not None and stored != tuple(p.shape):
            raise ValueError(f"'{path}': config.json's sizes ({_blame(config, set(p.shape) - set(stored), name)}) make {name} "
                             f"{tuple(p.shape)}, but its safetensors hold {stored}")
    # Values the files must hold (tied weights once); buffers besides (rotary tables...) are no larger than they.
    claimed = sum(p.numel() for p in {id(p): p for p in skeleton.parameters()}.values())
    claimed_dims = {d for p in skeleton.parameters() for d in p.shape}
    scratch = sum(b.numel() for b in skeleton.buffers())
    if claimed > held or scratch > held:
        absent = next((name for name, _ in skeleton.named_parameters()
                       if not {name, name.removeprefix(prefix + "."), f"{prefix}.{name}"} & shapes.keys()), None)
        if absent is not None:  # every weight found has its shape: the shortfall is a weight not there
            raise ValueError(f"'{path}' lacks the weight {absent}, which would be left randomly initialised; "
                             "save the whole model with save_pretrained")
        raise ValueError(f"'{path}': config.json's sizes ({_blame(config, claimed_dims - held_dims)}) claim "
                         f"{max(claimed, scratch)} values but its safetensors hold only {held}")
    return skeleton


def check_tokenizer_fits(path: Path, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding has rows (its last ids could not be
    embedded: an IndexError mid-run otherwise)."""
    try:
        rows = model.get_input_embeddings().weight.shape[0]
    except (AttributeError, NotImplementedError):
        rows = getattr(model.config.get_text_config(), "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        raise ValueError(f"'{path}': its tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                         f"{rows} rows; use the tokenizer the model was trained with")


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
