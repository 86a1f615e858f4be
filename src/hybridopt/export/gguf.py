"""GGUF in and out: a student for llama.cpp, and a GGUF file as a teacher.

Export (`export_gguf`) writes a Llama student with the `gguf` package's writer: architecture `llama`,
every hyperparameter, and our byte-level BPE tokenizer as llama.cpp reads it (`tokenizer.ggml.model`
"gpt2", pre-tokenizer "gpt-2"). Quantized linear layers are written as exactly the weights the QAT
model computes with, `(q + o) * s` (see `quantizers.py`), in the narrowest llama.cpp type that holds
them exactly, from the type asked for upwards (`auto`: from the narrowest):

    type    block  one block holds                      holds our ... exactly (d = our float16 scale s)
    Q1_0    128    d, 128 sign bits: +-d                1-bit (1.125 bits/weight)
    TQ1_0   256    d, 256 trits, 5 per byte: -d, 0, d   ternary and 1-bit (1.6875)
    TQ2_0   256    d, 256 2-bit codes: (c - 1) d        the same (2.0625), faster kernels
    Q4_0    32     d, 32 nibbles: (c - 8) d             4-bit; 2-bit with d = s / 2, codes 2q + 1 (4.5)
    Q8_0    32     d, 32 int8: c d                      8-bit and every narrower width (8.5)
    F16 / F32                                           what is left (F32 always)

The scale must be constant over a block, so TQ types need one scale per 256 inputs (per row, or
`--group_size` a multiple of 256) and row lengths that are multiples of 256 (`check_block_shapes`).
`gguf.quants`' TQ quantizers take each block's absmax as its scale, not our absmean one, so the blocks are
built here: the trits come from quantizing the integer levels (absmax 1, or 0 for an all-zero block) and
each block's `d` is then overwritten with our scale. Every encoded tensor is decoded again
(`gguf.quants.dequantize`; Q1_0, which the gguf package cannot decode, by `_dequantize_q1_0`, a port of
ggml's `dequantize_row_q1_0`) and compared with the model's weights with `==`.

q_proj and k_proj rows are permuted as llama.cpp's `convert_hf_to_gguf.py` does (Hugging Face's rotary
layout, two halves per head, to GGML's interleaved pairs); `transformers` undoes it on import.

Import (`load_gguf`) goes through `transformers`' GGUF support (dequantized weights, the tokenizer rebuilt
from the file), so a `.gguf` file can be a teacher. Running a GGUF needs llama-cpp-python (optional).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hybridopt.quant.bits import bits_name
from hybridopt.fileio import atomic_write
from hybridopt.export.packed import _unpack, read_packed
from hybridopt.quant.qat import qat_layers
from hybridopt.quant.quantizers import code_offset, quantize_weight

GGUF_TYPES = ("auto", "q1_0", "tq1_0", "tq2_0", "q8_0", "f16")  # what --type may ask for the linear layers
EMBED_TYPES = ("f16", "q8_0", "q4_0")  # token embeddings and an unquantized LM head
# Widening order: a layer a type cannot hold exactly tries the next one.
_LADDER = ("q1_0", "tq1_0", "tq2_0", "q4_0", "q8_0", "f16", "f32")
_BLOCK = {"q1_0": 128, "tq1_0": 256, "tq2_0": 256, "q4_0": 32, "q8_0": 32}
_Q1_0_BYTES = 2 + 128 // 8  # gguf knows Q1_0's id and size; its quants module cannot encode or decode it


def _qtype(kind: str) -> gguf.GGMLQuantizationType:
    return getattr(gguf.GGMLQuantizationType, kind.upper())


class QuantizedLinear(NamedTuple):
    """One quantized layer as the QAT model computes with it: weight `(q + code_offset(bits)) * scale`."""

    q: torch.Tensor  # (out, in) int8 codes
    scale: torch.Tensor  # (out, n_groups) float16-representable scales
    bits: float


def qat_codes(model: torch.nn.Module) -> dict[str, QuantizedLinear]:
    """The codes and scales of every `QATLinear` of `model`, by module name (what `export_packed` writes)."""
    out = {}
    for name, layer in qat_layers(model).items():
        q, scale = quantize_weight(layer.weight, layer.bits, layer.group_size)
        out[name] = QuantizedLinear(q.cpu(), scale.cpu(), layer.bits)
    return out


def packed_codes(path: str | Path) -> dict[str, QuantizedLinear]:
    """The codes and scales stored in a packed file (`model.packed.safetensors`), by module name."""
    metadata, tensors = read_packed(path)
    quant = json.loads(metadata["quant"])
    out = {}
    for key, info in quant.items():
        numel = info["shape"][0] * info["shape"][1]
        q = _unpack(tensors[f"{key}.packed"], info["packing"], numel).reshape(info["shape"])
        if info["packing"] == "int2":  # files from before the mid-rise 2-bit grid: plain codes
            raise ValueError(f"'{path}' holds 2-bit weights in the old 'int2' packing; export the run again")
        out[key.removesuffix(".weight")] = QuantizedLinear(q, tensors[f"{key}.scale"].float(), info["bits"])
    return out


# ----------------------------------------------------------------------------------------------- encoding
def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotary layout -> GGML's, per head: rows `[x0..x(d/2-1), y0..]` -> `[x0, y0, x1, y1, ...]`
    (`convert_hf_to_gguf.py`'s `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _block_scales(scale: np.ndarray, block: int) -> np.ndarray | None:
    """One scale per `block` consecutive weights of each row, or None if a block spans two scales."""
    blocks = scale.reshape(-1, block)
    return blocks[:, 0] if bool((blocks == blocks[:, :1]).all()) else None


def _f16_exact(d: np.ndarray) -> bool:
    return bool((d.astype(np.float16).astype(np.float32) == d).all())


def _encode(levels: np.ndarray, scale: np.ndarray, kind: str) -> np.ndarray | None:
    """`levels * scale` (both `(out, in)` float32) in `kind`, or None if `kind` cannot hold it exactly.

    Returns float16/float32 `(out, in)`, or uint8 `(out, bytes per row)` blocks for the quantized types
    (what `GGUFWriter.add_tensor(..., raw_dtype=...)` takes).
    """
    out_f, in_f = levels.shape
    if kind == "f32":
        return levels * scale
    if kind == "f16":
        w = levels * scale
        return w.astype(np.float16) if _f16_exact(w) else None
    block = _BLOCK[kind]
    if in_f % block:
        return None
    d = _block_scales(scale, block)
    if d is None:
        return None
    # Integer codes m with levels = m / k: k = 2 for the mid-rise 2-bit grid (levels +-1/2, +-3/2), else 1.
    k = 1.0 if bool((levels == np.round(levels)).all()) else 2.0
    m, d = levels * k, d / k
    allowed = {"q1_0": (-1.0, 1.0), "tq1_0": (-1.0, 0.0, 1.0), "tq2_0": (-1.0, 0.0, 1.0)}.get(kind)
    lo, hi = (-8, 7) if kind == "q4_0" else (-128, 127)
    if allowed is not None and not bool(np.isin(m, allowed).all()):
        return None
    if not bool((m == np.round(m)).all()) or m.min() < lo or m.max() > hi or not _f16_exact(d):
        return None
    head = d.astype(np.float16).view(np.uint8).reshape(-1, 2)  # every block's d, as ggml_half
    if kind == "q1_0":  # d, then bit j % 8 of byte j // 8 set for +d
        bits = np.packbits((m.reshape(-1, block) > 0).astype(np.uint8), axis=1, bitorder="little")
        return np.concatenate([head, bits], axis=1).reshape(out_f, -1)
    if kind.startswith("tq"):
        # Each block's absmax is 1 (or 0), so gguf.quants writes exactly these trits; d (the block's last
        # two bytes) is then replaced by ours.
        blocks = gguf.quants.quantize(m.astype(np.float32), _qtype(kind)).reshape(-1, gguf.GGML_QUANT_SIZES[_qtype(kind)][1])
        blocks[:, -2:] = head
        return blocks.reshape(out_f, -1)
    m = m.astype(np.int8).reshape(-1, block)
    if kind == "q8_0":  # d, then 32 int8
        return np.concatenate([head, m.view(np.uint8)], axis=1).reshape(out_f, -1)
    nib = (m + 8).astype(np.uint8)  # Q4_0: d, then byte j holds element j (low nibble) and j + 16 (high)
    return np.concatenate([head, nib[:, :16] | (nib[:, 16:] << 4)], axis=1).reshape(out_f, -1)


def _dequantize_q1_0(data: np.ndarray) -> np.ndarray:
    """Q1_0 blocks -> float32 values: ggml's `dequantize_row_q1_0` (`bit ? d : -d`)."""
    blocks = data.reshape(-1, _Q1_0_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    bits = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little").astype(np.float32)  # (n_blocks, 128)
    return np.where(bits > 0, d, -d).reshape(data.shape[0], -1)


def dequantize(data: np.ndarray, kind: str) -> np.ndarray:
    """What llama.cpp reads from a tensor of `kind` stored as `data`: float32 `(rows, row length)`."""
    if kind in ("f16", "f32"):
        return data.astype(np.float32)
    if kind == "q1_0":
        return _dequantize_q1_0(data)
    return gguf.quants.dequantize(data, _qtype(kind)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- metadata
def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"the model uses rope scaling {kind!r}; GGUF export writes plain rotary embeddings only")
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _add_hparams(w, config) -> None:
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("the model has attention or MLP biases; GGUF export writes bias-free Llama models only")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"the model's activation is {config.hidden_act!r}; llama.cpp's llama architecture uses silu")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _add_tokenizer(w, tokenizer: PreTrainedTokenizerBase, vocab_rows: int) -> None:
    """Our byte-level BPE as llama.cpp reads it: model "gpt2", pre-tokenizer "gpt-2", tokens, types, merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or spec.get("normalizer"):
        raise ValueError("GGUF export writes byte-level BPE tokenizers (GPT-2 style, as hybridopt trains) only; "
                         f"this one is {model.get('type')!r} with pre-tokenizer {pre.get('type')!r}")
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise ValueError("GGUF export needs the GPT-2 byte-level pre-tokenizer (regex split, no prefix space)")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_rows or max(vocab.values()) >= vocab_rows:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens but the model's embedding only {vocab_rows} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_rows)]  # rows no token uses (padding), as convert_hf_to_gguf names them
    types = [gguf.TokenType.UNUSED] * vocab_rows
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add, token_id in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                          (w.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(False)  # our tokenizer adds no special tokens: the model never saw a leading BOS
    w.add_add_eos_token(False)


# ----------------------------------------------------------------------------------------------- export
@dataclass
class GGUFReport:
    """What an export wrote: sizes, the type of every tensor, and what was widened."""

    path: str
    gguf_type: str
    embed_type: str
    file_bytes: int = 0
    parameters: int = 0
    linear_parameters: int = 0  # the transformer blocks' linear layers (and a quantized head)
    linear_bytes: int = 0
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> type
    layer_types: dict[str, int] = field(default_factory=dict)  # "ternary -> tq2_0" -> number of layers
    widened: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        """The whole file (header, tokenizer and norms included) over every parameter."""
        return 8 * self.file_bytes / self.parameters

    @property
    def linear_bits_per_weight(self) -> float:
        """The linear layers alone, block scales included."""
        return 8 * self.linear_bytes / max(self.linear_parameters, 1)

    def format(self) -> str:
        counts = Counter(self.tensor_types.values())
        lines = [f"Wrote {self.path} ({self.gguf_type}): {self.file_bytes / 2**20:.2f} MiB, "
                 f"{self.bits_per_weight:.2f} bits/weight over {self.parameters / 1e6:.2f}M parameters; linear layers "
                 f"{self.linear_bits_per_weight:.4f} bits/weight; embeddings and head {self.embed_type}",
                 "  layers: " + ", ".join(f"{k} x{n}" for k, n in self.layer_types.items()),
                 "  tensors: " + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items()))]
        return "\n".join(lines + [f"  widened: {w}" for w in self.widened] + [f"  note: {n}" for n in self.notes])


def export_gguf(model: torch.nn.Module, path: str | Path, tokenizer: PreTrainedTokenizerBase, gguf_type: str = "auto",
                embed_type: str | None = None, codes: dict[str, QuantizedLinear] | None = None,
                name: str = "hybridopt-student") -> GGUFReport:
    """Write a Llama `model` as a GGUF file for llama.cpp; return what was written.

    Args:
        model: a `LlamaForCausalLM`; its `QATLinear` layers (or `codes`) are written as exactly the
            quantized weights, its other linears at `gguf_type` (q8_0 with llama.cpp's own rounding, or f16).
        path: the `.gguf` file to write (atomically).
        tokenizer: the model's byte-level BPE tokenizer, embedded in the file.
        gguf_type: one of `GGUF_TYPES` for the quantized linears; a layer it cannot hold exactly is widened
            (and reported). `auto`: the narrowest exact type of each layer (f16 for unquantized ones).
        embed_type: f16, q8_0 or q4_0 for the token embeddings and an unquantized LM head
            (default: f16 with `gguf_type` f16, else q8_0).
        codes: quantized layers by module name (default: `qat_codes(model)`; `packed_codes` for a packed file).
        name: `general.name` in the file.

    Raises:
        ValueError: an unsupported model, tokenizer or type, or a row length or scale group the asked
            type's blocks do not divide (`check_block_shapes`).
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    embed_type = embed_type or ("f16" if gguf_type == "f16" else "q8_0")
    if embed_type not in EMBED_TYPES:
        raise ValueError(f"unknown embedding type {embed_type!r}; choose one of {', '.join(EMBED_TYPES)}")
    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"GGUF export writes Llama models; this one is {config.model_type!r}")
    codes = qat_codes(model) if codes is None else codes
    check_block_shapes({n: (c.q.shape[1], c.q.shape[1] // c.scale.shape[1]) for n, c in codes.items()}, gguf_type)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != head_name} | set(codes)
    tied = getattr(config, "tie_word_embeddings", False) and head_name not in codes

    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(name)
    writer.add_quantized_by("hybridopt")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, config)
    _add_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = GGUFReport(str(path), gguf_type, embed_type, parameters=parameters)
    layer_types: Counter = Counter()
    for key, tensor in model.state_dict().items():
        module = key.removesuffix(".weight")
        if key.endswith("rotary_emb.inv_freq") or (tied and module == head_name):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"tensor {key!r} has no llama.cpp name; GGUF export writes plain Llama models only")
        n_head = heads if module.endswith("q_proj") else kv_heads if module.endswith("k_proj") else None
        if module in codes:
            kind, data = _quantized_tensor(codes[module], gguf_type, n_head)
            layer_types[(bits_name(codes[module].bits), kind)] += 1
        else:
            kind, data = _float_tensor(tensor, module, gguf_type if module in linears else embed_type, n_head)
            if module in linears:
                layer_types[("full precision", kind)] += 1
        # Quantized data is uint8 (rows, bytes per row); the writer derives the logical shape from the type.
        writer.add_tensor(gguf_name, data, raw_dtype=None if kind in ("f16", "f32") else _qtype(kind))
        report.tensor_types[gguf_name] = kind
        if module in linears:
            report.linear_parameters += tensor.numel()
            report.linear_bytes += data.nbytes
    main_type = max(Counter({k: n for (_, k), n in layer_types.items()}).items(), key=lambda kv: kv[1], default=("f16", 0))[0]
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if main_type == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{main_type.upper()}"))
    report.layer_types = {f"{b} -> {k}": n for (b, k), n in sorted(layer_types.items())}
    if gguf_type != "auto":
        report.widened = [f"{n} {b} layer(s) to {k}: {gguf_type} cannot hold them exactly"
                          for (b, k), n in sorted(layer_types.items()) if k != gguf_type and b != "full precision"]
    if gguf_type.startswith("tq") and any(c.bits == 1.0 for c in codes.values()):
        report.notes.append(f"1-bit layers are {gguf_type} codes +-1 (exact); --type q1_0 holds them in 1.125 "
                            "bits/weight but needs a llama.cpp that knows Q1_0")

    def write(tmp: Path) -> None:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(Path(path), write)
    report.file_bytes = Path(path).stat().st_size
    return report


def check_block_shapes(shapes: dict[str, tuple[int, int]], gguf_type: str) -> None:
    """The asked type's blocks must tile every quantized layer: row lengths and scale groups multiples of
    the block (256 for tq1_0/tq2_0, 128 for q1_0). Nothing is checked for the other types, which widen.

    Args:
        shapes: `{layer name: (input width, inputs per scale)}` of the quantized layers.
        gguf_type: the type asked for.

    Raises:
        ValueError: one sentence naming the layer and the flag to change.
    """
    block = _BLOCK.get(gguf_type) if gguf_type in ("q1_0", "tq1_0", "tq2_0") else None
    for name, (in_f, group) in shapes.items() if block else ():
        if in_f % block:
            raise ValueError(f"{gguf_type} needs input widths that are multiples of {block}, but {name} has "
                             f"{in_f}; give the student --student_hidden and --student_intermediate multiples of "
                             f"{block}, or export to q8_0")
        if group % block:
            raise ValueError(f"{gguf_type} holds one scale per {block} weights, but {name} has one per {group} "
                             f"(--group_size {group}); train with --group_size a multiple of {block} (or none), "
                             "or export to q8_0")


def _quantized_tensor(c: QuantizedLinear, gguf_type: str, n_head: int | None) -> tuple[str, np.ndarray]:
    """The narrowest type from `gguf_type` up that holds the layer exactly, and its data."""
    in_f = c.q.shape[1]
    levels = c.q.float().numpy() + np.float32(code_offset(c.bits))
    scale = np.repeat(c.scale.float().numpy(), in_f // c.scale.shape[1], axis=1)
    if n_head is not None:
        levels, scale = _permute_rows(levels, n_head), _permute_rows(scale, n_head)
    target = levels * scale  # (q + o) * s in float32: `dequantize_weight`'s value, bit for bit
    for kind in _LADDER[0 if gguf_type == "auto" else _LADDER.index(gguf_type):]:
        data = _encode(levels, scale, kind)
        if data is not None:
            assert np.array_equal(dequantize(data, kind), target), f"the {kind} encoding is not exact"
            return kind, data
    raise AssertionError("f32 holds every weight")


def _float_tensor(tensor: torch.Tensor, module: str, kind: str, n_head: int | None) -> tuple[str, np.ndarray]:
    """An unquantized tensor: norms f32; linears and embeddings at `kind` (f16, or llama.cpp's own q8_0/q4_0)."""
    w = tensor.detach().float().cpu().numpy()
    if n_head is not None:
        w = _permute_rows(w, n_head)
    if w.ndim == 1:
        return "f32", w
    if kind == "auto":
        kind = "f16"
    if kind not in ("f16", "q8_0", "q4_0"):
        raise ValueError(f"{module} is not quantized, and {kind} holds quantized weights only; quantize the "
                         "model first (hybridopt.quant.qat.quantize_, or --bits)")
    if kind != "f16" and w.shape[-1] % _BLOCK[kind]:
        kind = "f16"  # q8_0 / q4_0 need whole 32-blocks per row
    return kind, w.astype(np.float16) if kind == "f16" else gguf.quants.quantize(w, _qtype(kind))


# ----------------------------------------------------------------------------------------------- import
def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def written_by_hybridopt(path: str | Path) -> bool:
    """Whether `path` is a GGUF file this tool wrote (`general.quantized_by` is "hybridopt"): the only kind an
    export may replace."""
    if not is_gguf_file(path):
        return False
    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.quantized_by")
        return field is not None and bytes(field.parts[-1]).decode() == "hybridopt"
    except Exception:  # noqa: BLE001 - a damaged file raises anything; it is then not ours to replace
        return False


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: a `.gguf` file, or a folder (without config.json) holding exactly one.

    Returns None when `path` is not a GGUF model (a Hugging Face folder, say).

    Raises:
        ValueError: the folder holds several `.gguf` files.
    """
    path = Path(path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"'{path}' holds {len(found)} .gguf files ({', '.join(p.name for p in found[:3])}); "
                         "pass the file itself")
    return found[0] if found else None


def check_gguf(path: Path) -> str:
    """The architecture of a GGUF file that `transformers` can load and dequantize; ValueError otherwise."""
    try:
        reader = gguf.GGUFReader(str(path))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises anything from struct to KeyError
        raise ValueError(f"'{path}' is not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # those two are key groups
    if arch not in supported:
        raise ValueError(f"'{path}' holds a {arch!r} model, which transformers cannot load from GGUF; "
                         f"supported: {', '.join(supported)}")
    readable = {"F32", "F16", "BF16"} | {t.name for t in gguf.quants._type_traits}  # noqa: SLF001
    bad = sorted({t.tensor_type.name for t in reader.tensors} - readable)
    if bad:
        raise ValueError(f"'{path}' holds tensors of type {', '.join(bad)}, which the gguf package cannot "
                         "dequantize; convert it to another type (llama-quantize) first")
    return arch


def load_gguf(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a GGUF file (or a folder holding one), dequantized to float32,
    frozen and in eval mode: what `modeling.load_teacher` returns for a Hugging Face folder.

    Raises:
        ValueError: no GGUF there, or one of an architecture or tensor type transformers cannot load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = find_gguf(path)
    if file is None:
        raise ValueError(f"'{path}' is not a .gguf file nor a folder holding one")
    check_gguf(file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True,
                                                  trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32,
                                                     local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for files it cannot convert
        raise ValueError(f"cannot load the GGUF model '{file}': {str(e).splitlines()[0]}") from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- llama.cpp
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
