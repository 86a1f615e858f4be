"""The packed export format: one safetensors file, truly packed low-bit weights, no pickle.

`<dir>/model.packed.safetensors` holds, for every quantized linear `name`:

    name.weight.packed   uint8 (ceil(n / 5) bytes for ternary, ceil(n * bits / 8) otherwise)
    name.weight.scale    float16 (out, n_groups)

and every other tensor (embeddings, norms, LM head unless quantized) in `float16` (or float32).
The safetensors `__metadata__` header carries:

    format          "hybridopt-packed"
    format_version  "2" ("1": files whose checksum covers the tensors only; still read, with a warning)
    config          the Hugging Face model config (JSON)
    quant           {"name.weight": {"bits", "shape", "group_size", "packing", "act_bits"}} (JSON);
                    packing is "ternary5", "sign1", "int2mid" (2-bit codes -2..1 meaning (q + 1/2) * scale),
                    "int4" or "int8" (q * scale)
    sha256          digest of every other metadata entry and every tensor's bytes, in key order, so a
                    changed header (a different rope_theta, say) is refused like a flipped data byte
    precision_plan  (mixed precision only) the sensitivity-clustered plan the widths came from (JSON)

`config.json` and the tokenizer are written beside it so `hybridopt generate` needs nothing else.

The file is untrusted input: `load_packed` checks the checksum, then every header field against its schema
(`_config_problem`, `_quant_problem`), then that every weight the config implies is in the data with its shape,
dtype and packed length, and only then allocates the model. Only `model_type` "llama" is read, and only the
fields a Llama config has reach transformers (`auto_map` and `attn_implementation` never do).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerBase
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hybridopt.fileio import WRITE_ERRORS, atomic_save, read_safetensors_header, write_failure
from hybridopt.errors import UserError, first_line
from hybridopt.quant.packing import (pack_sign, pack_signed, pack_ternary, packed_nbytes, unpack_sign, unpack_signed,
                               unpack_ternary)
from hybridopt.quant.qat import ActQuantLinear, qat_layers
from hybridopt.quant.bits import TERNARY, canonical_bits
from hybridopt.quant.quantizers import code_offset, dequantize_weight, quantize_weight

PACKED_NAME = "model.packed.safetensors"
FORMAT = "hybridopt-packed"
FORMAT_VERSION = "2"
_READ_VERSIONS = ("1", FORMAT_VERSION)


def _pack(q: torch.Tensor, bits: float) -> tuple[torch.Tensor, str]:
    if bits == TERNARY:
        return pack_ternary(q), "ternary5"
    if bits == 1.0:
        return pack_sign(q), "sign1"
    if bits == 2.0:
        return pack_signed(q, 2), "int2mid"  # codes -2..1 stand for the levels -1.5..1.5 (code_offset)
    return pack_signed(q, int(bits)), f"int{int(bits)}"


def _unpack(packed: torch.Tensor, packing: str, numel: int) -> torch.Tensor:
    if packing == "ternary5":
        return unpack_ternary(packed, numel)
    if packing == "sign1":
        return unpack_sign(packed, numel)
    if packing in ("int2", "int2mid", "int4", "int8"):
        return unpack_signed(packed, int(packing[3]), numel)
    raise ValueError(f"unknown packing {packing!r}")


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 of the metadata (all but the digest itself) and the tensors; version 1 files hashed the tensors only."""
    h = hashlib.sha256()
    if metadata is not None:
        h.update(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_packed(model: torch.nn.Module, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                  dtype: torch.dtype = torch.float16, plan=None) -> Path:
    """Write `model` (with `QATLinear` layers) as a packed safetensors file; return its path.

    `plan` (a `PrecisionPlan`), when the widths came from one, is stored in the metadata for `inspect`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = qat_layers(model)
    assert layers, "export_packed needs a model with QATLinear layers (see hybridopt.quant.qat.quantize_)"
    tensors: dict[str, torch.Tensor] = {}
    quant: dict[str, dict] = {}
    for name, layer in layers.items():
        q, scale = quantize_weight(layer.weight, layer.bits, layer.group_size)
        packed, packing = _pack(q.cpu(), layer.bits)
        key = f"{name}.weight"
        tensors[f"{key}.packed"] = packed
        tensors[f"{key}.scale"] = scale.half().cpu()
        quant[key] = {"bits": layer.bits, "shape": list(q.shape), "group_size": layer.group_size,
                      "packing": packing, "act_bits": layer.act_bits}
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    head_key = next((n + ".weight" for n, m in model.named_modules() if m is head), None)
    for key, t in model.state_dict().items():
        if key in quant or (tied and key == head_key and key not in quant):
            continue
        t = t.detach().cpu()
        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json_string(),
                "quant": json.dumps(quant), "dtype": str(dtype).removeprefix("torch.")}
    if plan is not None:
        metadata["precision_plan"] = plan.to_json()
    metadata["sha256"] = _digest(tensors, metadata)
    path = out_dir / PACKED_NAME

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PACKED_NAME), metadata=metadata)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    try:
        atomic_save(out_dir, write)  # a full disk leaves an earlier export whole
    except WRITE_ERRORS as e:  # safetensors reports a failed write as SafetensorError
        raise UserError(write_failure(f"cannot write the packed export '{path}'", path, first_line(e),
                                      "Nothing in its folder was replaced; free some space and run the command "
                                      "again", e, "Nothing in its folder was replaced; fix that and run the "
                                      "command again")) from None
    return path


def read_packed(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a packed file, verified (checksum, then every header field against the data);
    `UserError` if truncated, corrupted, edited, foreign or malformed."""
    metadata, tensors, _, _ = _read(path)
    return metadata, tensors


def _read(path: str | Path):
    path = Path(path)
    if path.is_dir():
        path = path / PACKED_NAME
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; export a model first (hybridopt distill --ternary --qat)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            version = _checked_format(metadata, path)  # before any tensor is read: a foreign file costs nothing
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"'{path}' is truncated or corrupted ({first_line(e)}); export it again") from None
    if _digest(tensors, metadata if version == FORMAT_VERSION else None) != metadata.get("sha256"):
        raise UserError(f"'{path}' is corrupted or was edited (its checksum does not match); export it again")
    if version != FORMAT_VERSION:
        print(f"warning: '{path}' is packed format {version}, whose checksum does not cover its header; "
              "export it again to protect that too", file=sys.stderr)
    config, quant = _checked_header(metadata, tensors, path)
    return metadata, tensors, config, quant


def _checked_format(metadata: dict[str, str], path: Path) -> str:
    """The file's packed format version, if it is a hybridopt packed file this version reads."""
    if metadata.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a hybridopt packed model (no '{FORMAT}' header)")
    version = metadata.get("format_version")
    if version not in _READ_VERSIONS:
        newer = isinstance(version, str) and version.isdigit() and int(version) > int(FORMAT_VERSION)
        raise UserError(f"'{path}' has format version {version}; this hybridopt reads {', '.join(_READ_VERSIONS)}"
                        + ("; it was written by a newer hybridopt: upgrade this one to read it" if newer else ""))
    return version


_MAX_DIM = 1 << 24
_PACKINGS = {"ternary5": TERNARY, "sign1": 1.0, "int2": 2.0, "int2mid": 2.0, "int4": 4.0, "int8": 8.0}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# The config fields a packed file may set. Anything else is dropped before the config is built: `auto_map`
# and `attn_implementation` can name code or kernels on the Hub, and nothing a header says may reach those.
_CONFIG_FIELDS = frozenset(LlamaConfig().to_dict()) - {"_name_or_path", "architectures", "model_type"} | {
    "rope_theta", "rope_scaling", "torch_dtype"}  # the last three: files written by older transformers


def _config_problem(c: dict) -> str | None:
    """What is wrong with a packed file's Llama config (parsed JSON), checked field by field; None if nothing."""
    def number(v):
        return type(v) in (int, float) and math.isfinite(v)

    def token_id(v):
        return v is None or (type(v) is int and v >= 0) or (type(v) is list and all(type(x) is int and x >= 0 for x in v))

    if c.get("model_type") != "llama":
        return f"model_type {c.get('model_type')!r}; only 'llama' is read"
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")
    for name in (*required, "num_key_value_heads", "head_dim", "pretraining_tp"):
        v = c.get(name)
        if (v is not None or name in required) and (type(v) is not int or not 1 <= v <= _MAX_DIM):
            return f"config field {name} must be an integer in [1, {_MAX_DIM}], got {v!r}"
    for name in ("rms_norm_eps", "rope_theta"):
        v = c.get(name)
        if v is not None and not (number(v) and v > 0):
            return f"config field {name} must be a positive number, got {v!r}"
    for name in ("attention_dropout", "initializer_range"):
        if c.get(name) is not None and not (number(c[name]) and c[name] >= 0):
            return f"config field {name} must be a number >= 0, got {c[name]!r}"
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_cache"):
        if c.get(name) is not None and type(c[name]) is not bool:
            return f"config field {name} must be true or false, got {c[name]!r}"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if not token_id(c.get(name)):
            return f"config field {name} must be a token id, got {c[name]!r}"
    if not isinstance(c.get("hidden_act", "silu"), str) or c.get("hidden_act", "silu") not in ACT2FN:
        return f"config field hidden_act names no activation function: {c['hidden_act']!r}"
    for name in ("rope_parameters", "rope_scaling"):
        rope = c.get(name)
        if rope is None:
            continue
        if (not isinstance(rope, dict) or rope.get("rope_type", "default") not in ("default", *ROPE_INIT_FUNCTIONS)
                or not all(v is None or number(v) or type(v) in (str, bool) or (type(v) is list and all(map(number, v)))
                           for v in rope.values())
                or ("rope_theta" in rope and not (number(rope["rope_theta"]) and rope["rope_theta"] > 0))):
            return f"config field {name} is not a rope setting Llama knows: {str(rope)[:80]}"
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if (c.get("head_dim") is None and c["hidden_size"] % heads) or heads % kv:
        return "the attention heads do not divide the hidden size (or the key/value heads the heads)"
    return None


def _checked_header(metadata: dict[str, str], tensors: dict[str, torch.Tensor], path: Path):
    """The model config and per-tensor quantization of a packed file, every header field checked against its
    schema and every weight the config implies found in the data with its shape, dtype and packed length, before
    any model is allocated: what `load_packed` allocates is bounded by what the file holds.

    Only Llama models are accepted (what hybridopt exports); nothing from the file can name code to run."""
    def bad(why: str) -> UserError:
        return UserError(f"'{path}' is not a valid packed model: {why}")

    try:
        config_dict, quant = json.loads(metadata["config"]), json.loads(metadata["quant"])
    except (KeyError, TypeError, ValueError):
        raise bad("its header lacks a readable 'config' or 'quant' entry") from None
    if not isinstance(config_dict, dict) or not isinstance(quant, dict):
        raise bad("'config' and 'quant' must be JSON objects")
    problem = _config_problem(config_dict)
    if problem:
        raise bad(problem)
    # Building even a shapes-only model costs time per layer: the layer count must be what the file holds.
    layers = {int(m.group(1)) for k in (*tensors, *quant) if (m := _LAYER.match(k))}
    if len(layers) != config_dict["num_hidden_layers"] or max(layers, default=-1) != len(layers) - 1:
        raise bad(f"config field num_hidden_layers is {config_dict['num_hidden_layers']}, "
                  f"but the file holds {len(layers)} layers")
    try:
        config = AutoConfig.for_model("llama", **{k: v for k, v in config_dict.items() if k in _CONFIG_FIELDS})
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = AutoModelForCausalLM.from_config(config)
        expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        head = next((n + ".weight" for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for configs it cannot build; nothing is allocated yet
        raise bad(f"its config is not a Llama config ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    for key in quant:
        if key not in expected:
            raise bad(f"quantization entry {key!r} names no weight of the model")
    for key in tensors:
        name = key.removesuffix(".packed").removesuffix(".scale")
        if name not in expected or (name != key) != (name in quant):
            raise bad(f"tensor {key!r} does not match the config")
    for key, shape in expected.items():
        if key in quant:
            why = _quant_problem(quant[key], shape, tensors.get(f"{key}.packed"), tensors.get(f"{key}.scale"))
            if why:
                raise bad(f"quantization entry {key!r} {why}")
        elif key in tensors:
            if tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
                raise bad(f"tensor {key!r} does not match the config")
        elif not (key == head and config.tie_word_embeddings):
            raise bad(f"tensor {key!r} is missing")
    return config, quant


def _quant_problem(info, shape: tuple[int, ...], packed: torch.Tensor | None, scale: torch.Tensor | None) -> str | None:
    """What is wrong with one quantization entry of a packed file and its two tensors; None if nothing."""
    if (not isinstance(info, dict) or not isinstance(info.get("packing"), str) or info["packing"] not in _PACKINGS
            or not isinstance(info.get("shape"), list)
            or [type(d) for d in info["shape"]] != [int, int] or tuple(info["shape"]) != shape):
        return "is malformed or does not match the config"
    try:
        bits = canonical_bits(info.get("bits"))
    except (TypeError, ValueError):
        return f"has bit width {info.get('bits')!r}"
    if bits != _PACKINGS[info["packing"]]:
        return f"has bit width {bits:g} but packing {info['packing']!r}"
    group = info.get("group_size")
    if group is not None and (type(group) is not int or group < 1 or shape[1] % group):
        return f"has group size {group!r}, which does not divide its {shape[1]} columns"
    if info.get("act_bits") not in (None, 8):
        return f"has activation bits {info.get('act_bits')!r} (8 or none)"
    if packed is None or scale is None:
        return "lacks its .packed or .scale tensor"
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(math.prod(shape), bits):
        return "has a packed tensor of the wrong type or length"
    if not scale.is_floating_point() or tuple(scale.shape) != (shape[0], shape[1] // group if group else 1):
        return "has a scale tensor of the wrong type or shape"
    return None


def load_packed(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a working Hugging Face model from a packed file, weights dequantized."""
    metadata, tensors, config, quant = _read(path)
    model = AutoModelForCausalLM.from_config(config)  # shapes checked against the data: bounded by the file
    state = {}
    for key, info in quant.items():
        try:
            q = _unpack(tensors[f"{key}.packed"], info["packing"], math.prod(info["shape"])).reshape(info["shape"])
            # "int2mid" codes sit half a step off zero; files from before it ("int2") decode as plain codes.
            offset = code_offset(info["bits"]) if info["packing"] == "int2mid" else 0.0
            state[key] = dequantize_weight(q, tensors[f"{key}.scale"], offset)
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"'{path}' is corrupted: tensor {key} cannot be unpacked ({e})") from None
    for key, t in tensors.items():
        if not key.endswith((".packed", ".scale")):
            state[key] = t.float()
    result = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k.startswith("lm_head"))]
    if missing or result.unexpected_keys:
        raise UserError(f"'{path}' does not match its config: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    if tied:
        model.tie_weights()
    for key, info in quant.items():
        if info.get("act_bits"):
            name = key.removesuffix(".weight")
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            new = ActQuantLinear(old.in_features, old.out_features, old.bias is not None, act_bits=info["act_bits"])
            new.weight, new.bias = old.weight, old.bias
            setattr(parent, child, new)
    return model.to(device).eval()


def safetensors_tensor_bytes(path: str | Path) -> dict[str, int]:
    """Bytes each tensor occupies in a safetensors file, read from its header."""
    header, _ = read_safetensors_header(Path(path))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
