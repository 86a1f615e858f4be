r"""HybridOptimizer: Adam (or SGD-momentum) with a meta-learned learning rate and a trust region.

At step t, for each tensor \theta_t with gradient g_t, base direction d_t (Adam's bias-corrected
\hat m_t / (\sqrt{\hat v_t} + \epsilon), or the momentum buffer b_t = \beta_1 b_{t-1} + g_t), group learning
rate \eta and weight decay \lambda (any LR scheduler changes \eta), and controller outputs
a_t = (\log m_t, \log r_t) clamped to [\log 0.1, \log 10]:

    u_t = -\eta e^{a_{t,1}} (d_t + \lambda \theta_t)                       (decoupled weight decay)
    \mu_t = \rho_t e^{a_{t,2}} \max(\|\theta_t\|_2, 10^{-3})                  (scale-free radius)
    \Delta\theta_t = u_t \min(1, \mu_t / \|u_t\|_2)                         (trust region, global norm)

where the norms run over all parameters that have a gradient. `trust_mode="per_tensor"` bounds each
tensor i separately: \|\Delta\theta^i_t\|_2 \le \rho_t e^{a_{t,2}} \max(\mathrm{rms}(\theta^i_t), 10^{-3}) \sqrt{n_i}.

The controller learns online from hypergradients (Baydin et al. 2018, "Online Learning Rate
Adaptation with Hypergradient Descent"): since \Delta\theta_{t-1} is proportional to
e^{a_{t-1,1}} when the trust region does not bind,

    \partial L_t / \partial a_{t-1,1} = g_t \cdot \Delta\theta_{t-1}.

Two devices address minibatch noise and the short-horizon bias (greedy one-step hypergradients are
known to shrink the learning rate too early; Wu et al. 2018, "Understanding Short-Horizon Bias in
Stochastic Meta-Optimization"):

* noise and scale: the hypergradient is normalised to a cosine and smoothed by an EMA,
  h_t = \beta_h h_{t-1} + (1 - \beta_h) \cos(g_t, s_{t-1}) with \beta_h = `signal_ema`;
* an optional trace of recent updates, s_t = \gamma s_{t-1} + \Delta\theta_t (`trace_decay`), credits a
  learning rate shared by the last ~1/(1-\gamma) steps instead of the last step alone (\gamma = 0 is
  Baydin's rule, s_t = \Delta\theta_t). The default is \gamma = 0: on the default distillation run the
  trace did not help (the measured comparison is in docs/RESULTS.md), so it stays available for longer runs.

The controller takes one Adam step (`controller_lr`) on the surrogate h_t a_{t-1,k}(x_{t-1}) plus a
quadratic pull back inside the clamp bounds, where x_{t-1} are the features it saw at the last update.
Steps on which the trust region clipped the update are *masked* for the learning-rate head (k = 1: the
learning rate did not set the step length, so it gets neither credit nor blame); their signal trains
the radius head instead (k = 2: \partial L / \partial a_{t-1,2} is the same cosine while the constraint binds).

The base radius \rho_t (`trust_radius`, in each param group) adapts as the design document's trust
region when `adapt_radius=True`: with the ratio of actual to first-order predicted loss decrease,
r_t = (L_{t-1} - L_t) / (-g_{t-1} \cdot \Delta\theta_{t-1}), smoothed as \bar r_t = 0.9 \bar r_{t-1} + 0.1 r_t,
\rho \leftarrow \min(1, 1.5\rho) when \bar r_t > 0.75 and \rho \leftarrow \max(10^{-4}, 0.7\rho) when
\bar r_t < 0.25, both only after a step the constraint clipped (it needs the loss, passed to
`step(loss=...)` or returned by the closure). It is off by default: on minibatches the actual decrease is
dominated by batch-to-batch noise, so the rule shrinks the radius until training stalls; the learned
radius head adapts the radius instead. A non-finite loss or gradient skips the step and leaves every
tensor untouched. Without `adapt_radius` that is all (\rho stays what the user set). With it, a non-finite
L_t or g_t counts as the worst outcome of the update that led to \theta_t, so it halves \rho, as a trust
region shrinks after a failed step; the rule above grows \rho back by 1.5 per good clipped step, so the
shrinking is not for good. Before the first update no step led there, and \rho is left alone.

Where things live (the schedule_free shape): hyperparameters in the param groups (`lr`, `betas`, `eps`,
`weight_decay`, `trust_radius`, and the controller's `lr_multiplier` and `radius_multiplier`, which it
writes there every step); per-tensor state in `self.state[p]` (`exp_avg`, `exp_avg_sq`, `step`, `trace`);
optimizer-wide scalars in `HybridState`; the controller is its own module. The controller adds no forward
or backward pass of the model: a few dot products and norms per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from hybridopt.controller import LR_HEAD, RADIUS_HEAD, AuxiliaryNN, TrainingState

MIN_RADIUS, MAX_RADIUS = 1e-4, 1.0
MIN_NORM = 1e-3  # floor of the reference norm, so parameters at zero can still move


# ---------------------------------------------------------------------------- pure update functions
def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Adam's \\hat m / (\\sqrt{\\hat v} + eps) at `step` (1-based); updates the moment buffers in place."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(eps)
    return exp_avg / (1 - beta1 ** step) / denom


def momentum_direction(grad: torch.Tensor, buffer: torch.Tensor, beta1: float) -> torch.Tensor:
    """Heavy-ball direction b = beta1 b + g (a new tensor); updates the buffer in place."""
    return buffer.mul_(beta1).add_(grad).clone()


def scaled_update_(direction: torch.Tensor, param: torch.Tensor, lr: float, lr_multiplier: float,
                   weight_decay: float) -> torch.Tensor:
    """u = -lr m_lr (d + wd theta), in place on `direction`."""
    if weight_decay:
        direction.add_(param, alpha=weight_decay)
    return direction.mul_(-lr * lr_multiplier)


def global_norm(tensors: Iterable[torch.Tensor]) -> float:
    """\\|(t_1, ..., t_n)\\|_2 as a Python float."""
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


def global_trust_scale(updates: list[torch.Tensor], params: list[torch.Tensor], radius: float) -> float | None:
    """Factor bringing \\|u\\| down to radius max(\\|theta\\|, 1e-3), or None when the update is inside."""
    limit = radius * max(global_norm(params), MIN_NORM)
    unorm = global_norm(updates)
    return limit / unorm if unorm > limit else None


def tensor_trust_scale(update: torch.Tensor, param: torch.Tensor, radius: float) -> float | None:
    """Per-tensor factor: the bound is radius max(rms(theta), 1e-3) sqrt(n); None when inside."""
    limit = radius * max(float(param.pow(2).mean().sqrt()), MIN_NORM) * math.sqrt(param.numel())
    n = float(update.norm())
    return limit / n if n > limit else None


def hypergradient_cosine(grads: list[torch.Tensor], traces: list[torch.Tensor], grad_norm: float) -> float:
    """cos(g_t, s_{t-1}) over all tensors, the normalised hypergradient of the log learning rate."""
    dot = sum(torch.vdot(g.flatten(), s.flatten()) for g, s in zip(grads, traces))
    return float(dot) / (grad_norm * global_norm(traces) + 1e-12)


def ema(average: float, value: float, decay: float) -> float:
    """decay * average + (1 - decay) * value."""
    return decay * average + (1 - decay) * value


def predicted_decrease(grads: list[torch.Tensor], updates: list[torch.Tensor]) -> float:
    """First-order predicted loss decrease of an update, -g . Delta theta (in float32 at least)."""
    return -sum(float(torch.vdot(g.flatten().float(), u.flatten().float())) for g, u in zip(grads, updates))


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
    """Running statistics behind the controller's loss-trend and gradient-variance features."""

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


def training_state(stats: FeatureStats, loss: float, grad_norm: float, step: int, cluster_id: int | None,
                   num_clusters: int) -> TrainingState:
    """What the controller sees (a missing or non-finite loss reads as 1)."""
    return TrainingState(loss=loss if math.isfinite(loss) else 1.0, gradient_magnitude=grad_norm,
                         loss_trend=stats.loss_trend,
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
    cluster_id: int | None = None  # data cluster of the next batch, from `set_cluster`
    signal: float = 0.0  # h_t, the smoothed normalised hypergradient
    prev_features: list[float] | None = None  # x_{t-1}, the controller input at the last update
    features: FeatureStats = field(default_factory=FeatureStats)
    prev_loss: float | None = None  # with adapt_radius: L_{t-1}
    prev_predicted_decrease: float | None = None  # with adapt_radius: -g_{t-1} . Delta theta_{t-1}
    ratio_ema: float | None = None  # with adapt_radius: smoothed actual / predicted decrease


class HybridOptimizer(torch.optim.Optimizer):
    """Meta-learned learning rate and trust region over an Adam or SGD-momentum direction.

    Args:
        params: parameters or param groups (a group may set its own `lr`, `weight_decay`, `trust_radius`).
        lr: base learning rate (schedulers scale it; the controller multiplies it).
        betas: Adam betas (beta1 is the momentum of `base="sgd"`).
        eps: Adam epsilon.
        weight_decay: decoupled weight decay.
        base: "adam" or "sgd".
        use_controller: learn multipliers with the auxiliary network; False fixes them at exactly 1.
        learn_controller: update the controller online; False freezes it (ablation).
        use_trust_region: bound the update norm.
        trust_radius: initial radius, relative to the parameter norm (global) or tensor RMS (per tensor).
        trust_mode: "global" (one bound on all parameters: every group needs the same radius) or "per_tensor".
        adapt_radius: adapt the radius from actual vs predicted decrease (off by default, see above).
        controller_lr: Adam learning rate of the auxiliary network.
        controller_hidden: hidden width of the auxiliary network.
        trace_decay: gamma of the update trace (0, the default, is Baydin's one-step hypergradient).
        signal_ema: smoothing of the normalised hypergradient.
        num_clusters: number of data clusters (for the cluster feature), 0 if none.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, base: str = "adam", use_controller: bool = True,
                 learn_controller: bool = True, use_trust_region: bool = True, trust_radius: float = 0.1,
                 trust_mode: str = "global", adapt_radius: bool = False, controller_lr: float = 1e-3,
                 controller_hidden: int = 16, trace_decay: float = 0.0, signal_ema: float = 0.9,
                 num_clusters: int = 0):
        _check(lr > 0, f"lr must be positive, got {lr}")
        _check(all(0 <= b < 1 for b in betas) and len(betas) == 2, f"betas must be two numbers in [0, 1), got {betas}")
        _check(eps >= 0 and weight_decay >= 0, f"eps and weight_decay must be >= 0, got {eps} and {weight_decay}")
        _check(base in ("adam", "sgd"), f"base must be 'adam' or 'sgd', got {base!r}")
        _check(trust_mode in ("global", "per_tensor"), f"trust_mode must be 'global' or 'per_tensor', got {trust_mode!r}")
        _check(controller_lr > 0 and controller_hidden >= 1,
               f"controller_lr must be positive and controller_hidden at least 1, got {controller_lr} and {controller_hidden}")
        _check(0 <= trace_decay < 1 and 0 <= signal_ema < 1,
               f"trace_decay and signal_ema must be in [0, 1), got {trace_decay} and {signal_ema}")
        _check(num_clusters >= 0, f"num_clusters must be >= 0, got {num_clusters}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_radius=trust_radius,
                                      lr_multiplier=1.0, radius_multiplier=1.0))
        self.base, self.trust_mode = base, trust_mode
        self.use_controller, self.learn_controller = use_controller, learn_controller
        self.use_trust_region, self.adapt_radius = use_trust_region, adapt_radius
        self.trace_decay, self.signal_ema, self.num_clusters = trace_decay, signal_ema, num_clusters
        self.controller = AuxiliaryNN(controller_hidden)
        self.controller_opt = torch.optim.Adam(self.controller.parameters(), lr=controller_lr)
        self.hybrid_state = HybridState()

    @property
    def _learns(self) -> bool:
        return self.use_controller and self.learn_controller

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
        loss_value = float(loss) if loss is not None else math.nan
        self._check_radii()
        pairs = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        params, grads = [p for p, _ in pairs], [p.grad for p, _ in pairs]
        grad_norm = global_norm(g.float() for g in grads)  # squared in float32: half precision overflows
        if not math.isfinite(grad_norm) or (loss is not None and not math.isfinite(loss_value)):
            self._skip()
            return loss
        if self._adapts_radius and math.isfinite(loss_value):
            self._adapt_radius(loss_value)
        if self._learns and self.hybrid_state.step > 0:
            self._learn(grads, [self.state[p].get("trace") for p in params], grad_norm)
        if self.use_controller:
            self._predict(loss_value, grad_norm)
        self.hybrid_state.step += 1
        updates = [self._update(p, group) for p, group in pairs]  # u_t, before the trust region
        clipped = self._trust_region_(updates, pairs) if self.use_trust_region else False
        self._record(clipped, grads, updates, loss_value)
        for p, u in zip(params, updates):
            p.add_(u)
        if self._learns:  # s_t = gamma s_{t-1} + Delta theta_t, for the next step's hypergradient
            for p, u in zip(params, updates):
                st = self.state[p]
                if "trace" not in st:  # first update of this tensor
                    st["trace"] = torch.zeros_like(p)
                st["trace"].mul_(self.trace_decay).add_(u)
        return loss

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

    def _learn(self, grads: list[torch.Tensor], traces: list[torch.Tensor | None], grad_norm: float) -> None:
        """One controller step on the surrogate h_t a_{t-1,k}(x_{t-1})."""
        s = self.hybrid_state
        # A tensor without a trace has not been updated yet: its trace is zero and adds nothing.
        moved = [(g, t) for g, t in zip(grads, traces) if t is not None]
        cos = hypergradient_cosine([g for g, _ in moved], [t for _, t in moved], grad_norm)
        s.signal = ema(s.signal, cos, self.signal_ema)
        head = RADIUS_HEAD if s.clipped else LR_HEAD  # masking: the head that set the last step's length
        with torch.enable_grad():
            surrogate = self.controller.surrogate(torch.tensor(s.prev_features), s.signal, head)
            self.controller_opt.zero_grad(set_to_none=True)
            surrogate.backward()
        self.controller_opt.step()

    def _predict(self, loss: float, grad_norm: float) -> None:
        """Features of this step -> controller -> multipliers written into every param group."""
        s = self.hybrid_state
        s.features = update_feature_stats(s.features, loss, grad_norm)
        raw = training_state(s.features, loss, grad_norm, s.step, s.cluster_id, self.num_clusters).features()
        x = self.controller.observe(raw)
        lr_multiplier, radius_multiplier = self.controller.multipliers(x)
        for group in self.param_groups:
            group["lr_multiplier"], group["radius_multiplier"] = lr_multiplier, radius_multiplier
        s.prev_features = x.tolist()

    def _update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """u_t for one tensor; creates and updates its state."""
        st = self.state[p]
        if "step" not in st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            if self.base == "adam":
                st["exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        if self.base == "adam":
            d = adam_direction(p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], group["betas"], group["eps"])
        else:
            d = momentum_direction(p.grad, st["exp_avg"], group["betas"][0])
        return scaled_update_(d, p, group["lr"], group["lr_multiplier"], group["weight_decay"])

    def _trust_region_(self, updates: list[torch.Tensor], pairs: list[tuple[torch.Tensor, dict]]) -> bool:
        """Scale `updates` into the trust region in place; return whether any was clipped."""
        if self.trust_mode == "global":
            mu = self.param_groups[0]["trust_radius"] * self.param_groups[0]["radius_multiplier"]
            scale = global_trust_scale(updates, [p for p, _ in pairs], mu)
            if scale is not None:
                torch._foreach_mul_(updates, scale)
            return scale is not None
        clipped = False
        for u, (p, group) in zip(updates, pairs):
            scale = tensor_trust_scale(u, p, group["trust_radius"] * group["radius_multiplier"])
            if scale is not None:
                u.mul_(scale)
                clipped = True
        return clipped

    def _record(self, clipped: bool, grads: list[torch.Tensor], updates: list[torch.Tensor], loss: float) -> None:
        s = self.hybrid_state
        s.clipped = clipped
        s.clipped_steps += int(clipped)
        s.lr_multiplier_sum += self.param_groups[0]["lr_multiplier"]
        if self._adapts_radius:  # the only reader of the predicted decrease
            s.prev_predicted_decrease = predicted_decrease(grads, updates)
            s.prev_loss = loss if math.isfinite(loss) else None

    # ------------------------------------------------------------------ reporting and state
    def summary(self) -> dict:
        """Figures of the run so far (the design document's summary block), from the first param group.

        Keys: total_steps, avg_lr_multiplier, constraint_activation_rate, trust_radius (the radius times the
        learned multiplier), lr_multiplier, skipped_steps, clipped (the last update was clipped).
        """
        s, group = self.hybrid_state, self.param_groups[0]
        steps = max(1, s.step)
        return {"total_steps": s.step, "avg_lr_multiplier": s.lr_multiplier_sum / steps,
                "constraint_activation_rate": s.clipped_steps / steps,
                "trust_radius": group["trust_radius"] * group["radius_multiplier"],
                "lr_multiplier": group["lr_multiplier"], "skipped_steps": s.skipped_steps, "clipped": s.clipped}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["hybrid"] = {"state": dataclasses.asdict(self.hybrid_state), "controller": self.controller.state_dict(),
                        "controller_opt": self.controller_opt.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        hybrid = state_dict.pop("hybrid")
        super().load_state_dict(state_dict)
        saved = dict(hybrid["state"])
        self.hybrid_state = HybridState(**{**saved, "features": FeatureStats(**saved["features"])})
        self.controller.load_state_dict(hybrid["controller"])
        self.controller_opt.load_state_dict(hybrid["controller_opt"])


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
