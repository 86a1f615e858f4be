r"""Muon's direction (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"): the
Nesterov momentum of a matrix's gradient, orthogonalised by a quintic Newton-Schulz iteration, at the size of an
Adam step.

For an A x B matrix with gradient g_t and momentum buffer b_t = b_{t-1} + (1 - \nu)(g_t - b_{t-1}):

    d_t = 0.2 \sqrt{\max(A, B)} O(g_t + \nu (b_t - g_t))

with O the iteration below. This is torch.optim.Muon's step with `adjust_lr_fn="match_rms_adamw"` (RMS 0.2,
as an Adam step's), so a learning rate that suits Adam suits it.
"""

from __future__ import annotations

import math

import torch

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic Newton-Schulz iteration (Keller Jordan's)
MUON_STEPS = 5

Tensors = list[torch.Tensor]


def orthogonalized(x: torch.Tensor, coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
                   steps: int = MUON_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Muon's orthogonalisation of a matrix: `steps` quintic Newton-Schulz iterations X <- aX + b(XX^T)X +
    c(XX^T)^2 X from X = x / \\|x\\|_F, on the wide orientation (torch.optim.Muon's iteration, which gives U S' V^T
    with S' roughly in [0.5, 1.5] rather than U V^T). In float32 at least, where torch's runs in bfloat16: CPUs
    without bfloat16 matrix units have no fast path for it (`hybridopt.bench.arms.Float32Muon` swaps it in)."""
    a, b, c = coefficients
    tall = x.size(0) > x.size(1)
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    if tall:
        y = y.T
    y = y / y.norm().clamp(min=eps)
    for _ in range(steps):
        gram = y @ y.T
        y = torch.addmm(y, torch.addmm(gram, gram, gram, beta=b, alpha=c), y, beta=a)
    return (y.T if tall else y).to(x.dtype)


def muon_updates_(out: Tensors, grads: Tensors, buffers: Tensors, momentum: float, scale: float) -> Tensors:
    """out = scale 0.2 \\sqrt{\\max(A, B)} O(g + momentum (b - g)) per A x B matrix with the momentum buffers
    b = lerp(b, g, 1 - momentum) (updated in place): Muon's Nesterov direction, orthogonalised, at
    torch.optim.Muon's `match_rms_adamw` size (RMS 0.2, as an Adam step's), so a rate that suits Adam suits it."""
    torch._foreach_lerp_(buffers, grads, 1 - momentum)
    for o, g, b in zip(out, grads, buffers):
        o.copy_(orthogonalized(torch.lerp(g, b, momentum)))
        o.mul_(scale * 0.2 * math.sqrt(max(o.shape)))
    return out
