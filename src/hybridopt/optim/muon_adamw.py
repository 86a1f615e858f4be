r"""`MuonAdamW`: Muon on the hidden matrices and AdamW on everything else, as one torch optimizer.

torch.optim.Muon takes matrices only, so its users keep two optimizers, and `hybrid(...)` over each learns two
scales. This is the step of `HybridOptimizer(base="muon")` with its learned scale, controller and trust region
off, as a plain torch optimizer for `hybrid(MuonAdamW(...))` to wrap with one scale (a test holds the two
equal). Per tensor with gradient g_t, rate \eta and decoupled weight decay \lambda:

    \theta \leftarrow \theta (1 - \eta \lambda) - \eta d_t

with d_t Muon's orthogonalised Nesterov momentum at an Adam step's RMS (`muon.py`) on the 2-D tensors of groups
that keep `orthogonalize` (the default), and Adam's \hat m_t / (\sqrt{\hat v_t} + \epsilon) on the rest.
"""

from __future__ import annotations

import math

import torch

from hybridopt.optim.muon import muon_updates_
from hybridopt.optim.trust_region import DTensor

Tensors = list[torch.Tensor]


def adam_updates_(out: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, steps: list[int],
                  betas: tuple[float, float], eps: float, scale: float) -> Tensors:
    """out = scale \\hat m / (\\sqrt{\\hat v} + eps) per tensor at its `steps` (1-based); updates the moments in place.

    Written into `out` with no temporary: with b_k = 1 - \\beta_k^n, \\hat m / (\\sqrt{\\hat v} + eps) equals
    (\\sqrt{b_2} / b_1) m / (\\sqrt v + eps \\sqrt{b_2}).
    """
    beta1, beta2 = betas
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    for o, m, v, n in zip(out, exp_avgs, exp_avg_sqs, steps):
        bias1, bias2_sqrt = 1 - beta1 ** n, math.sqrt(1 - beta2 ** n)
        torch.sqrt(v, out=o)
        o.add_(eps * bias2_sqrt)
        torch.div(m, o, out=o)
        o.mul_(scale * bias2_sqrt / bias1)
    return out



class MuonAdamW(torch.optim.Optimizer):
    """Muon on the matrices of groups that keep `"orthogonalize": True` (the default), AdamW on every other tensor.

    Embeddings and the output head should take AdamW's step, as Muon's authors advise:
    `hybridopt.models.modeling.param_groups(model, weight_decay, muon=True)` gives them groups with
    `"orthogonalize": False`.

    Args:
        params: parameters or param groups.
        lr: the rate of both steps (Muon's is at the RMS of an Adam step, so one rate suits both).
        betas: AdamW's betas.
        eps: AdamW's epsilon.
        weight_decay: decoupled weight decay, on both.
        momentum: the momentum of Muon's Nesterov buffer (torch.optim.Muon's 0.95).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      orthogonalize=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            orthogonal = [p.dim() == 2 and group["orthogonalize"] for p in params]
            if any(o and isinstance(p, DTensor) for p, o in zip(params, orthogonal)):
                raise ValueError("Muon is not supported over sharded parameters (FSDP2): it orthogonalises whole "
                                 "matrices and each process holds a slice of each; use base='adam' or "
                                 "'schedulefree' (--hybrid_base adam or schedulefree)")
            muon = [p for p, o in zip(params, orthogonal) if o]
            rest = [p for p, o in zip(params, orthogonal) if not o]
            for p, o in zip(params, orthogonal):
                st = self.state[p]
                if not st:
                    st["step"], st["exp_avg"] = 0, torch.zeros_like(p)  # Muon's momentum, or Adam's first moment
                    if not o:
                        st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
            updates = [torch.empty_like(p) for p in params]  # -lr d, for this step only
            by_tensor = dict(zip(params, updates))
            if muon:
                muon_updates_([by_tensor[p] for p in muon], [p.grad for p in muon],
                              [self.state[p]["exp_avg"] for p in muon], group["momentum"], -group["lr"])
            if rest:
                adam_updates_([by_tensor[p] for p in rest], [p.grad for p in rest],
                              [self.state[p]["exp_avg"] for p in rest], [self.state[p]["exp_avg_sq"] for p in rest],
                              [self.state[p]["step"] for p in rest], group["betas"], group["eps"], -group["lr"])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates)
        return loss
