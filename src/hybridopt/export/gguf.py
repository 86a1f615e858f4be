"""GGUF out: a Llama student as a file llama.cpp runs.

`export_gguf` writes it with the `gguf` package's writer: architecture `llama`, every hyperparameter, and our
byte-level BPE tokenizer as llama.cpp reads it (`tokenizer.ggml.model` "gpt2", pre-tokenizer "gpt-2").
Quantized linear layers are written as exactly the weights the QAT model computes with, `(q + o) * s` (see
`quantizers.py`), in the narrowest llama.cpp type that holds them exactly, from the type asked for upwards
(`auto`: from the narrowest). The types, their blocks and what each holds exactly are in `gguf_codecs.py`,
which encodes and decodes them; every encoded tensor is decoded again and compared with the model's weights
with `==`.

The scale must be constant over a block, so TQ types need one scale per 256 inputs (per row, or
`--group_size` a multiple of 256) and row lengths that are multiples of 256 (`check_block_shapes`). A model
whose widths are not (SmolLM2-135M: 576) is written with `pad=True` as the same function at widths padded with
zeros (`padding.py`), at the cost of the zeros' bytes.

q_proj and k_proj rows are permuted as llama.cpp's `convert_hf_to_gguf.py` does (Hugging Face's rotary
layout, two halves per head, to GGML's interleaved pairs); `transformers` undoes it on import.

GGUF in (a `.gguf` file as a teacher) is `gguf_read.py`; running one with llama.cpp, `llama_cpp.py`.
"""

from __future__ import annotations

import errno
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hybridopt.errors import UserError
from hybridopt.quant.bits import bits_name
from hybridopt.fileio import atomic_write
from hybridopt.export.gguf_codecs import BLOCK, LADDER, dequantize, encode, qtype
from hybridopt.export.packed import _unpack, read_packed
from hybridopt.export.padding import PadPlan, pad_codes, pad_state_dict, padded_config, plan_padding
from hybridopt.quant.qat import qat_layers
from hybridopt.quant.quantizers import code_offset, quantize_weight

GGUF_TYPES = ("auto", "q1_0", "tq1_0", "tq2_0", "q8_0", "f16")  # what --type may ask for the linear layers
EMBED_TYPES = ("f16", "q8_0", "q4_0")  # token embeddings and an unquantized LM head
PAD_TO = 256  # what pad=True pads widths to: TQ1_0/TQ2_0's block, which every smaller block (q1_0, q8_0) divides


class QuantizedLinear(NamedTuple):
    """One quantized layer as the QAT model computes with it: weight `(q + offset) * scale`."""

    q: torch.Tensor  # (out, in) int8 codes
    scale: torch.Tensor  # (out, n_groups) float16-representable scales
    bits: float
    offset: float | None = None  # None: `code_offset(bits)`; padded 2-bit codes have 0 (see padding.py)


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
        scale = tensors[f"{key}.scale"].float()
        if not bool(torch.isfinite(scale).all()):  # the checksum passed: written so, by a diverged run
            raise ValueError(f"'{path}' holds scales that are not finite (NaN or infinity) in tensor '{key}.scale'; "
                             "its model diverged: export a run whose weights are finite")
        out[key.removesuffix(".weight")] = QuantizedLinear(q, scale, info["bits"])
    return out


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
                name: str = "hybridopt-student", pad: bool | int = False) -> GGUFReport:
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
        pad: write the model with its hidden size, query heads and intermediate size padded with zeros to
            multiples of `PAD_TO` (True) or of this width, as the same function (`padding.py`), so a model whose
            widths the blocks do not divide can be written at tq1_0/tq2_0; nothing changes where none is needed.
            The report keeps the real parameter counts and says what was padded and what it costs.

    Raises:
        ValueError: an unsupported model, tokenizer or type, or a row length or scale group the asked
            type's blocks do not divide (`check_block_shapes`), also after padding.
        UserError: a quantized layer's scales are not finite, or the file cannot be written (a full disk);
            whatever was at `path` is left as it was.
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
    for module, c in codes.items():  # a NaN scale cannot be encoded exactly in any type
        if not bool(torch.isfinite(c.scale).all()):
            raise UserError(f"the scales of layer '{module}' are not finite (NaN or infinity), so it has no GGUF "
                            "encoding; its model diverged: export a run whose weights are finite")
    real = state = model.state_dict()
    plan = _pad_plan(config, codes, pad)
    if plan is not None:
        state, codes, config = pad_state_dict(state, plan), pad_codes(codes, plan), padded_config(config, plan)
    check_block_shapes({n: (c.q.shape[1], c.q.shape[1] // c.scale.shape[1]) for n, c in codes.items()}, gguf_type)
    layout = _layout(model, config, codes)
    writer = _new_writer(config, tokenizer, name, model.get_input_embeddings().weight.shape[0])
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = GGUFReport(str(path), gguf_type, embed_type, parameters=parameters)
    layer_types, nbytes = _add_tensors(writer, state, codes, layout, gguf_type, embed_type, report)
    _summarize(writer, report, layer_types, codes, gguf_type)
    if plan is not None:
        _note_padding(report, plan, real, state, nbytes, layout.linears)
    _write_file(writer, Path(path))
    report.file_bytes = Path(path).stat().st_size
    return report


class _Layout(NamedTuple):
    """Where the model's tensors go: the head counts to permute q_proj/k_proj by, llama.cpp's tensor names,
    the LM head's module name, the linear layers (a quantized head included), and whether the head is tied."""

    heads: int
    kv_heads: int
    names: gguf.TensorNameMap
    head_name: str
    linears: set[str]
    tied: bool


def _layout(model: torch.nn.Module, config, codes: dict[str, QuantizedLinear]) -> _Layout:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != head_name} | set(codes)
    tied = getattr(config, "tie_word_embeddings", False) and head_name not in codes
    return _Layout(heads, kv_heads, names, head_name, linears, tied)


def _new_writer(config, tokenizer: PreTrainedTokenizerBase, name: str, vocab_rows: int) -> gguf.GGUFWriter:
    """A writer holding the file's metadata: name, quantizer, hyperparameters and tokenizer."""
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(name)
    writer.add_quantized_by("hybridopt")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, config)
    _add_tokenizer(writer, tokenizer, vocab_rows)
    return writer


def _add_tensors(writer: gguf.GGUFWriter, state: dict[str, torch.Tensor], codes: dict[str, QuantizedLinear],
                 layout: _Layout, gguf_type: str, embed_type: str,
                 report: GGUFReport) -> tuple[Counter, dict[str, int]]:
    """Every tensor of the model's `state` dict in its type, each counted into `report`; returns how many
    linear layers went to each type, `{(bits name or "full precision", type): layers}`, and each written
    tensor's bytes by state dict key."""
    heads, kv_heads, names, head_name, linears, tied = layout
    layer_types: Counter = Counter()
    nbytes = {}
    for key, tensor in state.items():
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
        writer.add_tensor(gguf_name, data, raw_dtype=None if kind in ("f16", "f32") else qtype(kind))
        report.tensor_types[gguf_name] = kind
        nbytes[key] = data.nbytes
        if module in linears:
            report.linear_parameters += tensor.numel()
            report.linear_bytes += data.nbytes
    return layer_types, nbytes


def _summarize(writer: gguf.GGUFWriter, report: GGUFReport, layer_types: Counter, codes: dict[str, QuantizedLinear],
               gguf_type: str) -> None:
    """The file type (the linear layers' most common type), and the report's layer counts, widenings and notes."""
    main_type = max(Counter({k: n for (_, k), n in layer_types.items()}).items(), key=lambda kv: kv[1], default=("f16", 0))[0]
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if main_type == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{main_type.upper()}"))
    report.layer_types = {f"{b} -> {k}": n for (b, k), n in sorted(layer_types.items())}
    if gguf_type != "auto":
        report.widened = [f"{n} {b} layer(s) to {k}: {gguf_type} cannot hold them exactly"
                          for (b, k), n in sorted(layer_types.items()) if k != gguf_type and b != "full precision"]
    if gguf_type.startswith("tq") and any(c.bits == 1.0 for c in codes.values()):
        report.notes.append(f"1-bit layers are {gguf_type} codes +-1 (exact); --type q1_0 holds them in 1.125 "
                            "bits/weight but needs a llama.cpp that knows Q1_0")


def _pad_plan(config, codes: dict[str, QuantizedLinear], pad: bool | int) -> PadPlan | None:
    """The padding `pad` asks for (True: to multiples of `PAD_TO`), or None where none is asked or needed."""
    if pad is False:
        return None
    if pad is not True and (not isinstance(pad, int) or pad < 1):
        raise ValueError(f"pad must be True, False or a positive width to pad to multiples of, got {pad!r}")
    plan = plan_padding(config, PAD_TO if pad is True else pad, codes)
    return plan if plan.needed else None


def _note_padding(report: GGUFReport, plan: PadPlan, real: dict[str, torch.Tensor], padded: dict[str, torch.Tensor],
                  nbytes: dict[str, int], linears: set[str]) -> None:
    """Put the real model's linear parameter count back into `report` (its bits per weight are then per real
    weight), and note what was padded and what the zeros cost: each tensor's bytes times its share of zeros."""
    stored = report.linear_parameters
    report.linear_parameters = sum(t.numel() for k, t in real.items() if k.removesuffix(".weight") in linears)
    zeros = sum(n * (1 - real[k].numel() / padded[k].numel()) for k, n in nbytes.items())
    report.notes.append(f"padded with zeros (the same function) {plan.describe()}; the zeros cost "
                        f"{zeros / 2**20:.2f} MiB of the file, the linear layers store "
                        f"{stored / report.linear_parameters:.2f}x their real weights: "
                        f"{report.linear_bits_per_weight:.4f} bits per real weight, "
                        f"{8 * report.linear_bytes / stored:.4f} per stored one")


def _write_file(writer: gguf.GGUFWriter, path: Path) -> None:
    """Header, metadata and tensors to `path`, atomically: a failed write (a full disk) leaves what was at `path`
    as it was, and says so in one sentence naming the file."""

    def write(tmp: Path) -> None:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    try:
        atomic_write(path, write)
    except OSError as e:
        # numpy's short write says only "17408 requested and 3712 written", with no errno and no file name.
        detail = e.strerror or str(e)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"cannot write the GGUF file '{path}' ({detail}); write it to a folder you can write "
                            "to") from None
        raise UserError(f"cannot write the GGUF file '{path}' ({detail}); the disk may be full: free some space "
                        "or write it to another disk (nothing was changed at that path)") from None


def check_block_shapes(shapes: dict[str, tuple[int, int]], gguf_type: str) -> None:
    """The asked type's blocks must tile every quantized layer: row lengths and scale groups multiples of
    the block (256 for tq1_0/tq2_0, 128 for q1_0). Nothing is checked for the other types, which widen.

    Args:
        shapes: `{layer name: (input width, inputs per scale)}` of the quantized layers.
        gguf_type: the type asked for.

    Raises:
        ValueError: one sentence naming the layer and the flag to change.
    """
    block = BLOCK.get(gguf_type) if gguf_type in ("q1_0", "tq1_0", "tq2_0") else None
    for name, (in_f, group) in shapes.items() if block else ():
        if in_f % block:
            raise ValueError(f"{gguf_type} needs input widths that are multiples of {block}, but {name} has "
                             f"{in_f}; give the student --student_hidden and --student_intermediate multiples of "
                             f"{block}, or export to q8_0")
        if group % block:
            raise ValueError(f"{gguf_type} holds one scale per {block} weights, but {name} has one per {group} "
                             f"(--group_size {group}); train with --group_size a multiple of {block} (or none), "
                             "or export to q8_0")


# ----------------------------------------------------------------------------------------------- tensors
def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotary layout -> GGML's, per head: rows `[x0..x(d/2-1), y0..]` -> `[x0, y0, x1, y1, ...]`
    (`convert_hf_to_gguf.py`'s `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantized_tensor(c: QuantizedLinear, gguf_type: str, n_head: int | None) -> tuple[str, np.ndarray]:
    """The narrowest type from `gguf_type` up that holds the layer exactly, and its data."""
    in_f = c.q.shape[1]
    levels = c.q.float().numpy() + np.float32(code_offset(c.bits) if c.offset is None else c.offset)
    scale = np.repeat(c.scale.float().numpy(), in_f // c.scale.shape[1], axis=1)
    if n_head is not None:
        levels, scale = _permute_rows(levels, n_head), _permute_rows(scale, n_head)
    target = levels * scale  # (q + o) * s in float32: `dequantize_weight`'s value, bit for bit
    for kind in LADDER[0 if gguf_type == "auto" else LADDER.index(gguf_type):]:
        data = encode(levels, scale, kind)
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
    if kind != "f16" and w.shape[-1] % BLOCK[kind]:
        kind = "f16"  # q8_0 / q4_0 need whole 32-blocks per row
    return kind, w.astype(np.float16) if kind == "f16" else gguf.quants.quantize(w, qtype(kind))
