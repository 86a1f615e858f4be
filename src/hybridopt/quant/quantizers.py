"""Weight and activation quantizers: pure functions, per output channel or per group of inputs.

For a weight `W` of shape `(out, in)`, split each row into groups of `g` inputs (one group per row
when `group_size` is None) and compute one scale `s` per group:

* 1-bit (BinaryConnect / XNOR-Net scaling):   s = mean|W|,  q = sign(W) in {-1, +1}
* 1.58-bit ternary (BitNet b1.58 absmean):     s = mean|W|,  q = clip(round(W / (s + eps)), -1, 1)
* 2-bit, four symmetric levels (q + 1/2) s:    s = max|W| / 2,  q = clip(round(W / s - 1/2), -2, 1)
* b-bit symmetric uniform, b in {4, 8}:        s = max|W| / (2^(b-1) - 1),
                                               q = clip(round(W / s), -2^(b-1), 2^(b-1) - 1)

and `Q(W) = (q + o) * s`, with the code offset `o` 1/2 for 2 bits and 0 otherwise. Four levels centred
on a zero code cannot be symmetric (codes -2..1 times s leave the positive side one level short and
bias every row negative), so 2-bit uses the mid-rise grid -3s/2, -s/2, s/2, 3s/2, i.e. an affine
code as in llama.cpp's Q2_K (what each width costs on the default student: docs/RESULTS.md).

Scales are rounded to float16 before use, because the export stores them in float16: the quantized
model seen in training is bit-for-bit the one that is exported.

Training uses the straight-through estimator (Bengio et al. 2013): the forward pass sees `Q(W)`,
the backward pass treats `Q` as the identity, so the latent full-precision weights get the gradient
of the quantized forward. Activations can be quantized to 8 bits per token with absmax scaling,
as in BitNet (Wang et al. 2023; Ma et al. 2024, "The Era of 1-bit LLMs").
"""

from __future__ import annotations

import torch

from hybridopt.quant.bits import TERNARY, canonical_bits

_EPS = 1e-5
_FP16_TINY = 2.0**-14  # smallest normal float16: scales below it would flush towards zero


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`(out, in)` -> `(out, n_groups, g)`."""
    out_f, in_f = w.shape
    g = group_size or in_f
    if in_f % g:
        raise ValueError(f"group size {g} does not divide the input width {in_f}")
    return w.reshape(out_f, in_f // g, g)


def quantize_weight(w: torch.Tensor, bits: float, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and float16-representable scales of a 2-D weight.

    Args:
        w: `(out, in)` weight.
        bits: 1, 1.58 (ternary), 2, 4 or 8.
        group_size: inputs per scale; None for one scale per output channel.

    Returns:
        `(q, scale)`: `q` is int8 `(out, in)`; `scale` is float32 `(out, n_groups)` holding float16 values.
    """
    bits = canonical_bits(bits)
    wg = _grouped(w.detach().float(), group_size)  # (out, G, g)
    absw = wg.abs()
    if bits in (1.0, TERNARY):
        scale = absw.mean(-1, keepdim=True)
    elif bits == 2.0:
        scale = absw.amax(-1, keepdim=True) / 2
    else:
        scale = absw.amax(-1, keepdim=True) / (2 ** (int(bits) - 1) - 1)
    scale = scale.clamp_min(_FP16_TINY).half().float()  # (out, G, 1), exactly representable in float16
    if bits == 1.0:
        q = torch.where(wg >= 0, 1.0, -1.0)
    elif bits == TERNARY:
        q = (wg / (scale + _EPS)).round().clamp(-1, 1)
    elif bits == 2.0:
        q = (wg / scale - 0.5).round().clamp(-2, 1)
    else:
        qmax = 2 ** (int(bits) - 1) - 1
        q = (wg / scale).round().clamp(-qmax - 1, qmax)
    return q.to(torch.int8).reshape(w.shape), scale.squeeze(-1)


def code_offset(bits: float) -> float:
    """What is added to the integer codes of a `bits`-bit weight before scaling: 1/2 for 2 bits, else 0."""
    return 0.5 if canonical_bits(bits) == 2.0 else 0.0


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """`(q + offset) * scale`, broadcasting one scale over each group: `(out, in)` float32."""
    out_f, in_f = q.shape
    n_groups = scale.shape[1]
    codes = q.float().reshape(out_f, n_groups, in_f // n_groups) + offset
    return (codes * scale.float().unsqueeze(-1)).reshape(out_f, in_f)


def quantize_dequantize(w: torch.Tensor, bits: float, group_size: int | None = None) -> torch.Tensor:
    """`Q(W)`: the weights the quantized layer computes with, `(out, in)` float32, no gradient."""
    q, scale = quantize_weight(w, bits, group_size)
    return dequantize_weight(q, scale, code_offset(bits))


def fake_quantize_weight(w: torch.Tensor, bits: float, group_size: int | None = None) -> torch.Tensor:
    """`Q(W)` in the forward pass, identity gradient in the backward pass (STE)."""
    wq = quantize_dequantize(w, bits, group_size).to(w.dtype)
    return w + (wq - w).detach()


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token absmax quantization of `(..., features)` activations to `bits` bits, with STE."""
    qmax = 2 ** (bits - 1) - 1
    scale = qmax / x.detach().abs().amax(-1, keepdim=True).clamp_min(_EPS)
    xq = (x.detach() * scale).round().clamp(-qmax - 1, qmax) / scale
    return x + (xq - x).detach()


def relative_error(w: torch.Tensor, bits: float, group_size: int | None = None) -> float:
    """`||W - Q(W)||_F / ||W||_F`: the weight-level quantization error of one layer."""
    w_float = w.detach().float()
    return float((w_float - quantize_dequantize(w, bits, group_size)).norm() / w_float.norm().clamp_min(1e-12))
