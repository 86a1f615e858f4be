r"""The learned scale: hypergradient descent on the log learning rate \ell (Baydin et al. 2018, "Online Learning
Rate Adaptation with Hypergradient Descent", in its multiplicative form), with the hypergradient normalised the
way Adam normalises a gradient, so that the step of \ell depends on neither the size of the loss, the gradients
nor the learning rate given:

    h_t = g_t \cdot \Delta\theta_{t-1}   (= \partial L_t / \partial \ell_{t-1})
    m_t = \beta_a m_{t-1} + (1 - \beta_a) h_t,   v_t = \beta_b v_{t-1} + (1 - \beta_b) h_t^2
    \sigma_t = \hat m_t / (\sqrt{\hat v_t} + 10^{-30})
    \ell_{t+1} = \mathrm{clip}(\ell_t - \kappa \sigma_t, [\log m, \log 10^4])   if |\sigma_t| > \tau_t, else \ell_t

with \hat{} Adam's bias corrections and \tau_t = \tau `threshold_growth`(count): the threshold widens by the
factor by which noise spreads \sigma over few hypergradients. Over Schedule-Free \Delta\theta is z's step:
\partial L(y_t) / \partial \log \eta_{t-1} is h_t times (1 - \beta_1 + \beta_1 \alpha_t) > 0, and \sigma does not
depend on that factor's size. Why each piece (evidence: docs/RESULTS.md):

- The threshold: for zero-mean hypergradients |\sigma| is about \sqrt{(1 - \beta_a) / (1 + \beta_a)}, below
  \tau = 0.5 nearly always, so \ell moves on consistent evidence only, not on the noise near a good rate.
- Over Schedule-Free m = 1 (the scale is one-sided: it may raise a too-low rate, never lower the given one):
  under a constant rate z's consecutive steps oscillate, so the one-step hypergradient keeps calling the rate
  too high while the average x already does what a lower rate would.
- While the first group's lr rises (a warmup) \ell is held and the moments are reset at every step: early
  updates agree with each other, and a scale grown on top of the warmup overshoots once it ends.
- `radius_start` q: at the first step after the warmup \ell rises by \max(0, \log(q \rho \max(\|\theta\|, 10^{-3})
  / \|u\|)) (the global trust region's last ratio), so a rate far below the one whose step fills the radius starts
  at q times that rate instead of climbing there at e^\kappa per step.
- After a clipped step (its length was the radius's, not the rate's) \sigma is replaced by \max(\sigma, 0): a
  rate that is too high still shrinks while the trust region holds the steps, but a rate the trust region
  overrides cannot grow without bound. A lowering then starts from the rate whose step the radius allowed,
  \ell + \log(\rho \max(\|\theta\|, 10^{-3}) / \|u\|), so it shortens the next step at once.

The signal is greedy (one step ahead): under a decaying schedule it pushes \ell up against the decay (the
short-horizon bias of Wu et al. 2018, "Understanding Short-Horizon Bias in Stochastic Meta-Optimization").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

LOG_SCALE_BOUND = math.log(1e4)  # the learned scale stays within 1e-4x ... 1e4x the given lr

Tensors = list[torch.Tensor]


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


def stepped_log_scale(state: ScaleState, signal: float, clipped: bool, radius_ratio: float | None, scale_lr: float,
                      threshold: float, floor: float, beta: float) -> float:
    """\\ell after the hypergradient whose moments `state` holds and whose normalised value is `signal`.

    After a clipped step (`clipped`) only a lowering counts, from the rate whose step the radius allowed
    (`radius_ratio`, the global trust region's radius / \\|u\\|; None: per tensor, from \\ell itself).
    """
    sigma = max(signal, 0.0) if clipped else signal
    tau = threshold * threshold_growth(state.count, beta)
    ratio = radius_ratio if clipped and radius_ratio is not None else 1.0
    return learned_log_scale(state.log_scale, sigma, scale_lr, tau, floor, ratio)


def started_log_scale(log_scale: float, radius_start: float, radius_ratio: float | None) -> float:
    """\\ell at the first step after the warmup: raised so that the last step would have been at least
    `radius_start` times the global trust radius long (unchanged without a ratio or with `radius_start` 0)."""
    if not (radius_start and radius_ratio is not None):
        return log_scale
    return min(LOG_SCALE_BOUND, log_scale + max(0.0, math.log(radius_start * radius_ratio)))


def forget_unmoved_(buffers: dict, moved: Tensors, params: Tensors) -> None:
    """A tensor the last step moved (`moved`) but this one does not (`params`): its \\Delta\\theta is 0 from now
    on, so its buffer (`buffers[p]["update"]`) is zeroed once."""
    now = {id(p) for p in params}
    idle = [buffers[p]["update"] for p in moved if id(p) not in now]
    if idle:
        torch._foreach_zero_(idle)
