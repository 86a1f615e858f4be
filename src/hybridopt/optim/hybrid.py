r"""HybridOptimizer: an Adam, Schedule-Free AdamW, Muon or SGD-momentum step with a learned step size, a
meta-learned controller and a trust region. This file holds the optimizer (its state and its step); the pieces
of the rule live in `updates.py`, `muon.py`, `scale.py`, `controller.py` and `trust_region.py`.

The rule. At step t, for the parameters \theta_t with gradients g_t, group learning rate \eta_t (any LR
scheduler sets it), weight decay \lambda and trust radius \rho_t:

    u_t = -\eta_t e^{\ell_t + c_t} (d_t + \lambda \theta_t)                (base update, decoupled weight decay)
    \mu_t = \rho_t e^{r_t} \max(\|\theta_t\|_2, 10^{-3})                     (radius, relative to the parameters)
    \Delta\theta_t = u_t \min(1, \mu_t / \|u_t\|_2)                         (trust-region clip)

with the norms over all parameters with a gradient (`trust_mode="per_tensor"`: per tensor, on its RMS times
\sqrt{n}). The base direction d_t is Adam's \hat m_t / (\sqrt{\hat v_t} + \epsilon); SGD's momentum
b_t = \beta_1 b_{t-1} + g_t; Muon's 0.2 \sqrt{\max(A, B)} O(g_t + \nu (b_t - g_t)) on A x B matrices (`muon.py`);
or Schedule-Free's g_t / (\sqrt{\hat v_t} + \epsilon). The learned scale \ell is normalised hypergradient
descent on the log learning rate (`scale.py`, which also states the threshold \tau_t, the hold during a
warmup, the one-sided step after a clipped step and `radius_start`):

    h_t = g_t \cdot s_{t-1},   s_t = \gamma s_{t-1} + \Delta\theta_t
    \sigma_t = \hat m_t / (\sqrt{\hat v_t} + 10^{-30})                       (\hat m, \hat v: Adam's moments of h)
    \ell_{t+1} = \mathrm{clip}(\ell_t - \kappa \sigma_t, [\log m, \log 10^4])   if |\sigma_t| > \tau_t, else \ell_t

The controller a (`controller.py`) maps training-state features x_t to (a_1, a_2)(x_t), each clamped to
[\log 0.1, \log 10]: c_t = b c_{t-1} + (1 - b) a_1(x_t) and r_t = a_2(x_t). It takes one Adam step on the
surrogate \sigma_t a_k(x_{t-1}), k = 1 every step and k = 2 after a clipped step. Over Schedule-Free the
parameters hold y, where gradients are taken; z takes the steps \Delta\theta_t and `eval()` loads the average x:

    z_{t+1} = z_t + \Delta\theta_t,   y = (1 - \beta_1) z + \beta_1 x
    y_{t+1} = y_t + \alpha_{t+1} (z_t - y_t) + (1 - \beta_1 (1 - \alpha_{t+1})) \Delta\theta_t
    \alpha_{t+1} = w_t / \sum_{i \le t} w_i,   w_t = (\max_{i \le t} \eta_i e^{\ell_i + c_i})^2

(\kappa `scale_lr`, m `min_scale`, \gamma `trace_decay`, b `controller_smoothing`, \nu `muon_momentum`.)
A non-finite loss or gradient skips the step. With `adapt_radius`, \rho_t follows the design document's
trust-region rule on actual against predicted decrease (`trust_region.py`).

References: Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient Descent" (ICLR);
Defazio et al. 2024, "The Road Less Scheduled" (Schedule-Free); Jordan et al. 2024, "Muon: An optimizer for
hidden layers in neural networks"; Kingma & Ba 2015, "Adam"; Loshchilov & Hutter 2019, "Decoupled Weight Decay
Regularization"; Conn, Gould & Toint 2000, "Trust-Region Methods" (and Nocedal & Wright, "Numerical
Optimization", ch. 4).

Where things live (the schedule_free shape): hyperparameters in the param groups (`lr`, `betas`, `eps`,
`weight_decay`, `trust_radius`; `lr_multiplier` e^{\ell + c} and `radius_multiplier` e^r written every step;
Schedule-Free's `weight_sum`, `lr_max`, `train_mode`); per-tensor state in `self.state[p]` (`exp_avg` or `z`,
`exp_avg_sq`, `step`, `update`, and `trace` when \gamma > 0); optimizer-wide scalars in `HybridState`; the
controller is its own module. No extra forward or backward pass of the model, and one host sync per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybridopt.optim.arguments import BASES, check, checked_arguments
from hybridopt.optim.controller import (LR_HEAD, RADIUS_HEAD, AuxiliaryNN, FeatureStats, training_state,
                                        update_feature_stats)
from hybridopt.optim.scale import (ScaleState, accumulate_trace_, forget_unmoved_, normalized_hypergradient,
                                   started_log_scale, stepped_log_scale, traces)
from hybridopt.optim.trust_region import (DTensor, adapted_radius, decrease_ratio_ema, dot, global_value, norms,
                                          shrunk_radius, trust_factors_)
from hybridopt.optim.updates import (eager_step_, eager_updates_, fused_step_, fused_updates_, init_state_,
                                     schedulefree_swap_)

Tensors = list[torch.Tensor]
RULE_VERSION = 10  # bumped with every change to what a step computes (names the hybrid-trained teachers' cache entries)
RETIRED_STATE_KEYS = frozenset({"rising"})  # HybridState fields older versions saved; dropped when loading


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

    @classmethod
    def from_saved(cls, saved: dict) -> HybridState:
        """The state `dataclasses.asdict` saved, from this or an older version."""
        saved = {k: v for k, v in saved.items() if k not in RETIRED_STATE_KEYS}
        saved.setdefault("started", saved.get("step", 0) > 0)  # saved before radius_start: not at a resume
        return cls(**{**saved, "features": FeatureStats(**saved["features"]),
                      "scale": ScaleState(**saved.get("scale", {}))})


class HybridOptimizer(torch.optim.Optimizer):
    """Learned step size, meta-learned controller and trust region over an Adam, Schedule-Free AdamW, Muon or
    SGD-momentum step (the rule is in the module docstring). About 300 lines, most of them this docstring's 24
    arguments: a wrapper over any torch optimizer, with fewer of its own, is the planned way down.

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
            over "schedulefree", on otherwise; docs/RESULTS.md says why).
        learn_controller: update the controller online; False freezes it at initialisation (outputs 0).
        use_trust_region: bound the update norm.
        trust_radius: initial radius, relative to the parameter norm (global) or tensor RMS (per tensor).
        trust_mode: "global" (one bound on all parameters: every group needs the same radius) or "per_tensor".
        adapt_radius: adapt the radius from actual vs predicted decrease (off by default: see `trust_region`).
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
        min_scale, use_controller, radius_start = checked_arguments(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, base=base, scale_lr=scale_lr,
            scale_betas=scale_betas, scale_threshold=scale_threshold, use_controller=use_controller,
            adapt_radius=adapt_radius, trust_mode=trust_mode, controller_lr=controller_lr,
            controller_hidden=controller_hidden, trace_decay=trace_decay, num_clusters=num_clusters,
            controller_smoothing=controller_smoothing, min_scale=min_scale, radius_start=radius_start,
            muon_momentum=muon_momentum)
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
        self._pending_factor: torch.Tensor | float | None = None

    @property
    def _learns(self) -> bool:
        """Something learns from the hypergradient (so the trace is kept)."""
        return self.learn_scale or (self.use_controller and self.learn_controller)

    @property
    def _adapts_radius(self) -> bool:
        return self.adapt_radius and self.use_trust_region

    @property
    def _fuses(self) -> bool:
        """The compiled `fused_step_` covers this step (see `compile`)."""
        return (self._fused is not None and self.base in ("adam", "schedulefree")
                and (not self.use_trust_region or self.trust_mode == "global")
                and len({tuple(g["betas"]) for g in self.param_groups}) == 1)

    def add_param_group(self, param_group: dict) -> None:
        """As torch's; a new group takes the current radius and multipliers of the first group."""
        param_group = dict(param_group)
        for key in ("trust_radius", "lr_multiplier", "radius_multiplier"):
            if self.param_groups and key not in param_group:
                param_group[key] = self.param_groups[0][key]
        radius = param_group.get("trust_radius", self.defaults["trust_radius"])
        check(radius > 0, f"trust_radius must be positive, got {radius}")
        super().add_param_group(param_group)

    def set_cluster(self, cluster_id: int | None) -> None:
        """Tell the controller which data cluster the next batch came from (None if mixed)."""
        if cluster_id is not None and self.num_clusters:
            check(0 <= cluster_id < self.num_clusters,
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
        check(self.param_groups[0]["train_mode"], "the optimizer is in eval mode (the parameters hold the "
               "Schedule-Free average); call optimizer.train() before training")
        pairs = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not pairs:
            return loss
        if isinstance(pairs[0][0], DTensor):
            self._check_sharded()
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
        forget_unmoved_(self.state, self._moved, params, self.trace_decay)
        init_state_(self.state, pairs, self.base)
        if self._fuses:  # u_t, the global trust-region ratio and the step, in one compiled function
            updates, self._trust_factor = fused_updates_(self._fused, self.state, pairs, self.param_groups, self.base,
                                                         self.use_trust_region)
            factor = None if self._trust_factor is None else self._trust_factor.clamp_max(1.0)
        else:  # u_t in each tensor's `update` buffer, then the trust region's factor f and the step
            updates = eager_updates_(self.state, pairs, self.param_groups, self.base, self.muon_momentum)
            factor = None
            if self.use_trust_region:
                self._trust_factor, factor = trust_factors_(updates, pairs, self.param_groups, self.trust_mode)
            eager_step_(self.state, pairs, self.param_groups, updates, factor, self.base)
        if self._adapts_radius:
            self._remember_prediction(pairs, updates, factor, loss_value)
        self.hybrid_state.lr_multiplier_sum += self.param_groups[0]["lr_multiplier"]
        if self.trace_decay and self._learns:  # s_t = gamma s_{t-1} + Delta theta_t
            accumulate_trace_(traces(self.state, params), updates, self.trace_decay, factor)
        self._moved, self._pending_factor = params, factor
        return loss

    def _read_back(self, pairs: list, loss) -> tuple[float, bool, float | None, float]:
        """The step's one host sync: (loss, whether loss and g_t are finite, \\|g_t\\| (None when not needed),
        h_t), and the last step's trust-region factor, read as one small stacked tensor."""
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
        grad_sq, h, factor, loss_value = torch.stack([global_value(v).to(device, torch.float64) for v in values]).tolist()
        self._settle(factor)
        finite = math.isfinite(grad_sq) and (loss is None or math.isfinite(loss_value))
        return loss_value, finite, None if by_h else math.sqrt(grad_sq), h

    def _learn(self, h: float, rising: bool) -> None:
        """The learned scale's step, and one controller step on the surrogate \\sigma_t a_{t-1,k}(x_{t-1})."""
        s = self.hybrid_state
        s.scale, s.signal = normalized_hypergradient(s.scale, h, self.scale_betas)
        if self.learn_scale and rising:  # held, and what the warmup's steps said is dropped (scale.py)
            s.scale = ScaleState(log_scale=s.scale.log_scale)
        elif self.learn_scale:
            s.scale.log_scale = stepped_log_scale(s.scale, s.signal, s.clipped, s.radius_ratio, self.scale_lr,
                                                  self.scale_threshold, self.scale_floor, self.scale_betas[0])
        if self.learn_scale and not rising and not s.started:  # the first step after the warmup
            s.started = True
            s.scale.log_scale = started_log_scale(s.scale.log_scale, self.radius_start, s.radius_ratio)
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

    # ------------------------------------------------------------------ trust region
    def _settle(self, factor: float | None = None) -> None:
        """Record whether the last update was clipped (its factor read back now)."""
        if self._trust_factor is None:
            return
        if factor is None:
            factor = float(global_value(self._trust_factor.min()))
        self._trust_factor = None
        if self.trust_mode == "global":  # the global factor is kept unclamped until read: radius / \\|u\\|
            self.hybrid_state.radius_ratio = factor
        self.hybrid_state.clipped = factor < 1.0
        self.hybrid_state.clipped_steps += int(factor < 1.0)

    def _check_sharded(self) -> None:
        """Over FSDP2's sharded parameters (DTensors) every global sum is reduced over the shards; what needs a
        whole tensor at once is refused."""
        check(self.base != "muon", "base='muon' is not supported over sharded parameters (FSDP2): Muon "
              "orthogonalises whole matrices and each process holds a slice of each; use base='adam' or "
              "'schedulefree' (--hybrid_base adam or schedulefree)")
        check(not self.use_trust_region or self.trust_mode == "global", "trust_mode='per_tensor' is not "
              "supported over sharded parameters (FSDP2); use the global trust region (the default)")
        check(self._fused is None, "compile=True is not supported over sharded parameters (FSDP2); drop it")

    def _check_radii(self) -> None:
        radii = {group["trust_radius"] for group in self.param_groups}
        check(len(radii) == 1 or not self.use_trust_region or self.trust_mode != "global",
               "trust_mode='global' bounds one norm over all parameters, so every param group needs the same "
               f"trust_radius (got {sorted(radii)}); use trust_mode='per_tensor' for different radii")

    def _skip(self) -> None:
        self.hybrid_state.skipped_steps += 1
        if self._adapts_radius and self.hybrid_state.step > 0:  # the last update went too far
            for group in self.param_groups:
                group["trust_radius"] = shrunk_radius(group["trust_radius"])

    def _adapt_radius(self, loss: float) -> None:
        s = self.hybrid_state
        if s.prev_loss is None or not s.prev_predicted_decrease:
            return
        s.ratio_ema = decrease_ratio_ema(s.ratio_ema, s.prev_loss, loss, s.prev_predicted_decrease)
        for group in self.param_groups:
            group["trust_radius"] = adapted_radius(group["trust_radius"], s.ratio_ema, s.clipped)

    def _remember_prediction(self, pairs: list, updates: Tensors, factor: torch.Tensor | None, loss: float) -> None:
        """With adapt_radius: -g . Delta theta and L of this step, for the next step's ratio (a second sync)."""
        s = self.hybrid_state
        self._settle()
        predicted = dot([p.grad for p, _ in pairs], updates)
        s.prev_predicted_decrease = -float(global_value(predicted if factor is None else predicted * factor))
        s.prev_loss = loss if math.isfinite(loss) else None

    # ------------------------------------------------------------------ Schedule-Free's average
    @torch.no_grad()
    def eval(self) -> None:
        """With base='schedulefree': set the parameters to the average x, where the model is evaluated and
        exported (the training point is y); `train()` returns. Other bases: nothing to do."""
        if self.base == "schedulefree":
            schedulefree_swap_(self.state, self.param_groups, train=False)

    @torch.no_grad()
    def train(self) -> None:
        """With base='schedulefree': set the parameters back to the training point y (after `eval()`)."""
        if self.base == "schedulefree":
            schedulefree_swap_(self.state, self.param_groups, train=True)

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
        pending = None if self._pending_factor is None else float(global_value(self._pending_factor))
        sd["hybrid"] = {"state": dataclasses.asdict(self.hybrid_state), "controller": self.controller.state_dict(),
                        "controller_opt": self.controller_opt.state_dict(),
                        "moved": [index[id(p)] for p in self._moved], "pending_factor": pending}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        hybrid = state_dict.pop("hybrid")
        super().load_state_dict(state_dict)
        self.hybrid_state = HybridState.from_saved(hybrid["state"])
        self._trust_factor = None
        self.controller.load_state_dict(hybrid["controller"])
        self.controller_opt.load_state_dict(hybrid["controller_opt"])
        params = [p for group in self.param_groups for p in group["params"]]
        self._moved, self._pending_factor = _restored_last_step(self.state, params, hybrid, self.trace_decay)


def _restored_last_step(state: dict, params: Tensors, hybrid: dict, trace_decay: float
                        ) -> tuple[Tensors, float | None]:
    """The tensors the saved optimizer's last step moved and its pending global trust-region factor, from
    `state_dict`'s "hybrid" entry (`params` in the order of the param groups)."""
    for p in params:  # saved before the `update` buffer: the gamma-0 trace was the last applied update
        st = state.get(p, {})
        if not trace_decay and "trace" in st and "update" not in st:
            st["update"] = st.pop("trace")
    moved = hybrid.get("moved")
    moved = [params[i] for i in moved] if moved is not None else [p for p in params if "update" in state.get(p, {})]
    pending = hybrid.get("pending_factor")  # a number: multiplies a plain tensor or a DTensor alike
    return moved, None if pending is None else float(pending)
