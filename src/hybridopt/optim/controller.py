"""The meta-learned controller (the design document's auxiliary network): training-state features in, a
learning-rate multiplier and a trust-radius multiplier out, trained online from hypergradients; and the running
statistics of the optimizer that make its features.

Features (`TrainingState.features`, 6 values, each normalised by running statistics and clipped to
[-5, 5] so the network never saturates): log loss, log gradient norm, loss trend (EMA of the change in
log loss), log gradient-norm variance, log step, and the data cluster of the batch (0 when unknown).

Outputs are log multipliers `a = (log m_lr, log m_radius)`, clamped to [log 0.1, log 10] in the forward
pass with a straight-through gradient, plus a quadratic pull back inside the bounds, so a saturated
output can always come back (it never sticks at a bound).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

LOG_BOUND = math.log(10.0)
NUM_FEATURES = 6
LR_HEAD, RADIUS_HEAD = 0, 1  # output indices: log learning-rate multiplier, log trust-radius multiplier


@dataclass
class TrainingState:
    """What the controller sees at one step (the design document's `TrainingState`)."""

    loss: float
    gradient_magnitude: float
    loss_trend: float = 0.0
    gradient_variance: float = 0.0
    step: int = 0
    cluster_id: int | None = None
    num_clusters: int = 0

    def features(self) -> torch.Tensor:
        """Raw (unnormalised) feature vector, shape `(6,)`."""
        cluster = 0.0 if self.cluster_id is None or not self.num_clusters else (self.cluster_id + 1) / self.num_clusters
        return torch.tensor([
            math.log(max(self.loss, 1e-8)) if math.isfinite(self.loss) else 0.0,
            math.log(max(self.gradient_magnitude, 1e-12)),
            self.loss_trend,
            math.log(max(self.gradient_variance, 1e-12)),
            math.log1p(self.step),
            cluster,
        ], dtype=torch.float32)


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


class RunningNorm(nn.Module):
    """Exponential running mean/variance of feature vectors; `forward` standardises and clips."""

    def __init__(self, dim: int, beta: float = 0.99):
        super().__init__()
        self.beta = beta
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if self.count == 0:
            self.mean.copy_(x)
        else:
            delta = x - self.mean
            self.mean.add_(delta, alpha=1 - self.beta)
            self.var.mul_(self.beta).add_(delta * delta, alpha=1 - self.beta)
        self.count.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / (self.var.sqrt() + 1e-3)).clamp(-5.0, 5.0)


class AuxiliaryNN(nn.Module):
    """6 -> hidden -> 2 MLP predicting log learning-rate and log trust-radius multipliers.

    The output layer starts at zero, so an untrained controller predicts multipliers of exactly 1.
    """

    def __init__(self, hidden_size: int = 16):
        super().__init__()
        self.norm = RunningNorm(NUM_FEATURES)
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def raw(self, features: torch.Tensor) -> torch.Tensor:
        """Unclamped log multipliers `(..., 2)` for normalised features."""
        return self.net(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log multipliers clamped to [log 0.1, log 10], straight-through outside the bounds."""
        return self.clamp(self.raw(features))

    @staticmethod
    def clamp(z: torch.Tensor) -> torch.Tensor:
        """Clamp raw outputs to the bounds in the forward pass, identity gradient (it never sticks)."""
        return z + (z.clamp(-LOG_BOUND, LOG_BOUND) - z).detach()

    @torch.no_grad()
    def observe(self, raw: torch.Tensor) -> torch.Tensor:
        """Update the running feature statistics with `raw` `(6,)` and return it normalised."""
        self.norm.update(raw)
        return self.norm(raw)

    @torch.no_grad()
    def multipliers(self, features: torch.Tensor) -> tuple[float, float]:
        """`(lr multiplier, radius multiplier)` for normalised features `(6,)`."""
        a = self(features)
        return math.exp(a[LR_HEAD].item()), math.exp(a[RADIUS_HEAD].item())

    def surrogate(self, features: torch.Tensor, signal: float, heads: Sequence[int]) -> torch.Tensor:
        """Scalar whose gradient is the hypergradient `signal` on each output in `heads` at `features` `(6,)`,
        plus the bound penalty; one optimizer step on it is one step of hypergradient descent."""
        z = self.raw(features)
        a = self.clamp(z)
        return signal * sum(a[k] for k in heads) + self.bound_penalty(z)

    @torch.no_grad()
    def surrogate_gradients_(self, features: torch.Tensor, signal: float, heads: Sequence[int]) -> None:
        """Set each parameter's `.grad` to the gradient of `surrogate(features, signal, heads)`, by hand.

        The network is two layers, so the chain rule is a handful of tensor ops, which avoids building an
        autograd graph at every optimizer step. `surrogate` stays the definition (the reference implementation
        in tests differentiates it with autograd).
        """
        first, second = self.net[0], self.net[2]
        hidden = torch.tanh(torch.addmv(first.bias, first.weight, features))
        z = torch.addmv(second.bias, second.weight, hidden)
        dz = 2 * torch.relu(z.abs() - LOG_BOUND) * z.sign()  # the bound penalty
        for k in heads:  # the clamp passes the gradient straight through
            dz[k] += signal
        dpre = (second.weight.t() @ dz) * (1 - hidden * hidden)
        second.weight.grad, second.bias.grad = torch.outer(dz, hidden), dz
        first.weight.grad, first.bias.grad = torch.outer(dpre, features), dpre

    def predict(self, state: TrainingState) -> tuple[float, float]:
        """`(lr multiplier, radius multiplier)` for one training state (does not update statistics)."""
        return self.multipliers(self.norm(state.features()))

    def predict_learning_rate(self, state: TrainingState) -> float:
        """The design document's API: the learning-rate multiplier for `state`.

        An untrained controller returns exactly 1; `HybridOptimizer` trains it online and multiplies the
        scheduled learning rate by this value.
        """
        return self.predict(state)[0]

    def predict_trust_radius(self, state: TrainingState) -> float:
        """The trust-radius multiplier for `state`."""
        return self.predict(state)[1]

    @staticmethod
    def bound_penalty(z: torch.Tensor) -> torch.Tensor:
        """Quadratic pull back inside [-log 10, log 10] for raw outputs beyond the bounds."""
        return (torch.relu(z.abs() - LOG_BOUND) ** 2).sum()
