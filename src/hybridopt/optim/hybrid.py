r"""HybridOptimizer: Adam, Schedule-Free AdamW, Muon or SGD-momentum with a learned step size, a meta-learned controller and a trust region.

At step t, for each tensor \theta_t with gradient g_t, base direction d_t (Adam's bias-corrected
\hat m_t / (\sqrt{\hat v_t} + \epsilon), or the momentum buffer b_t = \beta_1 b_{t-1} + g_t, or for an
A x B matrix under `base="muon"` Muon's 0.2 \sqrt{\max(A, B)} O(g_t + \nu (b_t - g_t)) with
b_t = b_{t-1} + (1 - \nu)(g_t - b_{t-1}), \nu = `muon_momentum`, and O five Newton-Schulz iterations that orthogonalise it,
torch.optim.Muon's step at its AdamW-matched size), group learning
rate \eta (any LR scheduler changes it) and weight decay \lambda, the log learning-rate multiplier is the
sum of a learned scale \ell_t and the controller's state-dependent output c_t = a_{t,1}(x_t):

    u_t = -\eta e^{\ell_t + c_t} (d_t + \lambda \theta_t)                   (decoupled weight decay)
    \mu_t = \rho_t e^{a_{t,2}} \max(\|\theta_t\|_2, 10^{-3})                  (scale-free radius)
    \Delta\theta_t = u_t \min(1, \mu_t / \|u_t\|_2)                         (trust region, global norm)

where the norms run over all parameters that have a gradient. With `base="schedulefree"` (Defazio et al.
2024, "The Road Less Scheduled", in its AdamW form) d_t = g_t / (\sqrt{\hat v_t} + \epsilon), the parameters
hold the training point y (where gradients are taken), a second sequence z takes the steps and the average x
is what `eval()` puts in the parameters (for validation and export; `train()` returns to y):

    z_{t+1} = z_t + \Delta_t,   \Delta_t = u_t \min(1, \mu_t / \|u_t\|_2)      (the trust region bounds z's step)
    y_{t+1} = y_t + c_{t+1} (z_t - y_t) + (1 - \beta_1 (1 - c_{t+1})) \Delta_t,   y = (1 - \beta_1) z + \beta_1 x
    c_{t+1} = w_t / \sum_{i \le t} w_i,   w_t = (\max_{i \le t} \eta_i e^{\ell_i + c_i})^2

(its averaging replaces a decaying schedule: use warmup, then a constant rate). Its hypergradient is taken on
z's step, h_t = g_t \cdot \Delta_{t-1}: \partial L(y_t) / \partial \log \eta_{t-1} is that times
(1 - \beta_1 + \beta_1 c_t) > 0, and \sigma below is invariant to the factor's size. `trust_mode="per_tensor"` bounds each
tensor i separately: \|\Delta\theta^i_t\|_2 \le \rho_t e^{a_{t,2}} \max(\mathrm{rms}(\theta^i_t), 10^{-3}) \sqrt{n_i}.

**The learned scale** \ell (`learn_scale`) is hypergradient descent on the log learning rate (Baydin et al.
2018, "Online Learning Rate Adaptation with Hypergradient Descent", in its multiplicative form), with the
hypergradient normalised the way Adam normalises a gradient, so that its step does not depend on the size
of the loss, the gradients or the learning rate given:

    h_t = g_t \cdot s_{t-1},   s_t = \gamma s_{t-1} + \Delta\theta_t        (\partial L_t / \partial \ell_{t-1} when \gamma = 0)
    m_t = \beta_a m_{t-1} + (1 - \beta_a) h_t,   v_t = \beta_b v_{t-1} + (1 - \beta_b) h_t^2
    \sigma_t = \hat m_t / (\sqrt{\hat v_t} + 10^{-30}),   \ell_{t+1} = \mathrm{clip}(\ell_t - \kappa \sigma_t, [\log m, \log 10^4])   if |\sigma_t| > \tau

(else \ell_{t+1} = \ell_t), with \kappa = `scale_lr` (0.1), \tau = `scale_threshold` (0.5) times the factor
by which noise spreads \sigma wider over few hypergradients than over many (`threshold_growth`: 4.4 after one,
whose \sigma is always \pm 1, 2 after five, 1.4 after ten), (\beta_a, \beta_b) = `scale_betas`, m = `min_scale`
and \hat{} Adam's bias corrections. m is 10^{-4} over Adam and SGD and 1 over
Schedule-Free, where the scale is one-sided (it may raise a too-low rate, never lower the given one): under a
constant rate z's consecutive steps oscillate, so the one-step hypergradient keeps calling the rate too high,
while the average x already does what a lower rate would (two-sided, the scale shrank to 0.31-0.55x and cost
0.145 nats/token on the default distillation run; docs/RESULTS.md). The threshold: for hypergradients that are pure noise
(zero mean), |\sigma| is about \sqrt{(1 - \beta_a) / (1 + \beta_a)} = 0.23 and exceeds 0.5 about 3% of the time,
so \ell moves on consistent evidence only; without it (\tau = 0) the noise-level signal near a good rate drifted
the scale up to ~2.4x on the default distillation run and cost 0.07 nats there (one seed; docs/RESULTS.md). When
successive updates point the same way (h < 0) the scale grows by up to e^\kappa per step; when they
oscillate it shrinks. While the first group's lr rises (a warmup) \ell is held and the moments are reset
at every step, so the evidence after the warmup is the constant rate's own: early in training successive
updates agree, and a scale that grew on top of the warmup overshot in our development runs and cost the rest
of the run; carried over (with the first step's \sigma = \pm 1 taken at face value), the warmup's evidence
raised the scale to 1.18-1.49x right after it on the default distillation run and cost 0.050 against
Schedule-Free AdamW alone, which the reset and the count-aware threshold removed (docs/RESULTS.md). \ell
starts at 0, so `lr` is only the starting point, and over Schedule-Free (`radius_start` q = 0.25) not even
that: at the first step after the warmup, \ell \leftarrow \min(\log 10^4, \ell + \max(0, \log(q \rho_{t-1}
\max(\|\theta_{t-1}\|, 10^{-3}) / \|u_{t-1}\|))) (the ratio from the global trust region's last step; 1 when
u = 0), so a rate far below the one whose step fills the radius starts at q times that rate instead of
climbing there at e^\kappa per step, which took most of a short run (docs/RESULTS.md). The signal is greedy
(one step ahead): under a decaying schedule it pushes \ell up against the decay (the short-horizon bias
of Wu et al. 2018); how much that costs, and how far the scale carries a wrong `lr`, is measured in
docs/RESULTS.md and benchmarks/bench/RESULTS.md. The hypergradient is
taken through the trust region one way: after a clipped step (whose length the radius set, not the rate)
\sigma_t is replaced by \max(\sigma_t, 0), so a rate that is too high still shrinks while the trust region
holds the steps (masking clipped steps kept it from ever coming down), but a rate the trust region
overrides cannot grow without bound (it grew 1000x on Rosenbrock). And a lowering after a clipped step starts
from the rate whose step the radius allowed, \ell + \log(\rho \max(\|\theta\|, 10^{-3}) / \|u\|) (global trust
region), so it shortens the next step at once: lowered from the given rate, a rate 100x too high shrank at
e^{-\kappa} per step while every step stayed at the radius, and the design document's hybrid over SGD
diverged at the bench's highest rate (docs/RESULTS.md). \gamma = `trace_decay` > 0 credits a rate shared by the last ~1/(1-\gamma) steps instead of the last
step alone (it was worse on the bench's mlp task; off by default).

**The controller** (the design document's auxiliary network, `AuxiliaryNN`) maps smoothed training-state
features x_t (EMA loss, EMA gradient norm, loss trend, gradient variance, step, data cluster) to
a_t = (c_t, \log r_t), each clamped to [\log 0.1, \log 10]. It learns online from the same normalised
hypergradient: one Adam step (`controller_lr`) on the surrogate \sigma_t a_{t-1,k}(x_{t-1}) plus a quadratic
pull back inside the clamp bounds, with k = 1 (the learning-rate correction) on every step and k = 2 (the
radius) on the steps the trust region clipped (then \partial L / \partial \log r has the sign of h).
The learned scale carries the rate; the controller adds what depends on the training state. It is off by
default over Schedule-Free (`use_controller=None`): there its corrections kept lowering a constant rate (average
0.69-0.72x) and cost the default distillation run 0.07-0.13 nats/token (docs/RESULTS.md). With
`controller_smoothing` b > 0 the correction applied is the EMA c_t = b c_{t-1} + (1 - b) a_{t,1}(x_t)
(off by default: on the bench it cut the step-to-step jitter of the multiplier 3-5x without lowering the
loss; docs/RESULTS.md, "Where the multiplier moves from").

The base radius \rho_t (`trust_radius`, in each param group) adapts as the design document's trust
region when `adapt_radius=True`: with the ratio of actual to first-order predicted loss decrease,
r_t = (L_{t-1} - L_t) / (-g_{t-1} \cdot \Delta\theta_{t-1}), smoothed as \bar r_t = 0.9 \bar r_{t-1} + 0.1 r_t,
\rho \leftarrow \min(1, 1.5\rho) when \bar r_t > 0.75 and \rho \leftarrow \max(10^{-4}, 0.7\rho) when
\bar r_t < 0.25, both only after a step the constraint clipped (it needs the loss, passed to
`step(loss=...)` or returned by the closure). It is off by default: on minibatches the actual decrease is
dominated by batch-to-batch noise, so the rule shrinks the radius until training stalls. A non-finite loss
or gradient skips the step and leaves every tensor untouched. Without `adapt_radius` that is all. With it,
a non-finite L_t or g_t counts as the worst outcome of the update that led to \theta_t, so it halves \rho (the
rule above grows it back by 1.5 per good clipped step). Before the first update no step led there.

Cost: each tensor's u_t is computed in place in one persistent `update` buffer (no parameter-sized temporary
per step), the global trust-region factor f is applied with the update (\theta += f u; over Schedule-Free
y += (1 - \beta_1 (1 - c)) f u and z += f u) and kept for the next hypergradient (h = f g \cdot u_{t-1})
instead of being multiplied into u; the moments, norms, trust region and Schedule-Free's two sequences are
`torch._foreach_*` kernels. \|g_t\| is computed only for the controller's features or when h_t does not cover
every gradient (the non-finite check otherwise reads h_t, which any non-finite g_i makes non-finite). A step
reads one small tensor back to the host (the loss if it is a tensor, \|g_t\|^2 or h_t, h_t and the last step's
trust-region factor, stacked), and `adapt_radius` adds one more. With `compile=True` the update after the
learned scale (moments, direction, weight decay, global trust region, step) is one function, `fused_step_`,
run through `torch.compile`, which fuses it into a few passes over each tensor (benchmarks/hybrid_overhead.py
--compile measures it; docs/RESULTS.md). Memory:
Adam's two moments (Schedule-Free: z and the second moment) plus the `update` buffer (one parameter-sized buffer; `trace_decay` > 0 adds the trace s).

Where things live (the schedule_free shape): hyperparameters in the param groups (`lr`, `betas`, `eps`,
`weight_decay`, `trust_radius`, and the `lr_multiplier` e^{\ell + c} and `radius_multiplier` written there
every step; Schedule-Free's `weight_sum`, `lr_max` and `train_mode`); per-tensor state in `self.state[p]`
(`exp_avg` or `z`, `exp_avg_sq`, `step`, `update`, and `trace` when `trace_decay` > 0);
optimizer-wide scalars in `HybridState`; the controller is its own module. No extra forward or backward
pass of the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybridopt.optim.controller import LR_HEAD, RADIUS_HEAD, AuxiliaryNN, TrainingState

BASES = ("adam", "sgd", "schedulefree", "muon")
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic Newton-Schulz iteration (Keller Jordan's)
MUON_STEPS = 5
MIN_RADIUS, MAX_RADIUS = 1e-4, 1.0
MIN_NORM = 1e-3  # floor of the reference norm, so parameters at zero can still move
LOG_SCALE_BOUND = math.log(1e4)  # the learned scale stays within 1e-4x ... 1e4x the given lr

Tensors = list[torch.Tensor]
RULE_VERSION = 10  # bumped with every change to what a step computes (names the hybrid-trained teachers' cache entries)
RETIRED_STATE_KEYS = frozenset({"rising"})  # HybridState fields older versions saved; dropped when loading


# ---------------------------------------------------------------------------- pure update functions
def adam_updates_(out: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, steps: list[int],
                  betas: tuple[float, float], eps: float, scale: float) -> Tensors:
    """out = scale \\hat m / (\\sqrt{\\hat v} + eps) per tensor at its `steps` (1-based); updates the moments in place.

    Written into `out` with no temporary: with b_k = 1 - \\beta_k^n, \\hat m / (\\sqrt{\\hat v} + eps) equals
    (\\sqrt{b_2} / b_1) m / (\\sqrt v + eps \\sqrt{b_2}). (A fresh parameter-sized tensor per step, as the
    foreach version allocated, cost more on CPU than all the arithmetic.)
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


def averaging_weight(weight_sum: float, lr_max: float, lr: float) -> tuple[float, float, float]:
    """Schedule-Free's averaging: (c, weight_sum, lr_max) after a step at rate `lr`, where the new point
    z enters the average x with weight c = w / \\sum w, w = lr_max^2 (lr_max: the largest rate so far)."""
    lr_max = max(lr_max, lr)
    weight_sum += lr_max ** 2
    return lr_max ** 2 / weight_sum, weight_sum, lr_max


def momentum_updates_(out: Tensors, grads: Tensors, buffers: Tensors, beta1: float, scale: float) -> Tensors:
    """out = scale b with the heavy-ball buffers b = beta1 b + g (updated in place)."""
    torch._foreach_mul_(buffers, beta1)
    torch._foreach_add_(buffers, grads)
    for o, b in zip(out, buffers):
        torch.mul(b, scale, out=o)
    return out


def orthogonalized(x: torch.Tensor, coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
                   steps: int = MUON_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Muon's orthogonalisation of a matrix: `steps` quintic Newton-Schulz iterations X <- aX + b(XX^T)X +
    c(XX^T)^2 X from X = x / \|x\|_F, on the wide orientation (torch.optim.Muon's iteration, which gives U S' V^T
    with S' roughly in [0.5, 1.5] rather than U V^T). In float32 at least: torch's runs in bfloat16, which
    CPUs without bfloat16 matrix units run about 30x slower (bench_arms.Float32Muon)."""
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
    """out = scale 0.2 \sqrt{\max(A, B)} O(g + momentum (b - g)) per A x B matrix with the momentum buffers
    b = lerp(b, g, 1 - momentum) (updated in place): Muon's Nesterov direction, orthogonalised, at
    torch.optim.Muon's `match_rms_adamw` size (RMS 0.2, as an Adam step's), so a rate that suits Adam suits it."""
    torch._foreach_lerp_(buffers, grads, 1 - momentum)
    for o, g, b in zip(out, grads, buffers):
        o.copy_(orthogonalized(torch.lerp(g, b, momentum)))
        o.mul_(scale * 0.2 * math.sqrt(max(o.shape)))
    return out


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


def radius_ratio(updates: Tensors, params: Tensors, radius: float) -> torch.Tensor:
    """radius max(\\|theta\\|, 1e-3) / \\|u\\| (1 when u = 0), a 0-d tensor (no host sync): how many times
    longer than u a step may be before the global trust region clips it."""
    return ratio_of_norms(radius, norms(params).norm(), norms(updates).norm())


def tensor_trust_factors(updates: Tensors, params: Tensors, radii: list[float]) -> torch.Tensor:
    """Per tensor: min(1, radius max(rms(theta), 1e-3) sqrt(n) / \\|u\\|), shape `(n,)`."""
    sizes = torch.tensor([float(p.numel()) for p in params], device=params[0].device)
    rms = norms(params) / sizes.sqrt()
    limit = torch.tensor(radii, device=params[0].device) * rms.clamp_min(MIN_NORM) * sizes.sqrt()
    return (limit / norms(updates).clamp_min(1e-30)).clamp_max(1.0)


def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """\\sum_i a_i \\cdot b_i in float32 at least, a 0-d tensor."""
    dtype = reduction_dtype(a)
    return torch.stack([torch.vdot(x.flatten().to(dtype), y.flatten().to(dtype)) for x, y in zip(a, b)]).sum()


def fused_step_(params: Tensors, grads: Tensors, firsts: Tensors | None, exp_avg_sqs: Tensors, updates: Tensors,
                zs: Tensors | None, coefs: torch.Tensor, radius: torch.Tensor | None, betas: tuple[float, float]
                ) -> torch.Tensor:
    """The whole update after the learned scale has set the rate, in one function for `torch.compile` (which
    fuses it into a few passes over each tensor): the direction u into `updates`, weight decay, the global
    trust region and the step, over Adam (`firsts` the first moments, `zs` None) or Schedule-Free (`firsts`
    None, `zs` the z sequence). The same arithmetic as `adam_updates_` / `schedulefree_updates_`,
    `radius_ratio` and the eager step, which define it (a test holds them equal).

    `coefs` has a row per tensor: (eps \sqrt{b_2}, the direction's factor (rate \sqrt{b_2}, over Adam
    / b_1), rate x weight decay, Schedule-Free's c and y-weight 1 - \beta_1 (1 - c); 0 over Adam). `radius`:
    the global radius (0-d), None without a trust region. Returns radius max(\|theta\|, 1e-3) / \|u\| (the
    unclamped factor; 1 without a trust region); \Delta = min(1, that) u.
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


@dataclass
class ScaleState:
    """Adam-style moments of the hypergradient h_t behind the learned log scale \\ell."""

    log_scale: float = 0.0  # \\ell
    mean: float = 0.0  # m, EMA of h
    sq: float = 0.0  # v, EMA of h^2
    count: int = 0  # hypergradients seen (for the bias corrections)


def normalized_hypergradient(state: ScaleState, h: float, betas: tuple[float, float]) -> tuple[ScaleState, float]:
    """The moments after h, and \\sigma = \\hat m / (\\sqrt{\\hat v} + 1e-30), roughly in [-1, 1]."""
    b1, b2 = betas
    count = state.count + 1
    mean, sq = b1 * state.mean + (1 - b1) * h, b2 * state.sq + (1 - b2) * h * h
    sigma = (mean / (1 - b1 ** count)) / (math.sqrt(sq / (1 - b2 ** count)) + 1e-30)
    return dataclasses.replace(state, mean=mean, sq=sq, count=count), sigma


def learned_log_scale(log_scale: float, sigma: float, scale_lr: float, threshold: float = 0.0,
                      floor: float = -LOG_SCALE_BOUND, clip_ratio: float = 1.0) -> float:
    """\\ell - \\kappa \\sigma when |\\sigma| > `threshold` (else \\ell), kept within [`floor`, \\log 10^4].

    `clip_ratio` < 1: the last step was clipped to that fraction of its length; a lowering (\\sigma > 0) then
    starts from the rate whose step the radius allowed, \\ell + \\log(clip_ratio), so it shortens the next step."""
    if abs(sigma) <= threshold:
        return log_scale
    if sigma > 0:
        log_scale += math.log(min(clip_ratio, 1.0))
    return min(LOG_SCALE_BOUND, max(floor, log_scale - scale_lr * sigma))


def threshold_growth(count: int, beta: float) -> float:
    """How much wider zero-mean noise spreads \\sigma after `count` hypergradients than once the moments have
    settled: \\sqrt{v_n / v_\\infty}, v_n = (1 - \\beta)(1 + \\beta^n) / ((1 + \\beta)(1 - \\beta^n)) the variance of
    the bias-corrected mean of n unit-variance samples (v_1 = 1: one sample gives \\sigma = \\pm 1)."""
    n = max(count, 1)
    spread_n = (1 - beta) * (1 + beta ** n) / ((1 + beta) * (1 - beta ** n))
    return math.sqrt(spread_n * (1 + beta) / (1 - beta))


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


@dataclass
class FeatureStats:
    """Running statistics behind the controller's features."""

    loss_ema: float | None = None  # EMA (0.9) of finite losses
    loss_trend: float = 0.0  # EMA (0.9) of log(loss) - log(loss_ema)
    grad_norm_mean: float | None = None  # EMA (0.9) of the gradient norm
    grad_norm_var: float = 0.0  # EMA (0.9) of its squared deviation


def update_feature_stats(stats: FeatureStats, loss: float, grad_norm: float) -> FeatureStats:
    """The statistics after one more step (a non-finite loss, e.g. none given, leaves the loss ones)."""
    mean = grad_norm if stats.grad_norm_mean is None else stats.grad_norm_mean
    delta = grad_norm - mean
    new = dataclasses.replace(stats, grad_norm_mean=mean + 0.1 * delta,
                              grad_norm_var=0.9 * stats.grad_norm_var + 0.1 * delta * delta)
    if math.isfinite(loss):
        if stats.loss_ema is not None and loss > 0 and stats.loss_ema > 0:
            new.loss_trend = 0.9 * stats.loss_trend + 0.1 * (math.log(loss) - math.log(stats.loss_ema))
        new.loss_ema = loss if stats.loss_ema is None else 0.9 * stats.loss_ema + 0.1 * loss
    return new


def training_state(stats: FeatureStats, step: int, cluster_id: int | None, num_clusters: int) -> TrainingState:
    """What the controller sees: the smoothed loss and gradient norm, not one minibatch's (no loss reads as 1)."""
    return TrainingState(loss=stats.loss_ema if stats.loss_ema is not None else 1.0,
                         gradient_magnitude=stats.grad_norm_mean, loss_trend=stats.loss_trend,
                         gradient_variance=stats.grad_norm_var / max(stats.grad_norm_mean ** 2, 1e-12),
                         step=step, cluster_id=cluster_id, num_clusters=num_clusters)


@dataclass
class HybridState:
    """Optimizer-wide scalars, saved by `state_dict` (hyperparameters are in the param groups)."""

    step: int = 0  # updates applied (skipped steps not counted)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    clipped: bool = False  # the last update was scaled down by the trust region
    clipped_steps: int = 0
    lr_multiplier_sum: float = 0.0  # for the average multiplier of the summary
    correction: float = 0.0  # c_t, the controller's log-lr correction as applied (smoothed with controller_smoothing)
    cluster_id: int | None = None  # data cluster of the next batch, from `set_cluster`
    signal: float = 0.0  # \\sigma_t, the normalised hypergradient
    prev_lr: float = math.inf  # the first group's lr at the last step (a rising lr holds the scale)
    radius_ratio: float | None = None  # global trust region: the last step's radius / \\|u\\|
    started: bool = False  # the first step after the warmup has been taken (radius_start applied)
    scale: ScaleState = field(default_factory=ScaleState)
    prev_features: list[float] | None = None  # x_{t-1}, the controller input at the last update
    features: FeatureStats = field(default_factory=FeatureStats)
    prev_loss: float | None = None  # with adapt_radius: L_{t-1}
    prev_predicted_decrease: float | None = None  # with adapt_radius: -g_{t-1} . Delta theta_{t-1}
    ratio_ema: float | None = None  # with adapt_radius: smoothed actual / predicted decrease


class HybridOptimizer(torch.optim.Optimizer):
    """Learned step size, meta-learned controller and trust region over an Adam, Schedule-Free AdamW or
    SGD-momentum step.

    Args:
        params: parameters or param groups (a group may set its own `lr`, `weight_decay`, `trust_radius`).
        lr: base learning rate, the learned scale's starting point (schedulers scale it).
        betas: Adam betas (beta1 is the momentum of `base="sgd"` and the interpolation of "schedulefree").
        eps: Adam epsilon.
        weight_decay: decoupled weight decay (taken at y with "schedulefree").
        base: "adam", "schedulefree" (call `eval()` before evaluating or saving the model, `train()` after),
            "muon" (Muon's orthogonalised momentum on the matrices of groups that keep `orthogonalize` True,
            the default; Adam on everything else: give embeddings and the output head a group with
            `"orthogonalize": False`, as Muon's authors advise; `hybridopt.models.modeling.param_groups` does) or "sgd".
        learn_scale: learn the log scale \\ell by normalised hypergradient descent (False: \\ell = 0).
        scale_lr: \\kappa, the largest change of \\ell per step (0.1: x1.105).
        scale_betas: EMA decays of the hypergradient's mean and square.
        scale_threshold: \\tau, the size |\\sigma| must exceed for \\ell to move (0: every step).
        use_controller: add the auxiliary network's output; False fixes its multipliers at exactly 1 (None: off
            over "schedulefree", where it cost the default distillation run, on otherwise).
        learn_controller: update the controller online; False freezes it at initialisation (outputs 0).
        use_trust_region: bound the update norm.
        trust_radius: initial radius, relative to the parameter norm (global) or tensor RMS (per tensor).
        trust_mode: "global" (one bound on all parameters: every group needs the same radius) or "per_tensor".
        adapt_radius: adapt the radius from actual vs predicted decrease (off by default, see above).
        controller_lr: Adam learning rate of the auxiliary network.
        controller_hidden: hidden width of the auxiliary network.
        trace_decay: gamma of the update trace (0, the default, is Baydin's one-step hypergradient).
        num_clusters: number of data clusters (for the cluster feature), 0 if none.
        controller_smoothing: b of the EMA over the controller's learning-rate correction (0: none).
        min_scale: the learned scale's lower bound m, in [1e-4, 1] (None: 1 over "schedulefree", 1e-4 otherwise).
        radius_start: q in [0, 1]: at the first step after the warmup the scale is raised so that the last step
            would have been at least q times the global trust radius long (None: 0.25 over "schedulefree" and
            "muon", 0, off, otherwise; needs the global trust region).
        compile: run the update (`fused_step_`: moments, direction, weight decay, global trust region, step)
            through `torch.compile`, which fuses it into a few passes over each tensor; the first step pays for
            the compilation. Over "adam" and "schedulefree" with the global trust region (or none) and one
            `betas` for all groups; other settings take the eager path.
        muon_momentum: the momentum of Muon's Nesterov buffer with base "muon" (torch.optim.Muon's 0.95).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, base: str = "adam", learn_scale: bool = True, scale_lr: float = 0.1,
                 scale_betas: tuple[float, float] = (0.9, 0.99), scale_threshold: float = 0.5, use_controller: bool | None = None,
                 learn_controller: bool = True, use_trust_region: bool = True, trust_radius: float = 0.1,
                 trust_mode: str = "global", adapt_radius: bool = False, controller_lr: float = 1e-3,
                 controller_hidden: int = 16, trace_decay: float = 0.0, num_clusters: int = 0,
                 controller_smoothing: float = 0.0, min_scale: float | None = None,
                 radius_start: float | None = None, compile: bool = False, muon_momentum: float = 0.95):
        _check(lr > 0, f"lr must be positive, got {lr}")
        _check(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas must be two numbers in [0, 1), got {betas}")
        _check(len(scale_betas) == 2 and all(0 <= b < 1 for b in scale_betas),
               f"scale_betas must be two numbers in [0, 1), got {scale_betas}")
        _check(scale_lr > 0, f"scale_lr must be positive, got {scale_lr}")
        _check(0 <= scale_threshold < 1, f"scale_threshold must be in [0, 1), got {scale_threshold}")
        _check(eps >= 0 and weight_decay >= 0, f"eps and weight_decay must be >= 0, got {eps} and {weight_decay}")
        _check(base in BASES, f"base must be one of {', '.join(BASES)}, got {base!r}")
        _check(not (adapt_radius and base == "schedulefree"),
               "adapt_radius is not supported with base='schedulefree' (its step is not the update it predicts from)")
        _check(trust_mode in ("global", "per_tensor"), f"trust_mode must be 'global' or 'per_tensor', got {trust_mode!r}")
        _check(controller_lr > 0 and controller_hidden >= 1,
               f"controller_lr must be positive and controller_hidden at least 1, got {controller_lr} and {controller_hidden}")
        _check(0 <= trace_decay < 1, f"trace_decay must be in [0, 1), got {trace_decay}")
        _check(num_clusters >= 0, f"num_clusters must be >= 0, got {num_clusters}")
        _check(0 <= muon_momentum < 1, f"muon_momentum must be in [0, 1), got {muon_momentum}")
        if min_scale is None:
            min_scale = 1.0 if base == "schedulefree" else 1e-4
        if use_controller is None:
            use_controller = base != "schedulefree"
        if radius_start is None:
            radius_start = 0.25 if base in ("schedulefree", "muon") else 0.0
        _check(0 <= radius_start <= 1, f"radius_start must be in [0, 1], got {radius_start}")
        _check(1e-4 <= min_scale <= 1, f"min_scale must be in [1e-4, 1], got {min_scale}")
        _check(0 <= controller_smoothing < 1, f"controller_smoothing must be in [0, 1), got {controller_smoothing}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_radius=trust_radius,
                                      lr_multiplier=1.0, radius_multiplier=1.0, weight_sum=0.0, lr_max=0.0,
                                      train_mode=True, orthogonalize=True))
        self.base, self.trust_mode, self.muon_momentum = base, trust_mode, muon_momentum
        self.learn_scale, self.scale_lr, self.scale_betas = learn_scale, scale_lr, tuple(scale_betas)
        self.scale_threshold, self.scale_floor = scale_threshold, math.log(min_scale)
        self.use_controller, self.learn_controller = use_controller, learn_controller
        self.use_trust_region, self.adapt_radius = use_trust_region, adapt_radius
        self.trace_decay, self.num_clusters = trace_decay, num_clusters
        self.controller_smoothing = controller_smoothing
        self.radius_start = radius_start
        self._fused = torch.compile(fused_step_) if compile else None
        self.controller = AuxiliaryNN(controller_hidden)
        self.controller_opt = torch.optim.Adam(self.controller.parameters(), lr=controller_lr)
        self.hybrid_state = HybridState()
        self._trust_factor: torch.Tensor | None = None  # the last step's, read back at the next sync
        # The tensors the last step moved, and its global trust-region factor f when not yet multiplied into
        # their `update` buffers (then \\Delta\\theta_{t-1} = f u_{t-1}).
        self._moved: Tensors = []
        self._pending_factor: torch.Tensor | None = None

    @property
    def _learns(self) -> bool:
        """Something learns from the hypergradient (so the trace is kept)."""
        return self.learn_scale or (self.use_controller and self.learn_controller)

    @property
    def _adapts_radius(self) -> bool:
        return self.adapt_radius and self.use_trust_region

    def add_param_group(self, param_group: dict) -> None:
        """As torch's; a new group takes the current radius and multipliers of the first group."""
        param_group = dict(param_group)
        for key in ("trust_radius", "lr_multiplier", "radius_multiplier"):
            if self.param_groups and key not in param_group:
                param_group[key] = self.param_groups[0][key]
        radius = param_group.get("trust_radius", self.defaults["trust_radius"])
        _check(radius > 0, f"trust_radius must be positive, got {radius}")
        super().add_param_group(param_group)

    def set_cluster(self, cluster_id: int | None) -> None:
        """Tell the controller which data cluster the next batch came from (None if mixed)."""
        if cluster_id is not None and self.num_clusters:
            _check(0 <= cluster_id < self.num_clusters,
                   f"cluster_id must be in [0, {self.num_clusters}) or None, got {cluster_id}")
        self.hybrid_state.cluster_id = cluster_id

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, loss: float | torch.Tensor | None = None):
        """One update. Pass the loss (or a closure returning it) for the loss features and `adapt_radius`."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_radii()
        _check(self.param_groups[0]["train_mode"], "the optimizer is in eval mode (the parameters hold the "
               "Schedule-Free average); call optimizer.train() before training")
        pairs = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not pairs:
            return loss
        loss_value, finite, grad_norm, h = self._read_back(pairs, loss)
        if not finite:
            self._skip()
            return loss
        if self._adapts_radius and math.isfinite(loss_value):
            self._adapt_radius(loss_value)
        lr = self.param_groups[0]["lr"]
        rising, self.hybrid_state.prev_lr = lr > self.hybrid_state.prev_lr, lr  # a warmup is raising the rate
        if self._learns and self.hybrid_state.step > 0:
            self._learn(h, rising)
        self._predict(loss_value, grad_norm)
        self.hybrid_state.step += 1
        params = [p for p, _ in pairs]
        self._forget_unmoved(params)
        self._init_state(pairs)
        if self._fuses:  # u_t, the factor f and the step, in one compiled function
            updates, factor = self._fused_step(pairs)
        else:
            updates = self._updates(pairs)  # u_t in each tensor's `update` buffer, before the trust region
            factor = self._trust_region(updates, pairs) if self.use_trust_region else None
            self._apply(pairs, updates, factor)
        if self._adapts_radius:
            self._remember_prediction(pairs, updates, factor, loss_value)
        self.hybrid_state.lr_multiplier_sum += self.param_groups[0]["lr_multiplier"]
        if self.trace_decay and self._learns:  # s_t = gamma s_{t-1} + Delta theta_t
            traces = [self._trace(p) for p in params]
            torch._foreach_mul_(traces, self.trace_decay)
            for trace, u in zip(traces, updates):
                if factor is None:
                    trace.add_(u)
                else:
                    trace.addcmul_(u, factor)
        self._moved, self._pending_factor = params, factor
        return loss

    def _apply(self, pairs: list, updates: Tensors, factor: torch.Tensor | None) -> None:
        """The eager step: \\theta += f u (f stays pending for the hypergradient: no pass to scale u), or
        Schedule-Free's two sequences."""
        if self.base == "schedulefree":
            self._schedulefree_step(pairs, updates, factor)
        elif factor is None:
            torch._foreach_add_([p for p, _ in pairs], updates)
        else:
            for (p, _), u in zip(pairs, updates):
                p.addcmul_(u, factor)

    def _schedulefree_step(self, pairs: list, updates: Tensors, factor: torch.Tensor | None) -> None:
        """z <- z + \\Delta and y <- y + c (z - y) + (1 - \\beta_1 (1 - c)) \\Delta, \\Delta = f u, group by group
        (the docstring). f is applied with the update and stays pending (the `update` buffers keep u), as over Adam."""
        for group in self.param_groups:
            items = [(p, u) for (p, g), u in zip(pairs, updates) if g is group]
            if not items:
                continue
            rate = group["lr"] * group["lr_multiplier"]
            c, group["weight_sum"], group["lr_max"] = averaging_weight(group["weight_sum"], group["lr_max"], rate)
            params, updates_ = [p for p, _ in items], [u for _, u in items]
            zs = [self.state[p]["z"] for p in params]
            torch._foreach_lerp_(params, zs, c)
            weight = 1 - group["betas"][0] * (1 - c)
            if factor is None:
                torch._foreach_add_(params, updates_, alpha=weight)
                torch._foreach_add_(zs, updates_)
            else:  # \Delta = f u applied with the update (no pass to scale u; f stays pending for h)
                for p, z, u in zip(params, zs, updates_):
                    p.addcmul_(u, factor * weight)
                    z.addcmul_(u, factor)

    @torch.no_grad()
    def eval(self) -> None:
        """With base='schedulefree': set the parameters to the average x, where the model is evaluated and
        exported (the training point is y); `train()` returns. Other bases: nothing to do."""
        self._swap(train=False)

    @torch.no_grad()
    def train(self) -> None:
        """With base='schedulefree': set the parameters back to the training point y (after `eval()`)."""
        self._swap(train=True)

    def _swap(self, train: bool) -> None:
        if self.base != "schedulefree":
            return
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            group["train_mode"] = train
            beta1 = group["betas"][0]
            for p in group["params"]:  # y = (1 - beta1) z + beta1 x
                z = self.state.get(p, {}).get("z")
                if z is not None:
                    p.lerp_(z, (1 - beta1) if train else (1 - 1 / beta1))

    def _read_back(self, pairs: list, loss) -> tuple[float, bool, float | None, float]:
        """The step's one host sync: (loss, whether loss and g_t are finite, \\|g_t\\| (None when not needed),
        h_t), and the last step's trust-region factor."""
        grads = [p.grad for p, _ in pairs]
        device = grads[0].device
        key = "trace" if self.trace_decay else "update"
        moved = [(p.grad, self.state[p][key]) for p, _ in pairs if key in self.state[p]]
        h = dot(*zip(*moved)) if moved and self._learns else torch.zeros((), device=device)
        if key == "update" and self._pending_factor is not None:
            h = h * self._pending_factor
        # \|g\| feeds the controller and, otherwise, only the non-finite check, which h makes as well when it
        # covers every gradient (a non-finite g_i makes g \cdot s non-finite, 0 \cdot inf included): one pass less.
        by_h = self._learns and len(moved) == len(pairs) and not self.use_controller
        values = [h if by_h else norms(grads).pow(2).sum(), h]
        values.append(self._trust_factor.min().float() if self._trust_factor is not None else torch.ones((), device=device))
        values.append(torch.as_tensor(loss, device=device).detach() if loss is not None
                      else torch.full((), math.nan, device=device))
        grad_sq, h, factor, loss_value = torch.stack([v.to(device, torch.float64) for v in values]).tolist()
        self._settle(factor)
        finite = math.isfinite(grad_sq) and (loss is None or math.isfinite(loss_value))
        return loss_value, finite, None if by_h else math.sqrt(grad_sq), h

    def _settle(self, factor: float | None = None) -> None:
        """Record whether the last update was clipped (its factor read back now)."""
        if self._trust_factor is None:
            return
        if factor is None:
            factor = float(self._trust_factor.min())
        self._trust_factor = None
        if self.trust_mode == "global":  # the global factor is kept unclamped until read: radius / \\|u\\|
            self.hybrid_state.radius_ratio = factor
        self.hybrid_state.clipped = factor < 1.0
        self.hybrid_state.clipped_steps += int(factor < 1.0)

    def _trace(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        if "trace" not in st:  # first update of this tensor
            st["trace"] = torch.zeros_like(p)
        return st["trace"]

    def _forget_unmoved(self, params: Tensors) -> None:
        """A tensor the last step moved but this one does not: its \\Delta\\theta is 0 from now on (gamma 0: its
        `update` buffer is zeroed once; gamma > 0: its trace decays)."""
        now = {id(p) for p in params}
        if self.trace_decay:
            idle = [st["trace"] for p, st in self.state.items() if id(p) not in now and "trace" in st]
            if idle:
                torch._foreach_mul_(idle, self.trace_decay)
            return
        idle = [self.state[p]["update"] for p in self._moved if id(p) not in now]
        if idle:
            torch._foreach_zero_(idle)

    def _check_radii(self) -> None:
        radii = {group["trust_radius"] for group in self.param_groups}
        _check(len(radii) == 1 or not self.use_trust_region or self.trust_mode != "global",
               "trust_mode='global' bounds one norm over all parameters, so every param group needs the same "
               f"trust_radius (got {sorted(radii)}); use trust_mode='per_tensor' for different radii")

    def _skip(self) -> None:
        self.hybrid_state.skipped_steps += 1
        if self._adapts_radius and self.hybrid_state.step > 0:  # the last update went too far (docstring)
            for group in self.param_groups:
                group["trust_radius"] = max(MIN_RADIUS, group["trust_radius"] * 0.5)

    def _adapt_radius(self, loss: float) -> None:
        s = self.hybrid_state
        if s.prev_loss is None or not s.prev_predicted_decrease:
            return
        s.ratio_ema = decrease_ratio_ema(s.ratio_ema, s.prev_loss, loss, s.prev_predicted_decrease)
        for group in self.param_groups:
            group["trust_radius"] = adapted_radius(group["trust_radius"], s.ratio_ema, s.clipped)

    def _learn(self, h: float, rising: bool) -> None:
        """The learned scale's step, and one controller step on the surrogate \\sigma_t a_{t-1,k}(x_{t-1})."""
        s = self.hybrid_state
        s.scale, s.signal = normalized_hypergradient(s.scale, h, self.scale_betas)
        if self.learn_scale and rising:  # held, and what the warmup's steps said is dropped (docstring)
            s.scale = ScaleState(log_scale=s.scale.log_scale)
        elif self.learn_scale:  # a clipped step's length was the radius's: it may lower the scale only, from there
            sigma = max(s.signal, 0.0) if s.clipped else s.signal
            tau = self.scale_threshold * threshold_growth(s.scale.count, self.scale_betas[0])
            ratio = s.radius_ratio if s.clipped and s.radius_ratio is not None else 1.0
            s.scale.log_scale = learned_log_scale(s.scale.log_scale, sigma, self.scale_lr, tau,
                                                  self.scale_floor, ratio)
        if self.learn_scale and not rising and not s.started:  # the first step after the warmup
            s.started = True
            if self.radius_start and s.radius_ratio is not None:  # at least radius_start x the radius's rate
                s.scale.log_scale = min(LOG_SCALE_BOUND, s.scale.log_scale
                                        + max(0.0, math.log(self.radius_start * s.radius_ratio)))
        if self.use_controller and self.learn_controller:
            heads = [LR_HEAD, RADIUS_HEAD] if s.clipped else [LR_HEAD]
            self.controller.surrogate_gradients_(torch.tensor(s.prev_features), s.signal, heads)
            self.controller_opt.step()

    def _predict(self, loss: float, grad_norm: float | None) -> None:
        """Learned scale and controller -> multipliers written into every param group."""
        s = self.hybrid_state
        if not (self.use_controller or self.learn_scale):
            return  # the multipliers are whatever the param groups hold (1 unless set from outside)
        log_lr, radius_multiplier = s.scale.log_scale, 1.0
        if self.use_controller:
            s.features = update_feature_stats(s.features, loss, grad_norm)
            raw = training_state(s.features, s.step, s.cluster_id, self.num_clusters).features()
            x = self.controller.observe(raw)
            lr_correction, radius_multiplier = self.controller.multipliers(x)
            b = self.controller_smoothing
            s.correction = b * s.correction + (1 - b) * math.log(lr_correction)
            log_lr += s.correction
            s.prev_features = x.tolist()
        for group in self.param_groups:
            group["lr_multiplier"], group["radius_multiplier"] = math.exp(log_lr), radius_multiplier

    def _orthogonalizes(self, p: torch.Tensor, group: dict) -> bool:
        """p takes Muon's direction: base "muon", a matrix, in a group that does not opt out."""
        return self.base == "muon" and p.dim() == 2 and group["orthogonalize"]

    def _init_state(self, pairs: list) -> None:
        """Creates the per-tensor state of tensors updated for the first time, and counts this step in each."""
        for p, group in pairs:
            st = self.state[p]
            if "step" not in st:
                st["step"] = 0
                if self.base == "schedulefree":
                    st["z"] = p.detach().clone()
                else:
                    st["exp_avg"] = torch.zeros_like(p)  # Muon's and SGD's momentum buffer, or Adam's first moment
                if self.base != "sgd" and not self._orthogonalizes(p, group):
                    st["exp_avg_sq"] = torch.zeros_like(p)
            if "update" not in st:
                st["update"] = torch.zeros_like(p)
            st["step"] += 1

    @property
    def _fuses(self) -> bool:
        """The compiled `fused_step_` covers this step (see `compile`)."""
        return (self._fused is not None and self.base in ("adam", "schedulefree")
                and (not self.use_trust_region or self.trust_mode == "global")
                and len({tuple(g["betas"]) for g in self.param_groups}) == 1)

    def _fused_step(self, pairs: list) -> tuple[Tensors, torch.Tensor | None]:
        """u_t, the trust-region factor and the step through the compiled `fused_step_`: the per-tensor
        coefficients (bias corrections, rate, weight decay, Schedule-Free's weights) as one tensor, so a new
        rate does not recompile."""
        rows, params = [], []
        for group in self.param_groups:
            group_params = [p for p, g in pairs if g is group]
            if not group_params:
                continue
            beta1, beta2 = group["betas"]
            rate = -group["lr"] * group["lr_multiplier"]
            c = weight = 0.0
            if self.base == "schedulefree":
                c, group["weight_sum"], group["lr_max"] = averaging_weight(group["weight_sum"], group["lr_max"], -rate)
                weight = 1 - beta1 * (1 - c)
            for p in group_params:
                n = self.state[p]["step"]
                bias2_sqrt = math.sqrt(1 - beta2 ** n)
                direction = rate * bias2_sqrt / (1 - beta1 ** n if self.base == "adam" else 1.0)
                rows.append((group["eps"] * bias2_sqrt, direction, rate * group["weight_decay"], c, weight))
            params += group_params
        dtype = reduction_dtype(params)
        device = params[0].device
        states = [self.state[p] for p in params]
        group = self.param_groups[0]
        radius_row = (group["trust_radius"] * group["radius_multiplier"], 0.0, 0.0, 0.0, 0.0)  # one copy to the device
        coefs = _host_values(rows + [radius_row], dtype, device)
        updates = [st["update"] for st in states]
        ratio = self._fused(params, [p.grad for p in params],
                            [st["exp_avg"] for st in states] if self.base == "adam" else None,
                            [st["exp_avg_sq"] for st in states], updates,
                            [st["z"] for st in states] if self.base == "schedulefree" else None,
                            coefs[:-1], coefs[-1, 0] if self.use_trust_region else None, tuple(group["betas"]))
        if not self.use_trust_region:
            return updates, None
        self._trust_factor = ratio
        return updates, ratio.clamp_max(1.0)

    def _updates(self, pairs: list) -> Tensors:
        """u_t for every tensor, group by group, in its `update` buffer (the state made by `_init_state`)."""
        updates = []
        for group in self.param_groups:
            params = [p for p, g in pairs if g is group]
            if not params:
                continue
            grads, states = [p.grad for p in params], [self.state[p] for p in params]
            out = [st["update"] for st in states]
            rate = -group["lr"] * group["lr_multiplier"]
            if self.base == "muon":  # Muon on the matrices, Adam on the rest
                mask = [self._orthogonalizes(p, group) for p in params]
                (out_m, out_a), (grads_m, grads_a), (states_m, states_a) = (_split(x, mask) for x in (out, grads, states))
                if out_m:
                    muon_updates_(out_m, grads_m, [st["exp_avg"] for st in states_m], self.muon_momentum, rate)
                if out_a:
                    adam_updates_(out_a, grads_a, [st["exp_avg"] for st in states_a],
                                  [st["exp_avg_sq"] for st in states_a], [st["step"] for st in states_a],
                                  group["betas"], group["eps"], rate)
            elif self.base == "adam":
                adam_updates_(out, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                              [st["step"] for st in states], group["betas"], group["eps"], rate)
            elif self.base == "schedulefree":
                schedulefree_updates_(out, grads, [st["exp_avg_sq"] for st in states], [st["step"] for st in states],
                                      group["betas"][1], group["eps"], rate)
            else:
                momentum_updates_(out, grads, [st["exp_avg"] for st in states], group["betas"][0], rate)
            if group["weight_decay"]:  # decoupled: - lr m wd theta
                torch._foreach_add_(out, params, alpha=rate * group["weight_decay"])
            updates += out
        return updates

    def _trust_region(self, updates: Tensors, pairs: list) -> torch.Tensor | None:
        """The trust-region factor, without a host sync: the global one (a 0-d tensor, applied with the update),
        or, per tensor, None after scaling each `updates[i]` in place by its own."""
        params = [p for p, _ in pairs]
        if self.trust_mode == "global":
            group = self.param_groups[0]
            self._trust_factor = radius_ratio(updates, params, group["trust_radius"] * group["radius_multiplier"])
            return self._trust_factor.clamp_max(1.0)
        self._trust_factor = tensor_trust_factors(updates, params,
                                                  [g["trust_radius"] * g["radius_multiplier"] for _, g in pairs])
        torch._foreach_mul_(updates, list(self._trust_factor.unbind()))
        return None

    def _remember_prediction(self, pairs: list, updates: Tensors, factor: torch.Tensor | None, loss: float) -> None:
        """With adapt_radius: -g . Delta theta and L of this step, for the next step's ratio (a second sync)."""
        s = self.hybrid_state
        self._settle()
        predicted = dot([p.grad for p, _ in pairs], updates)
        s.prev_predicted_decrease = -float(predicted if factor is None else predicted * factor)
        s.prev_loss = loss if math.isfinite(loss) else None

    # ------------------------------------------------------------------ reporting and state
    @property
    def lr_multiplier(self) -> float:
        """The current learning-rate multiplier e^{\\ell + c} of the first group (no host sync, unlike `summary`)."""
        return self.param_groups[0]["lr_multiplier"]

    def summary(self) -> dict:
        """Figures of the run so far (the design document's summary block), from the first param group.

        Keys: total_steps, avg_lr_multiplier, learned_scale (e^\\ell), constraint_activation_rate,
        trust_radius (the radius times the learned multiplier), lr_multiplier, skipped_steps, clipped (the
        last update was clipped).
        """
        self._settle()
        s, group = self.hybrid_state, self.param_groups[0]
        steps = max(1, s.step)
        return {"total_steps": s.step, "avg_lr_multiplier": s.lr_multiplier_sum / steps,
                "learned_scale": math.exp(s.scale.log_scale), "constraint_activation_rate": s.clipped_steps / steps,
                "trust_radius": group["trust_radius"] * group["radius_multiplier"],
                "lr_multiplier": group["lr_multiplier"], "skipped_steps": s.skipped_steps, "clipped": s.clipped}

    def state_dict(self) -> dict:
        self._settle()
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        pending = None if self._pending_factor is None else float(self._pending_factor)
        sd["hybrid"] = {"state": dataclasses.asdict(self.hybrid_state), "controller": self.controller.state_dict(),
                        "controller_opt": self.controller_opt.state_dict(),
                        "moved": [index[id(p)] for p in self._moved], "pending_factor": pending}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        hybrid = state_dict.pop("hybrid")
        super().load_state_dict(state_dict)
        saved = {k: v for k, v in hybrid["state"].items() if k not in RETIRED_STATE_KEYS}
        saved.setdefault("started", saved.get("step", 0) > 0)  # saved before radius_start: not at a resume
        self.hybrid_state = HybridState(**{**saved, "features": FeatureStats(**saved["features"]),
                                           "scale": ScaleState(**saved.get("scale", {}))})
        self._trust_factor = None
        self.controller.load_state_dict(hybrid["controller"])
        self.controller_opt.load_state_dict(hybrid["controller_opt"])
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:  # saved before the `update` buffer: the gamma-0 trace was the last applied update
            st = self.state.get(p, {})
            if not self.trace_decay and "trace" in st and "update" not in st:
                st["update"] = st.pop("trace")
        moved = hybrid.get("moved")
        self._moved = ([params[i] for i in moved] if moved is not None
                       else [p for p in params if "update" in self.state.get(p, {})])
        pending = hybrid.get("pending_factor")
        dtype = reduction_dtype(params)
        self._pending_factor = None if pending is None else torch.tensor(pending, dtype=dtype, device=params[0].device)


def _host_values(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers as a tensor on `device`; to a GPU through pinned memory without blocking, so the step keeps
    its one host sync."""
    values = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _split(xs: list, mask: list[bool]) -> tuple[list, list]:
    """(the items where mask is True, the others), in order."""
    return [x for x, m in zip(xs, mask) if m], [x for x, m in zip(xs, mask) if not m]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
