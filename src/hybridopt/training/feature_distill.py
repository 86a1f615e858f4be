"""Distillation of a model's insides: hidden states and attention relations, for a student that starts from its
teacher (every student layer has a teacher layer it came from, of the same width and heads).

* Hidden states: for each student layer `i` and the teacher layer `m(i)` it was copied from, one minus the cosine
  between their outputs, averaged over tokens and layers:

      L_hidden = mean_i mean_tokens (1 - cos(h^S_i, h^T_{m(i)}))

  The cosine ignores the residual stream's scale, which grows with depth and is dominated by a few huge
  dimensions in pretrained models (a mean squared error would fit those alone).

* Attention relations (MiniLMv2, Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation";
  BitDistill's stage 3, Wu et al. 2025): at one layer, for each of the query, key and value projections `X`, split
  into its heads, the relation `R = softmax(X_h X_h^T / sqrt(d_h))` over the positions each token may attend to
  (causal), and the KL divergence from the teacher's relations to the student's, averaged over heads and tokens
  and summed over Q, K and V:

      L_attn = sum_{X in Q,K,V} mean_{h, t} KL(R^T_{X,h,t} || R^S_{X,h,t})
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def hidden_cosine_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """`L_hidden` between paired layer outputs, each `(B, T, H)`."""
    assert len(student) == len(teacher) and student, (len(student), len(teacher))
    terms = [(1.0 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean() for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, heads: int) -> torch.Tensor:
    """The mean over heads and tokens of `KL(R^T || R^S)` for one projection's outputs, each `(B, T, heads * d)`."""
    B, T, width = student.shape
    d = width // heads

    def log_relations(x: torch.Tensor) -> torch.Tensor:  # (B, T, heads * d) -> (B, heads, T, T)
        x = x.float().reshape(B, T, heads, d).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / math.sqrt(d)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return F.log_softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)

    log_s, log_t = log_relations(student), log_relations(teacher.detach())
    p_t = log_t.exp()
    # Masked entries have p_t = 0 and log -inf: count them as 0, not 0 * (-inf - -inf) = NaN.
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(-1)  # (B, heads, T)
    return kl.mean()


class FeatureDistill:
    """Captures what `hidden_cosine_loss` and `relation_kl` need, with forward hooks on a student that starts from
    `teacher` and on the teacher, and computes the weighted sum of the two losses after both forward passes.

    Args:
        student, teacher: Llama-family models of equal width and heads.
        layer_map: the teacher layer each student layer came from (`layer_map[i]` for student layer `i`).
        hidden_weight: weight of `L_hidden` (0: not computed).
        attn_weight: weight of `L_attn` (0: not computed).
        attn_layer: the student layer whose relations are distilled (default: its last, as BitDistill's
            single-layer choice), matched to its teacher layer.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, layer_map: Sequence[int],
                 hidden_weight: float = 0.0, attn_weight: float = 0.0, attn_layer: int | None = None):
        self.layer_map, self.hidden_weight, self.attn_weight = list(layer_map), hidden_weight, attn_weight
        s_layers, t_layers = student.get_decoder().layers, teacher.get_decoder().layers
        assert len(s_layers) == len(self.layer_map), (len(s_layers), len(self.layer_map))
        self.heads = student.config.num_attention_heads
        self.kv_heads = getattr(student.config, "num_key_value_heads", None) or self.heads
        self.captured: dict[str, torch.Tensor] = {}
        self._handles = []
        if hidden_weight:
            for i, t in enumerate(self.layer_map):
                self._hook(s_layers[i], f"s.hidden.{i}")
                self._hook(t_layers[t], f"t.hidden.{i}")
        if attn_weight:
            i = len(s_layers) - 1 if attn_layer is None else attn_layer
            for side, layer in (("s", s_layers[i]), ("t", t_layers[self.layer_map[i]])):
                for proj in ("q_proj", "k_proj", "v_proj"):
                    self._hook(getattr(layer.self_attn, proj), f"{side}.{proj}")

    def _hook(self, module: torch.nn.Module, key: str) -> None:
        def save(m, args, out):
            self.captured[key] = out[0] if isinstance(out, tuple) else out

        self._handles.append(module.register_forward_hook(save))

    def loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted feature loss of the last student and teacher forward passes, and its detached parts."""
        c, parts, total = self.captured, {}, 0.0
        if self.hidden_weight:
            n = len(self.layer_map)
            h = hidden_cosine_loss([c[f"s.hidden.{i}"] for i in range(n)], [c[f"t.hidden.{i}"] for i in range(n)])
            total, parts["hidden"] = total + self.hidden_weight * h, h.detach()
        if self.attn_weight:
            a = sum(relation_kl(c[f"s.{p}"], c[f"t.{p}"], self.heads if p == "q_proj" else self.kv_heads)
                    for p in ("q_proj", "k_proj", "v_proj"))
            total, parts["attn"] = total + self.attn_weight * a, a.detach()
        self.captured.clear()  # no activations kept past the step
        return total, parts

    def remove(self) -> None:
        """Take the hooks off both models."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
