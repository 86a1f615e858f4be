"""Students that start from their teacher: the teacher's own architecture and weights, optionally depth-pruned.

A pretrained teacher is made low-bit by copying it into a `LlamaForCausalLM` (the class every export path and the
QAT swap know) and training that copy, quantized, against the frozen full-precision original. Depth pruning keeps
`n` of its `L` decoder layers, renumbered in order; embeddings, final norm and head stay the teacher's (tied or not):

* `even`: layers `round(i * (L - 1) / (n - 1))` for `i = 0..n-1`, first and last always kept (n >= 2).
* `measured`: ShortGPT's block influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
  Redundant Than You Expect"): `BI_l = 1 - E_tokens[cos(h_l, h_{l+1})]`, the mean over calibration tokens of one
  minus the cosine between a layer's input and output hidden states. A layer that barely turns the residual
  stream matters least; the `n` layers of highest influence are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

# Teacher architectures whose weights a LlamaForCausalLM holds unchanged (the names of every tensor agree).
SUPPORTED = ("llama", "mistral")
LAYER_CHOICES = ("even", "measured")


def check_supported(teacher: torch.nn.Module) -> None:
    """Refuse a teacher the Llama student class cannot hold exactly, in one sentence naming what is supported.

    Raises:
        ValueError: another architecture, or a Mistral with sliding-window attention (a Llama attends to the
            whole context).
    """
    config = teacher.config
    kind = config.model_type
    if kind not in SUPPORTED:
        raise ValueError(f"a student can start from Llama-family teachers only ({', '.join(SUPPORTED)}: SmolLM, "
                         f"TinyLlama, Mistral-style); this teacher is a {kind!r} model")
    if kind == "mistral" and getattr(config, "sliding_window", None):
        raise ValueError("this Mistral teacher uses sliding-window attention, which a Llama student cannot hold; "
                         "a student can start from it only with sliding_window null in its config")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("this teacher's linear layers have biases, which hybridopt's quantized exports do not "
                         "hold; a student can start from bias-free Llama-family teachers only")


def even_layers(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, evenly spaced, the first and the last included."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


@torch.no_grad()
def block_influence(teacher: torch.nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """ShortGPT's block influence of each decoder layer, `1 - mean cos(h_in, h_out)` over every token of
    `batches` (`(B, T)` token ids each)."""
    sums: torch.Tensor | None = None
    tokens = 0
    captured: list[torch.Tensor] = []
    # transformers' last hidden state is after the final norm: the last layer's raw output is the norm's input.
    handle = teacher.get_decoder().norm.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        for input_ids in batches:
            hidden = teacher(input_ids=input_ids, output_hidden_states=True).hidden_states  # L + 1 of (B, T, H)
            states = [*hidden[:-1], captured.pop()]  # each layer's input, then the last one's output
            cos = torch.stack([torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).sum()
                               for a, b in zip(states[:-1], states[1:])])  # (L,)
            sums = cos if sums is None else sums + cos
            tokens += input_ids.numel()
    finally:
        handle.remove()
    assert sums is not None, "no calibration batches"
    return (1.0 - sums / tokens).tolist()


def measured_layers(teacher: torch.nn.Module, keep: int, batches: Sequence[torch.Tensor]) -> tuple[list[int], list[float]]:
    """The `keep` layers of highest block influence on `batches`, in order, and every layer's influence."""
    influence = block_influence(teacher, batches)
    if not 1 <= keep <= len(influence):
        raise ValueError(f"cannot keep {keep} of {len(influence)} layers")
    kept = sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:keep])
    return kept, influence


def llama_config(teacher_config: PretrainedConfig, layers: int) -> LlamaConfig:
    """The Llama config of a student started from a teacher of `teacher_config`, keeping `layers` of its layers."""
    keys = LlamaConfig().to_dict().keys()
    values = {k: v for k, v in teacher_config.to_dict().items()
              if k in keys and k not in ("architectures", "dtype", "_name_or_path")}
    config = LlamaConfig(**{**values, "num_hidden_layers": layers})
    config._attn_implementation = teacher_config._attn_implementation  # a built-in one (see load_teacher)
    return config


def student_from_teacher(teacher: torch.nn.Module, layers: Sequence[int] | None = None) -> LlamaForCausalLM:
    """A float32 `LlamaForCausalLM` holding the teacher's weights, with only `layers` (in order) of its decoder
    layers (default: all), trainable, in train mode, on the teacher's device.

    Raises:
        ValueError: an unsupported teacher (`check_supported`), or layer indices out of range or repeated.
    """
    check_supported(teacher)
    total = teacher.config.num_hidden_layers
    layers = list(range(total)) if layers is None else list(layers)
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= total:
        raise ValueError(f"layers to keep must be distinct, increasing indices in [0, {total}), got {layers}")
    config = llama_config(teacher.config, len(layers))
    renumber = {f"layers.{old}.": f"layers.{new}." for new, old in enumerate(layers)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if ".layers." in name:
            index = name.split(".layers.")[1].split(".")[0]
            prefix = f"layers.{index}."
            if prefix not in renumber:
                continue
            name = name.replace(prefix, renumber[prefix], 1)
        state[name] = tensor.detach().float().clone()
    device = next(teacher.parameters()).device
    with torch.random.fork_rng(devices=[]):  # the initial values are all overwritten: leave the seed's stream alone
        student = LlamaForCausalLM(config)
    student.load_state_dict(state, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:  # a tied teacher's state dict may or may not list the head
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    return student.to(device).train().requires_grad_(True)
