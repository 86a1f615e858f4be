r"""The base step: u = scale d for Adam, Schedule-Free AdamW, SGD momentum and Muon (whose direction is in
`muon.py`), decoupled weight decay, Schedule-Free's averaging and two sequences, and the compiled whole step
`fused_step_`.

The first functions work on lists of tensors with `torch._foreach_*` kernels and write u into a persistent `out`
buffer per tensor, with no parameter-sized temporary per step. The global trust-region factor f is applied with
the step (\theta += f u) rather than multiplied into u, so the buffers still hold u for the next hypergradient
(h = f g \cdot u). The last ones apply them over `HybridOptimizer`'s param groups and per-tensor state
(`self.state[p]`: `exp_avg` or `z`, `exp_avg_sq`, `step`, `update`), as torch's functional optimizers do.
Memory: Adam's two moments (Schedule-Free: z and the second moment) plus the `update` buffer per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hybridopt.optim.muon import muon_updates_
from hybridopt.optim.trust_region import ratio_of_norms, reduction_dtype

Tensors = list[torch.Tensor]
Pairs = list[tuple[torch.Tensor, dict]]  # (tensor, its param group) for each tensor with a gradient


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


def schedulefree_updates_(out: Tensors, grads: Tensors, exp_avg_sqs: Tensors, steps: list[int], beta2: float,
                          eps: float, scale: float) -> Tensors:
    """out = scale g / (\\sqrt{\\hat v} + eps) per tensor (Schedule-Free AdamW's direction: no first moment);
    updates the second moments in place. Written into `out` with no temporary, as `adam_updates_`."""
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    for o, g, v, n in zip(out, grads, exp_avg_sqs, steps):
        bias2_sqrt = math.sqrt(1 - beta2 ** n)
        torch.sqrt(v, out=o)
        o.add_(eps * bias2_sqrt)
        torch.div(g, o, out=o)
        o.mul_(scale * bias2_sqrt)
    return out


def momentum_updates_(out: Tensors, grads: Tensors, buffers: Tensors, beta1: float, scale: float) -> Tensors:
    """out = scale b with the heavy-ball buffers b = beta1 b + g (updated in place)."""
    torch._foreach_mul_(buffers, beta1)
    torch._foreach_add_(buffers, grads)
    for o, b in zip(out, buffers):
        torch.mul(b, scale, out=o)
    return out


def averaging_weight(weight_sum: float, lr_max: float, lr: float) -> tuple[float, float, float]:
    """Schedule-Free's averaging: (c, weight_sum, lr_max) after a step at rate `lr`, where the new point
    z enters the average x with weight c = w / \\sum w, w = lr_max^2 (lr_max: the largest rate so far)."""
    lr_max = max(lr_max, lr)
    weight_sum += lr_max ** 2
    return lr_max ** 2 / weight_sum, weight_sum, lr_max


def apply_updates_(params: Tensors, updates: Tensors, factor: torch.Tensor | None) -> None:
    """theta += f u per tensor (u as is when `factor` is None: no trust region, or per tensor and applied)."""
    if factor is None:
        torch._foreach_add_(params, updates)
    else:
        for p, u in zip(params, updates):
            p.addcmul_(u, factor)


def schedulefree_step_(params: Tensors, zs: Tensors, updates: Tensors, c: float, beta1: float,
                       factor: torch.Tensor | None) -> None:
    """Schedule-Free's two sequences, in place: y <- y + c (z - y) + (1 - beta1 (1 - c)) f u, then z <- z + f u.

    `params` hold y; c is the averaging weight of this step (`averaging_weight`); `factor` f as in `apply_updates_`.
    """
    torch._foreach_lerp_(params, zs, c)
    weight = 1 - beta1 * (1 - c)
    if factor is None:
        torch._foreach_add_(params, updates, alpha=weight)
        torch._foreach_add_(zs, updates)
    else:  # \Delta = f u applied with the update (no pass to scale u; f stays pending for h)
        for p, z, u in zip(params, zs, updates):
            p.addcmul_(u, factor * weight)
            z.addcmul_(u, factor)


def fused_coefficients(steps: list[int], base: str, betas: tuple[float, float], eps: float, rate: float,
                       weight_decay: float, c: float, weight: float) -> list[tuple[float, ...]]:
    """`fused_step_`'s coefficient rows for one param group's tensors at their `steps` (see there).

    `rate` is the signed step size (-lr times the multiplier); `c` and `weight` Schedule-Free's (0 over Adam).
    """
    beta1, beta2 = betas
    rows = []
    for n in steps:
        bias2_sqrt = math.sqrt(1 - beta2 ** n)
        direction = rate * bias2_sqrt / (1 - beta1 ** n if base == "adam" else 1.0)
        rows.append((eps * bias2_sqrt, direction, rate * weight_decay, c, weight))
    return rows


def fused_step_(params: Tensors, grads: Tensors, firsts: Tensors | None, exp_avg_sqs: Tensors, updates: Tensors,
                zs: Tensors | None, coefs: torch.Tensor, radius: torch.Tensor | None, betas: tuple[float, float]
                ) -> torch.Tensor:
    """The whole update after the learned scale has set the rate, in one function for `torch.compile` (which
    fuses it into a few passes over each tensor): the direction u into `updates`, weight decay, the global
    trust region and the step, over Adam (`firsts` the first moments, `zs` None) or Schedule-Free (`firsts`
    None, `zs` the z sequence). The same arithmetic as `adam_updates_` / `schedulefree_updates_`,
    `radius_ratio` and the eager step, which define it (a test holds them equal).

    `coefs` has a row per tensor: (eps \\sqrt{b_2}, the direction's factor (rate \\sqrt{b_2}, over Adam
    / b_1), rate x weight decay, Schedule-Free's c and y-weight 1 - \\beta_1 (1 - c); 0 over Adam). `radius`:
    the global radius (0-d), None without a trust region. Returns radius max(\\|theta\\|, 1e-3) / \\|u\\| (the
    unclamped factor; 1 without a trust region); \\Delta = min(1, that) u.
    """
    beta1, beta2 = betas
    param_sq = update_sq = coefs.new_zeros((), dtype=reduction_dtype([coefs]))
    for i, (p, g, v, o) in enumerate(zip(params, grads, exp_avg_sqs, updates)):
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        top = g if firsts is None else firsts[i].lerp_(g, 1 - beta1)
        o.copy_(top / (v.sqrt() + coefs[i, 0]) * coefs[i, 1] + p * coefs[i, 2])
        param_sq = param_sq + p.to(param_sq.dtype).square().sum()
        update_sq = update_sq + o.to(param_sq.dtype).square().sum()
    ratio = torch.ones_like(param_sq) if radius is None else ratio_of_norms(radius, param_sq.sqrt(), update_sq.sqrt())
    factor = ratio.clamp_max(1.0)
    for i, (p, o) in enumerate(zip(params, updates)):
        if zs is None:
            p.add_(o * factor.to(p.dtype))
        else:
            p.lerp_(zs[i], coefs[i, 3].to(p.dtype)).add_(o * (factor * coefs[i, 4]).to(p.dtype))
            zs[i].add_(o * factor.to(p.dtype))
    return ratio


def host_values(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers as a tensor on `device`; to a GPU through pinned memory without blocking, so the step keeps
    its one host sync."""
    values = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


# ---------------------------------------------------------------------------- over param groups and per-tensor state
def orthogonalizes(p: torch.Tensor, group: dict, base: str) -> bool:
    """p takes Muon's direction: base "muon", a matrix, in a group that does not opt out."""
    return base == "muon" and p.dim() == 2 and group["orthogonalize"]


def init_state_(state: dict, pairs: Pairs, base: str) -> None:
    """Creates the per-tensor state of tensors updated for the first time, and counts this step in each."""
    for p, group in pairs:
        st = state[p]
        if "step" not in st:
            st["step"] = 0
            if base == "schedulefree":
                st["z"] = p.detach().clone()
            else:
                st["exp_avg"] = torch.zeros_like(p)  # Muon's and SGD's momentum buffer, or Adam's first moment
            if base != "sgd" and not orthogonalizes(p, group, base):
                st["exp_avg_sq"] = torch.zeros_like(p)
        if "update" not in st:
            st["update"] = torch.zeros_like(p)
        st["step"] += 1


def eager_updates_(state: dict, pairs: Pairs, groups: list[dict], base: str, muon_momentum: float) -> Tensors:
    """u_t for every tensor of `pairs`, group by group, in its `update` buffer (the state `init_state_` made)."""
    updates = []
    for group, params in _by_group(pairs, groups):
        rate = -group["lr"] * group["lr_multiplier"]
        orthogonal = [orthogonalizes(p, group, base) for p in params]
        muon = [p for p, m in zip(params, orthogonal) if m]  # Muon on the matrices, the base on the rest
        rest = [p for p, m in zip(params, orthogonal) if not m]
        if muon:
            muon_updates_(_column(state, muon, "update"), [p.grad for p in muon], _column(state, muon, "exp_avg"),
                          muon_momentum, rate)
        if rest:
            _base_updates_(state, rest, group, base, rate)
        out = _column(state, params, "update")
        if group["weight_decay"]:  # decoupled: - lr m wd theta
            torch._foreach_add_(out, params, alpha=rate * group["weight_decay"])
        updates += out
    return updates


def _base_updates_(state: dict, params: Tensors, group: dict, base: str, rate: float) -> None:
    """u = rate d for tensors that do not take Muon's direction (Adam's over base "muon")."""
    out, grads = _column(state, params, "update"), [p.grad for p in params]
    if base in ("adam", "muon"):
        adam_updates_(out, grads, _column(state, params, "exp_avg"), _column(state, params, "exp_avg_sq"),
                      _column(state, params, "step"), group["betas"], group["eps"], rate)
    elif base == "schedulefree":
        schedulefree_updates_(out, grads, _column(state, params, "exp_avg_sq"), _column(state, params, "step"),
                              group["betas"][1], group["eps"], rate)
    else:
        momentum_updates_(out, grads, _column(state, params, "exp_avg"), group["betas"][0], rate)


def eager_step_(state: dict, pairs: Pairs, groups: list[dict], updates: Tensors, factor: torch.Tensor | None,
                base: str) -> None:
    """theta += f u, or Schedule-Free's two sequences group by group (each group has its own averaging weight,
    kept in the group)."""
    if base != "schedulefree":
        apply_updates_([p for p, _ in pairs], updates, factor)
        return
    for group, params in _by_group(pairs, groups):
        rate = group["lr"] * group["lr_multiplier"]
        c, group["weight_sum"], group["lr_max"] = averaging_weight(group["weight_sum"], group["lr_max"], rate)
        group_updates = [u for (_, g), u in zip(pairs, updates) if g is group]
        schedulefree_step_(params, _column(state, params, "z"), group_updates, c, group["betas"][0], factor)


def schedulefree_swap_(state: dict, groups: list[dict], train: bool) -> None:
    """Moves Schedule-Free's parameters, in place, to the training point y (`train`) or to the average x, in
    the groups not there yet (their `train_mode`), using y = (1 - beta1) z + beta1 x."""
    for group in groups:
        if group["train_mode"] == train:
            continue
        group["train_mode"] = train
        beta1 = group["betas"][0]
        for p in group["params"]:
            z = state.get(p, {}).get("z")
            if z is not None:
                p.lerp_(z, (1 - beta1) if train else (1 - 1 / beta1))


def fused_updates_(fused: Callable, state: dict, pairs: Pairs, groups: list[dict], base: str,
                   use_trust_region: bool) -> tuple[Tensors, torch.Tensor | None]:
    """u_t and the step through `fused` (`fused_step_`, compiled): (the `update` buffers, the unclamped global
    trust-region ratio or None without a trust region). The per-tensor coefficients (bias corrections, rate,
    weight decay, Schedule-Free's weights) go as one tensor, so a new rate does not recompile."""
    rows, params = [], []
    for group, group_params in _by_group(pairs, groups):
        rate = -group["lr"] * group["lr_multiplier"]
        c = weight = 0.0
        if base == "schedulefree":
            c, group["weight_sum"], group["lr_max"] = averaging_weight(group["weight_sum"], group["lr_max"], -rate)
            weight = 1 - group["betas"][0] * (1 - c)
        rows += fused_coefficients(_column(state, group_params, "step"), base, group["betas"], group["eps"], rate,
                                   group["weight_decay"], c, weight)
        params += group_params
    group = groups[0]
    radius_row = (group["trust_radius"] * group["radius_multiplier"], 0.0, 0.0, 0.0, 0.0)  # one copy to the device
    coefs = host_values(rows + [radius_row], reduction_dtype(params), params[0].device)
    updates = _column(state, params, "update")
    ratio = fused(params, [p.grad for p in params], _column(state, params, "exp_avg") if base == "adam" else None,
                  _column(state, params, "exp_avg_sq"), updates,
                  _column(state, params, "z") if base == "schedulefree" else None,
                  coefs[:-1], coefs[-1, 0] if use_trust_region else None, tuple(group["betas"]))
    return updates, ratio if use_trust_region else None


def _column(state: dict, params: Tensors, key: str) -> list:
    """`state[p][key]` for each p."""
    return [state[p][key] for p in params]


def _by_group(pairs: Pairs, groups: list[dict]) -> list[tuple[dict, Tensors]]:
    """Each param group with tensors in `pairs`, and those tensors, in order."""
    found = [(group, [p for p, g in pairs if g is group]) for group in groups]
    return [(group, params) for group, params in found if params]
