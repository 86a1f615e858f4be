"""Zero-padding a Llama model's widths to llama.cpp's blocks, keeping the function it computes.

llama.cpp's ternary types hold 256 weights per block with one scale, so every quantized row's input width must
be a multiple of 256; pretrained widths rarely are (SmolLM2-135M: hidden 576, 9 query heads of 64 over 3 KV
heads, intermediate 1536). `plan_padding` picks the smallest padded widths, `pad_state_dict` and `pad_codes`
write the model at them with zeros, `padded_config` its hyperparameters, and the padded model computes the same
logits:

* hidden H -> H': token embeddings, the LM head and every layer reading the residual stream get zero columns;
  o_proj and down_proj zero rows, so the residual stream stays exactly zero in the new dims.
* RMSNorm over H' sees x zero in the new dims, so mean(x^2) is H/H' times the real one: its weight becomes
  w * sqrt(H/H') (0 in the new dims) and its epsilon eps * H/H', and rsqrt(mean' + eps') * w' equals
  rsqrt(mean + eps) * w (up to float rounding of the two products).
* query heads n -> n' (n' * head_dim a multiple of the block): each of the n_kv KV groups gets the same number
  of zero heads after its real ones, so real head h keeps its KV head under llama.cpp's and Hugging Face's
  `kv = h // (n / n_kv)`; 9 heads over 3 KV heads become 12: group j holds real heads 3j..3j+2 at 4j..4j+2 and
  a zero head at 4j+3. A zero query attends uniformly and outputs the mean of its values, not zero, so o_proj's
  columns for it must be zero (its q_proj rows are zero too). k_proj and v_proj keep their rows.
* intermediate I -> I': gate_proj and up_proj zero rows, down_proj zero columns (silu(0) * 0 = 0).

Quantized layers are padded as their codes, with the zero level and the scales they were trained with: a
ternary scale (mean |W| of the row) computed again over a padded row would change. New rows get scale 0. The
2-bit grid (q + 1/2) s has no zero level, so its codes become 2q + 1 over the scale s / 2 (the same weights,
offset 0), which q4_0 holds exactly as before. Scale groups must still tile the padded row: the hidden and
intermediate padding is appended in whole groups; zero heads inside a group are refused.

Rows are padded in Hugging Face's head order; the export permutes q_proj and k_proj for rotary afterwards, with
the padded head count.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import numpy as np
import torch

from hybridopt.quant.quantizers import code_offset

# The widths each axis of a Llama weight runs over, by module name's last part: (rows, columns), or (width,)
# for a norm. "q": the query heads (n_head * head_dim); "vocab" and "kv" are never padded.
_AXES = {"embed_tokens": ("vocab", "hidden"), "lm_head": ("vocab", "hidden"),
         "q_proj": ("q", "hidden"), "k_proj": ("kv", "hidden"), "v_proj": ("kv", "hidden"), "o_proj": ("hidden", "q"),
         "gate_proj": ("ffn", "hidden"), "up_proj": ("ffn", "hidden"), "down_proj": ("hidden", "ffn"),
         "input_layernorm": ("hidden",), "post_attention_layernorm": ("hidden",), "norm": ("hidden",)}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class PadPlan:
    """A Llama model's widths and the padded ones (`*_to`), multiples of `multiple`; head_dim and the KV
    heads never change."""

    multiple: int
    hidden: int
    hidden_to: int
    heads: int
    heads_to: int
    kv_heads: int
    head_dim: int
    intermediate: int
    intermediate_to: int

    @property
    def needed(self) -> bool:
        return (self.hidden, self.heads, self.intermediate) != (self.hidden_to, self.heads_to, self.intermediate_to)

    def index(self, axis: str) -> np.ndarray | None:
        """Where each padded position of `axis` comes from: an old index, or -1 for a zero; None if unpadded."""
        if axis == "hidden" and self.hidden_to != self.hidden:
            return np.concatenate([np.arange(self.hidden), np.full(self.hidden_to - self.hidden, -1)])
        if axis == "ffn" and self.intermediate_to != self.intermediate:
            return np.concatenate([np.arange(self.intermediate), np.full(self.intermediate_to - self.intermediate, -1)])
        if axis == "q" and self.heads_to != self.heads:
            r, r_to = self.heads // self.kv_heads, self.heads_to // self.kv_heads  # query heads per KV head
            head = np.array([j * r + i if i < r else -1 for j in range(self.kv_heads) for i in range(r_to)])
            return np.where(head[:, None] < 0, -1, head[:, None] * self.head_dim + np.arange(self.head_dim)).reshape(-1)
        return None

    def describe(self) -> str:
        r, r_to = self.heads // self.kv_heads, self.heads_to // self.kv_heads
        heads = (f"query heads {self.heads} -> {self.heads_to} ({r_to - r} zero after every {r} real, "
                 f"{self.kv_heads} KV heads)" if r_to != r else f"query heads {self.heads}")
        width = lambda n, n_to: f"{n} -> {n_to}" if n_to != n else f"{n}"  # noqa: E731
        return (f"to multiples of {self.multiple}: hidden {width(self.hidden, self.hidden_to)}, {heads}, "
                f"intermediate {width(self.intermediate, self.intermediate_to)}")


def _kind(name: str) -> str:
    """`model.layers.0.self_attn.q_proj(.weight)` -> `q_proj`: which row of `_AXES` a tensor follows."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def plan_padding(config, multiple: int, codes: Mapping[str, NamedTuple]) -> PadPlan:
    """The smallest widths of `config`'s Llama model that are multiples of `multiple` (and of every scale
    group of `codes` reading them), with the same number of zero query heads added to each KV group.

    The query heads go from `n_kv * r` to `n_kv * r'`, the smallest `r' >= r` with `n_kv * r' * head_dim` a
    multiple of the block: SmolLM2-135M's 3 * 3 heads of 64 become 3 * 4 (768 wide) for 256.
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    assert heads % kv_heads == 0, "every KV head serves the same number of query heads"
    need = {"hidden": multiple, "q": multiple, "ffn": multiple}
    for name, c in codes.items():
        if c.scale.shape[1] > 1:  # a padded row must be whole groups
            axis = _AXES[_kind(name)][1]
            need[axis] = math.lcm(need[axis], c.q.shape[1] // c.scale.shape[1])
    r = heads // kv_heads
    step = need["q"] // math.gcd(need["q"], kv_heads * head_dim)  # r' a multiple of it makes the width whole
    return PadPlan(multiple, config.hidden_size, _round_up(config.hidden_size, need["hidden"]), heads,
                   kv_heads * _round_up(r, step), kv_heads, head_dim,
                   config.intermediate_size, _round_up(config.intermediate_size, need["ffn"]))


def padded_config(config, plan: PadPlan):
    """A copy of `config` at the padded widths: head_dim kept, epsilon times H/H' (see the module docstring)."""
    new = copy.deepcopy(config)
    new.hidden_size, new.intermediate_size = plan.hidden_to, plan.intermediate_to
    new.num_attention_heads, new.num_key_value_heads, new.head_dim = plan.heads_to, plan.kv_heads, plan.head_dim
    new.rms_norm_eps = config.rms_norm_eps * plan.hidden / plan.hidden_to
    return new


def _take(x: torch.Tensor, dim: int, src: np.ndarray | None, fill: float = 0.0) -> torch.Tensor:
    """`x` along `dim` at the positions `src` (a plan's `index`), `fill` where `src` is -1."""
    if src is None:
        return x
    pad = x.new_full((*x.shape[:dim], 1, *x.shape[dim + 1:]), fill)
    at = torch.as_tensor(np.where(src < 0, x.shape[dim], src), device=x.device)
    return torch.cat([x, pad], dim).index_select(dim, at)


def pad_state_dict(state: Mapping[str, torch.Tensor], plan: PadPlan) -> dict[str, torch.Tensor]:
    """Every tensor of a Llama state dict at the padded widths: zeros in the new rows and columns, RMSNorm
    weights times sqrt(H/H').

    Raises:
        ValueError: a tensor of no plain Llama model (a bias, say), which has no padding rule.
    """
    norm = math.sqrt(plan.hidden / plan.hidden_to)
    out = {}
    for key, t in state.items():
        if key.endswith("rotary_emb.inv_freq"):  # (head_dim / 2,): head_dim is kept
            out[key] = t
            continue
        axes = _AXES.get(_kind(key)) if key.endswith(".weight") else None
        if axes is None or len(axes) != t.ndim:
            raise ValueError(f"tensor {key!r} has no padding rule; padding writes plain Llama models only")
        if len(axes) == 1:
            t = (t.double() * norm).float()  # written as float32: no rounding to a bfloat16 model's dtype
        for dim, axis in enumerate(axes):
            t = _take(t, dim, plan.index(axis))
        out[key] = t
    return out


def _regroup(scale: torch.Tensor, in_f: int, cols: np.ndarray, name: str, plan: PadPlan) -> torch.Tensor:
    """Group scales `(out, G)` of a row of `in_f` inputs for the row padded by `cols`: the groups keep their
    width, a new group is a whole zero group (scale 0), and a group mixing two old scales is refused."""
    out_f, n_groups = scale.shape
    if n_groups == 1:  # one scale per row covers its zeros too
        return scale
    g = in_f // n_groups
    per_input = _take(scale.repeat_interleave(g, dim=1), 1, cols, fill=math.nan).reshape(out_f, -1, g)
    padded = per_input.isnan()
    lo = per_input.masked_fill(padded, math.inf).amin(-1)  # (out, G')
    hi = per_input.masked_fill(padded, -math.inf).amax(-1)
    if bool(((lo != hi) & padded.logical_not().any(-1)).any()):
        raise ValueError(f"padding cannot keep the {g}-wide scale groups of {name} whole, because the zero query "
                         f"heads ({plan.head_dim} wide) fall inside them; export without padding, or train with a "
                         f"--group_size that divides {plan.head_dim}")
    return torch.where(lo.isinf(), 0.0, lo)


def pad_codes(codes: Mapping[str, NamedTuple], plan: PadPlan) -> dict[str, NamedTuple]:
    """Quantized layers (`export.gguf.QuantizedLinear`, which imports this module) at the padded widths: the zero level in new rows and columns, the scales kept (new
    rows: 0), 2-bit codes re-expressed with a zero level (codes 2q + 1, scale s / 2, offset 0).

    Raises:
        ValueError: a layer's scale groups cannot tile its padded row (`_regroup`).
    """
    out = {}
    for name, c in codes.items():
        rows, cols = (plan.index(axis) for axis in _AXES[_kind(name)])
        q, scale, offset = c.q, c.scale.float(), c.offset
        if cols is not None and offset is None and code_offset(c.bits):
            q, scale, offset = 2 * q + 1, scale / 2, 0.0  # (q + 1/2) s == (2q + 1) (s / 2), and 0 is a level
        q, scale = _take(q, 0, rows), _take(scale, 0, rows)
        if cols is not None:
            q, scale = _take(q, 1, cols), _regroup(scale, c.q.shape[1], cols, name, plan)
        out[name] = c._replace(q=q, scale=scale, offset=offset)
    return out
