r"""The trust region: norms and dot products in a safe dtype, the clip factor of a step, and the design
document's adaptation of the radius from actual against predicted decrease.

A step u is scaled by f = \min(1, \rho \max(\|\theta\|_2, 10^{-3}) / \|u\|_2) over all parameters at once.
The floor lets parameters at zero move. Everything here returns tensors without a host sync.

The radius adaptation (`adapt_radius`) smooths r_t = (L_{t-1} - L_t) / (-g_{t-1} \cdot \Delta\theta_{t-1})
as \bar r_t = 0.9 \bar r_{t-1} + 0.1 r_t and grows \rho by 1.5 (up to 1) when \bar r_t > 0.75, shrinks it by
0.7 (down to 10^{-4}) when \bar r_t < 0.25, both only after a clipped step. On minibatches the actual decrease
is mostly batch-to-batch noise, which is why the optimizer leaves it off by default.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = ()

MIN_RADIUS, MAX_RADIUS = 1e-4, 1.0
MIN_NORM = 1e-3  # floor of the reference norm, so parameters at zero can still move

Tensors = list[torch.Tensor]


def global_value(t: torch.Tensor) -> torch.Tensor:
    """A sum over the parameters as a plain tensor. Under FSDP2 the parameters are DTensors sharded over the
    processes, and a norm or dot product over them is a DTensor of per-shard parts: its full value (one
    all-reduce) is the sum over the whole parameters, the same on every process, so every process takes the
    same decisions. Any other tensor is returned as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def reduction_dtype(tensors: Tensors) -> torch.dtype:
    """float64 when any tensor is, else float32: sums of squares and dot products in half precision overflow."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def norms(tensors: Tensors) -> torch.Tensor:
    """Per-tensor 2-norms, shape `(n,)`, in float32 at least (half precision overflows when squared)."""
    dtype = reduction_dtype(tensors)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))


def ratio_of_norms(radius: float | torch.Tensor, param_norm: torch.Tensor, update_norm: torch.Tensor) -> torch.Tensor:
    """radius max(\\|theta\\|, 1e-3) / \\|u\\| from the two norms (1 when u = 0), a 0-d tensor."""
    limit = radius * param_norm.clamp_min(MIN_NORM)
    return torch.where(update_norm > 0, limit / update_norm.clamp_min(1e-30), torch.ones_like(limit))


def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """\\sum_i a_i \\cdot b_i in float32 at least, a 0-d tensor."""
    dtype = reduction_dtype(a)
    return torch.stack([torch.vdot(x.flatten().to(dtype), y.flatten().to(dtype)) for x, y in zip(a, b)]).sum()


def decrease_ratio_ema(ratio_ema: float | None, prev_loss: float, loss: float, predicted: float) -> float:
    """EMA (0.9) of the ratio of actual to predicted decrease, started at the first ratio."""
    ratio = (prev_loss - loss) / predicted
    return ratio if ratio_ema is None else 0.9 * ratio_ema + 0.1 * ratio


def adapted_radius(radius: float, ratio_ema: float, clipped: bool) -> float:
    """The design document's rule, applied only after a clipped step (the ratio of an unclipped step on
    noisy minibatches says more about the batch than about the radius)."""
    if clipped and ratio_ema > 0.75:
        return min(MAX_RADIUS, radius * 1.5)
    if clipped and ratio_ema < 0.25:
        return max(MIN_RADIUS, radius * 0.7)
    return radius


def shrunk_radius(radius: float) -> float:
    """The radius after a non-finite loss or gradient (with `adapt_radius`): the update that led there went
    too far, so it is halved (`adapted_radius` grows it back by 1.5 per good clipped step)."""
    return max(MIN_RADIUS, radius * 0.5)
