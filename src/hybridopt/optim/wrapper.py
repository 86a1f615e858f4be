r"""`hybrid(base)`: `HybridOptimizer`'s learned step scale and trust region over any torch optimizer.

The base optimizer takes its own step; the wrapper reads that step back as the change it made to the
parameters, d_t, and replaces it by a scaled and clipped copy. At step t, for the parameters \theta_t with
gradients g_t (norms and dot products over all of them at once):

    d_t = \mathrm{base.step}(\theta_t, g_t) - \theta_t                       (the base's update, weight decay included)
    \mu_t = \rho_t e^{r_t} \max(\|\theta_t\|_2, 10^{-3})                      (trust radius, relative to the parameters)
    \Delta\theta_t = e^{\ell_t + c_t} d_t \min(1, \mu_t / (e^{\ell_t + c_t} \|d_t\|_2))   (scale, then clip)
    \theta_{t+1} = \theta_t + \Delta\theta_t

The log scale \ell is normalised hypergradient descent on the applied step (`scale.py`). The loss after the
last step depends on its scale through \theta_t = \theta_{t-1} + \Delta\theta_{t-1}, so

    h_t = \partial L(\theta_t) / \partial \ell_{t-1} = g_t \cdot \Delta\theta_{t-1}
    m_t = \beta_a m_{t-1} + (1 - \beta_a) h_t,   v_t = \beta_b v_{t-1} + (1 - \beta_b) h_t^2
    \sigma_t = \hat m_t / (\sqrt{\hat v_t} + 10^{-30})                        (\hat{}: Adam's bias corrections)
    \ell_t = \mathrm{clip}(\ell_{t-1} - \kappa \sigma_t, [\log m, \log 10^4])   if |\sigma_t| > \tau_t, else \ell_{t-1}

h_t > 0 says the last step went past the minimum along it (Baydin et al. write h_t = -g_t \cdot \nabla
L(\theta_{t-1}) for SGD, whose step is -\eta \nabla L). \tau_t = \tau `threshold_growth`(t) widens the
threshold while few hypergradients are in; while the first group's lr rises (a warmup) \ell is held and
the moments restart; at the first step after it \ell is raised so that the last step would have been
`radius_start` times the radius long; after a clipped step \sigma becomes \max(\sigma, 0) and a lowering
starts from \ell + \log(\mu_{t-1} / \|e^{\ell} d_{t-1}\|) (`scale.py` says why each). With `adapt_radius`,
\rho follows the design document's rule on the actual decrease L_{t-1} - L_t against the predicted
-g_{t-1} \cdot \Delta\theta_{t-1} (`trust_region.py`). With `controller`, the design document's network
(`controller.py`) maps training-state features x_t to (c_t, r_t), each in [\log 0.1, \log 10], and takes
one Adam step on the surrogate \sigma_t c(x_{t-1}) (and \sigma_t r(x_{t-1}) after a clipped step).

(\kappa `scale_lr`, (\beta_a, \beta_b) `scale_betas`, \tau `scale_threshold`, m `min_scale`, \rho
`trust_radius`; with the scale frozen (`learn_scale=False`) and no trust region (`trust_radius=None`) the
wrapper's steps are the base's, bit for bit.)

How. Each parameter gets one buffer e. It holds \theta_t (the snapshot) while the base steps, then
e_t = \theta_t - \theta_{t+1}^{base} = -d_t (one subtraction in place), and the parameters become
\theta_{t+1}^{base} + (1 - F) e_t with F = e^{\ell + c} \min(1, \cdot) the step's factor, a 0-d tensor, so a
factor of exactly 1 leaves the base's result untouched. A base whose step is proportional to its lr (torch's
first-order optimizers and Muon, `MuonAdamW`, Schedule-Free's; `_scales_by_rate`) takes its step at the rate
e^{\ell + c} \eta instead, so d_t comes back at its final size and F = \min(1, \cdot): a difference of
parameters carries their rounding, which a scale applied afterwards would multiply. The buffer is never rescaled: \Delta\theta_t = s_t e_t
is kept as the buffer and the number s_t = -F, and h_{t+1} = s_t (g_{t+1} \cdot e_t). Per step that is six
passes over the parameters' size: h's dot product, \|\theta_t\|, the snapshot, the subtraction, \|e_t\| and the
correction (four without a trust region). Memory: the base's state plus that buffer. One host sync per step
reads g_{t+1} \cdot e_t, the last step's s, trust ratio and predicted decrease, and the loss, stacked. Every
decision uses only global sums of tensors that are identical on every data-parallel rank (DDP averages the
gradients before `step`), so all ranks take the same step without communicating.

Limits. The gradient and loss come from the caller (`loss=`, or a closure called once before the base's
step), so bases that call a closure themselves (L-BFGS) are not supported. Over Schedule-Free (schedulefree's
optimizers, `ScheduleFreeWrapper`) the parameters hold y and the base keeps z and the average x in its state,
both built from its lr: there the scale e^{\ell + c} multiplies every group's lr for the base's step (restored
after it), so z and the averaging weights take the scaled rate. Over schedulefree's `AdamWScheduleFree` the step
the trust region clips, and h's \Delta\theta, are z's: e_t = \eta' \hat g_t (its normalised gradient, which it
leaves in `.grad`), z_{t+1} = z_t - F e_t and y takes 1 - \beta_1 (1 - c_t) of that, c_t its averaging weight
(no snapshot is needed). Over any other Schedule-Free base the trust region clips y's step. `train()`/`eval()`
go to the base. Dense gradients only.

References: Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient Descent" (ICLR); Cutkosky,
Defazio & Mehta 2023, "Mechanic: A Learning Rate Tuner" (optax's `contrib.mechanize`: learn the scale of any
base optimizer's update); Defazio et al. 2024, "The Road Less Scheduled" (schedule_free's `ScheduleFreeWrapper`:
wrap any torch optimizer, reading its step as a parameter change); Conn, Gould & Toint 2000, "Trust-Region Methods".
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybridopt.optim.arguments import check
from hybridopt.optim.controller import (LR_HEAD, RADIUS_HEAD, AuxiliaryNN, FeatureStats, training_state,
                                        update_feature_stats)
from hybridopt.optim.scale import (ScaleState, forget_unmoved_, normalized_hypergradient, started_log_scale,
                                   stepped_log_scale)
from hybridopt.optim.trust_region import (DTensor, adapted_radius, decrease_ratio_ema, dot, global_value, norms,
                                          ratio_of_norms, shrunk_radius)

Tensors = list[torch.Tensor]
WRAPPER_VERSION = 2  # of `state_dict`'s "hybrid" entry; bumped when its meaning changes
# Version 1 held the last update \Delta\theta itself; version 2 holds e = \theta_t - \theta^base and its scale s
# (\Delta\theta = s e). A version-1 entry is read as s = 1.
READABLE_VERSIONS = (1, 2)


@dataclass
class WrapperState:
    """The wrapper's scalars, saved by `state_dict` (beside them each tensor's buffer e_{t-1} and the number s,
    \\Delta\\theta_{t-1} = s e_{t-1})."""

    step: int = 0  # steps applied (skipped ones not counted)
    skipped_steps: int = 0  # steps skipped for a non-finite gradient or loss
    trust_radius: float | None = None  # \\rho (adapted with adapt_radius; None: no trust region)
    clipped: bool = False  # the last step was scaled down by the trust region
    clipped_steps: int = 0
    radius_ratio: float | None = None  # the last step's \\mu / \\|e^{\\ell + c} d\\|, unclamped
    prev_lr: float = math.inf  # the first group's lr at the last step (a rising lr holds the scale)
    started: bool = False  # the first step after the warmup has been taken (radius_start applied)
    signal: float = 0.0  # \\sigma_t
    scale: ScaleState = field(default_factory=ScaleState)
    correction: float = 0.0  # c_t, the controller's log-lr correction
    radius_multiplier: float = 1.0  # e^{r_t}, the controller's radius multiplier
    prev_features: list[float] | None = None  # x_{t-1}, the controller's input at the last step
    features: FeatureStats = field(default_factory=FeatureStats)
    prev_loss: float | None = None  # with adapt_radius: L_{t-1}
    prev_predicted_decrease: float | None = None  # with adapt_radius: -g_{t-1} . Delta theta_{t-1}
    ratio_ema: float | None = None  # with adapt_radius: smoothed actual / predicted decrease
    cluster_id: int | None = None  # the data cluster of the next batch (`set_cluster`), a controller feature
    multiplier_sum: float = 0.0  # of e^{\\ell + c} over the steps, for `summary`'s average

    @classmethod
    def from_saved(cls, saved: dict) -> WrapperState:
        return cls(**{**saved, "scale": ScaleState(**saved["scale"]), "features": FeatureStats(**saved["features"])})


# ---------------------------------------------------------------------- the step's pure pieces
def snapshot_(buffers: Tensors, params: Tensors) -> None:
    """buffer <- \\theta_t, in place (one foreach copy; a copy per tensor for FSDP2's DTensors, which have no
    foreach copy)."""
    if isinstance(params[0], DTensor):
        for b, p in zip(buffers, params):
            b.copy_(p)
    else:
        torch._foreach_copy_(buffers, params)


def negated_update_(buffers: Tensors, params: Tensors) -> None:
    """buffer <- buffer - \\theta_{t+1}^{base}, in place: e_t = -d_t, the base's update negated (the buffers held
    \\theta_t; the sign goes into the step's factor rather than into a pass of its own)."""
    torch._foreach_sub_(buffers, params)


def step_factor(negated: Tensors, param_norm: torch.Tensor | None, log_multiplier: float, radius: float | None
                ) -> tuple[float | torch.Tensor, torch.Tensor | None]:
    """(F, the trust ratio): F = e^m \\min(1, ratio), ratio = radius \\max(\\|\\theta\\|, 10^{-3}) / \\|e^m d\\|
    unclamped (a 0-d tensor, no host sync); without a radius F = e^m, a float, and no ratio. `negated`: -d."""
    multiplier = math.exp(log_multiplier)
    if radius is None:
        return multiplier, None
    ratio = ratio_of_norms(radius, param_norm, multiplier * norms(negated).norm())
    return multiplier * ratio.clamp_max(1.0), ratio


def rescale_step_(params: Tensors, negated: Tensors, factor: float | torch.Tensor) -> None:
    """\\theta <- \\theta^{base} + (1 - F) e = \\theta_t + F d, from the buffers e = -d (left as they are).

    Written as a correction of the base's result so that F = 1 gives it back exactly (+0 is exact)."""
    if not (isinstance(factor, float) and factor == 1.0):
        _add_scaled_(params, negated, 1.0 - factor)


def z_steps_(buffers: Tensors, params: Tensors, groups: list[dict]) -> None:
    """buffer <- \\eta' \\hat g, in place, after a Schedule-Free AdamW step at the rate \\eta' (the group's
    `scheduled_lr`): z's step negated, read from the gradient the base normalised in place (\\hat g, weight
    decay included)."""
    for group, mine in _by_group(params, groups):
        group_buffers = [buffers[i] for i in mine]
        snapshot_(group_buffers, [params[i].grad for i in mine])
        torch._foreach_mul_(group_buffers, group["scheduled_lr"])


def y_weight(group: dict) -> float:
    """1 - \\beta_1 (1 - c), with c = w_k / \\sum_i w_i the averaging weight of the step a Schedule-Free AdamW
    group has just taken (read from its fields after the step): the fraction of z's step that y took."""
    weight = group["k"] ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
    c = weight / group["weight_sum"] if group["weight_sum"] else 0.0
    return 1.0 - group["betas"][0] * (1.0 - c)


def rescale_schedule_free_(params: Tensors, zs: Tensors, negated: Tensors, groups: list[dict],
                           factor: float | torch.Tensor) -> None:
    """z <- z + (1 - F) e and y <- y + (1 - F) (1 - \\beta_1 (1 - c)) e: Schedule-Free AdamW's step with z's step
    scaled by F, y taking its fraction of it, from the buffers e = -\\Delta z^{base} (left as they are)."""
    if isinstance(factor, float) and factor == 1.0:
        return
    _add_scaled_(zs, negated, 1.0 - factor)
    for group, mine in _by_group(params, groups):
        _add_scaled_([params[i] for i in mine], [negated[i] for i in mine], (1.0 - factor) * y_weight(group))


def _by_group(params: Tensors, groups: list[dict]) -> list[tuple[dict, list[int]]]:
    """(group, the positions in `params` of its tensors) for each group with any."""
    index = {p: i for i, p in enumerate(params)}
    mine = [(group, [index[p] for p in group["params"] if p in index]) for group in groups]
    return [(group, positions) for group, positions in mine if positions]


def _add_scaled_(xs: Tensors, ys: Tensors, k: float | torch.Tensor) -> None:
    """x <- x + k y, in place; k a number or a 0-d tensor (no host sync: foreach's alpha takes numbers only, a
    list of one 0-d tensor broadcasts)."""
    if torch.is_tensor(k):
        torch._foreach_addcmul_(xs, ys, [k] * len(xs))
    else:
        torch._foreach_add_(xs, ys, alpha=k)


def _clips_z(base) -> bool:
    """schedulefree's AdamWScheduleFree: its state and group fields are known (z, k, r, lr_max, weight_sum), so the
    trust region can clip z's step as the built-in Schedule-Free base did; over any other Schedule-Free base it
    clips y's."""
    return type(base).__name__ == "AdamWScheduleFree" and type(base).__module__.startswith("schedulefree")


def _scales_by_rate(base) -> bool:
    """The base's step is proportional to its lr (weight decay included), so the scale can go into the lr for the
    step: torch's first-order optimizers, their Muon, `MuonAdamW`, and Schedule-Free's (whose z and averaging
    weights must take it). The step then comes out at its final size, and reading it back as a difference of
    parameters loses no more digits than the step itself has (a step recovered at a small base rate and then
    multiplied by a large scale would carry the rounding of the parameters, times that scale). Any other base
    (one whose lr enters otherwise, such as Prodigy's or D-Adaptation's estimates) steps at its own lr and the
    difference is scaled."""
    if _is_schedule_free(base):
        return True
    from hybridopt.optim.muon_adamw import MuonAdamW  # noqa: PLC0415 (muon_adamw imports nothing from here)

    linear = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
              torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, MuonAdamW)
    return type(base) in linear or type(base) is getattr(torch.optim, "Muon", None)


def _is_schedule_free(base) -> bool:
    """schedulefree's optimizers and `ScheduleFreeWrapper` switch the parameters with `train()`/`eval()`."""
    return callable(getattr(base, "train", None)) and callable(getattr(base, "eval", None))


def _in_eval_mode(base) -> bool:
    return getattr(base, "train_mode", True) is False or base.param_groups[0].get("train_mode", True) is False


def _controller() -> AuxiliaryNN:
    """The controller network, initialised from its own seed: every rank builds the same one, and the caller's
    random stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AuxiliaryNN()


class HybridWrapper(torch.optim.Optimizer):
    """The learned step scale and trust region over any torch optimizer (the rule is in the module docstring).

    Build it with `hybrid(base, ...)`. `param_groups`, `state` and `defaults` are the base's (LR schedulers on
    either act on the base's lr); `zero_grad`, `add_param_group`, `train` and `eval` go to the base;
    `state_dict()` is the base's plus a "hybrid" entry and a "wrapper_version".

    Args:
        base_optimizer: the optimizer whose steps are scaled (a `torch.optim.Optimizer`, or an object with its
            `param_groups`, `step`, `state_dict`, `load_state_dict` and `zero_grad`, such as `ScheduleFreeWrapper`).
        learn_scale: learn the log scale \\ell (False: the scale stays 1).
        scale_lr: \\kappa, the largest change of \\ell per step (0.1: x1.105).
        scale_threshold: \\tau in [0, 1), the size |\\sigma| must exceed for \\ell to move.
        scale_betas: EMA decays of the hypergradient's mean and square.
        min_scale: the scale's lower bound m in [1e-4, 1] (None: 1 over a Schedule-Free base, whose rate the
            scale may only raise (`scale.py` says why), 1e-4 otherwise).
        radius_start: q in [0, 1]: at the first step after the warmup the scale is raised so that the last step
            would have been at least q times the radius long (None: 0.25; 0: off).
        trust_radius: \\rho > 0, the largest step relative to the parameters' norm (None: no trust region).
        adapt_radius: adapt \\rho from actual against predicted decrease (needs `loss` at every step; not over
            Schedule-Free, whose step divides the gradient in place).
        controller: add the design document's controller network (`AuxiliaryNN`), trained online: True builds
            one from its own seed (every rank alike); or pass the network itself.
        controller_lr: the Adam learning rate of the controller.
        num_clusters: the number of data clusters `set_cluster` names (a feature of the controller), 0 if none.
    """

    def __init__(self, base_optimizer, *, learn_scale: bool = True, scale_lr: float = 0.1,
                 scale_threshold: float = 0.5, scale_betas: tuple[float, float] = (0.9, 0.99),
                 min_scale: float | None = None, radius_start: float | None = None, trust_radius: float | None = 0.1,
                 adapt_radius: bool = False, controller: bool | torch.nn.Module = False, controller_lr: float = 1e-3,
                 num_clusters: int = 0):
        base = base_optimizer
        schedule_free = _is_schedule_free(base)
        min_scale = (1.0 if schedule_free else 1e-4) if min_scale is None else min_scale
        radius_start = 0.25 if radius_start is None else radius_start
        check(all(hasattr(base, name) for name in ("param_groups", "step", "state_dict", "load_state_dict")),
              f"base_optimizer must be a torch optimizer (param_groups, step, state_dict), got {type(base).__name__}")
        check(scale_lr > 0, f"scale_lr must be positive, got {scale_lr}")
        check(0 <= scale_threshold < 1, f"scale_threshold must be in [0, 1), got {scale_threshold}")
        check(len(scale_betas) == 2 and all(0 <= b < 1 for b in scale_betas),
              f"scale_betas must be two numbers in [0, 1), got {scale_betas}")
        check(1e-4 <= min_scale <= 1, f"min_scale must be in [1e-4, 1], got {min_scale}")
        check(0 <= radius_start <= 1, f"radius_start must be in [0, 1], got {radius_start}")
        check(trust_radius is None or trust_radius > 0, f"trust_radius must be positive or None, got {trust_radius}")
        check(not adapt_radius or trust_radius is not None, "adapt_radius needs a trust region (a trust_radius)")
        check(not (adapt_radius and schedule_free), "adapt_radius is not supported over a Schedule-Free base "
              "(its step divides the gradient in place, so the predicted decrease cannot be read after it)")
        check(controller_lr > 0, f"controller_lr must be positive, got {controller_lr}")
        check(num_clusters >= 0, f"num_clusters must be >= 0, got {num_clusters}")
        self.base = base
        self.learn_scale, self.scale_lr, self.scale_threshold = learn_scale, scale_lr, scale_threshold
        self.scale_betas, self.scale_floor, self.radius_start = tuple(scale_betas), math.log(min_scale), radius_start
        self.use_trust_region, self.adapt_radius = trust_radius is not None, adapt_radius
        if isinstance(controller, torch.nn.Module):
            self.controller = controller
        else:
            self.controller = _controller() if controller else None
        self.controller_opt = (None if self.controller is None else
                               torch.optim.Adam(self.controller.parameters(), lr=controller_lr))
        self.num_clusters = num_clusters
        self._clips_z, self._by_rate = _clips_z(base), _scales_by_rate(base)
        self.hybrid_state = WrapperState(trust_radius=trust_radius)
        self._buffers: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # p -> {"update": one buffer like p}
        self._moved: Tensors = []  # the tensors the last step moved
        # s, with \Delta\theta_{t-1} = s times the buffers: the last step's -F (a 0-d tensor until the next sync
        # reads it back), or 1 (before any step, and over a checkpoint that saved \Delta\theta itself).
        self._update_scale: float | torch.Tensor = 1.0
        # The last step's trust ratio and g_{t-1} . e_{t-1} (its predicted decrease over -s), 0-d tensors read at
        # the next step's sync.
        self._pending_ratio: torch.Tensor | None = None
        self._pending_predicted: torch.Tensor | None = None
        # torch.optim.Optimizer's hooks (its __init__ would build param groups of its own: the base's are used)
        for kind in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            setattr(self, f"_optimizer_{kind}_hooks", OrderedDict())
        self._patch_step_function()

    # ------------------------------------------------------------------ the base's, shared
    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    @property
    def state(self) -> dict:
        return self.base.state

    @property
    def defaults(self) -> dict:
        return getattr(self.base, "defaults", {})

    def add_param_group(self, param_group: dict) -> None:
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def train(self) -> None:
        """Schedule-Free bases: parameters back to the training point y. Other bases: nothing to do."""
        if _is_schedule_free(self.base):
            self.base.train()

    def eval(self) -> None:
        """Schedule-Free bases: parameters to the average x, for evaluating and saving. Others: nothing."""
        if _is_schedule_free(self.base):
            self.base.eval()

    @property
    def scale(self) -> float:
        """e^{\\ell + c}, the multiplier of the base's step (before the trust region)."""
        return math.exp(self.hybrid_state.scale.log_scale + self.hybrid_state.correction)

    lr_multiplier = scale

    def set_cluster(self, cluster_id: int | None) -> None:
        """Tell the controller which data cluster the next batch came from (None if mixed)."""
        if cluster_id is not None and self.num_clusters:
            check(0 <= cluster_id < self.num_clusters,
                  f"cluster_id must be in [0, {self.num_clusters}) or None, got {cluster_id}")
        self.hybrid_state.cluster_id = cluster_id

    def summary(self) -> dict:
        """Figures of the run so far (the design document's summary block; a host sync when a step is pending).

        Keys: total_steps, avg_lr_multiplier, learned_scale (e^\\ell), constraint_activation_rate, trust_radius
        (\\rho e^r; None without a trust region), lr_multiplier (e^{\\ell + c}), skipped_steps, clipped (the
        last step was clipped).
        """
        self._settle_pending()
        s = self.hybrid_state
        steps = max(1, s.step)
        radius = s.trust_radius * s.radius_multiplier if self.use_trust_region else None
        return {"total_steps": s.step, "avg_lr_multiplier": s.multiplier_sum / steps,
                "learned_scale": math.exp(s.scale.log_scale), "constraint_activation_rate": s.clipped_steps / steps,
                "trust_radius": radius, "lr_multiplier": self.scale, "skipped_steps": s.skipped_steps,
                "clipped": s.clipped}

    def __getstate__(self) -> dict:  # Optimizer's would keep only defaults, state and param_groups
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        radius = self.hybrid_state.trust_radius if self.use_trust_region else None
        return f"{type(self).__name__}(scale={self.scale:.4g}, trust_radius={radius}, base={self.base!r})"

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, loss: float | torch.Tensor | Callable | None = None, closure: Callable | None = None):
        """One step: the base's, scaled and clipped. Pass the loss (or a closure, called once, that computes
        it and the gradients) for the non-finite check, `adapt_radius` and the controller's features; a
        callable in first place is taken as the closure, as torch optimizers are called. Returns the loss."""
        if callable(loss):
            loss, closure = None, loss
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check(not _in_eval_mode(self.base), "the base optimizer is in eval mode (the parameters hold the "
              "Schedule-Free average); call train() on the optimizer before training")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        forget_unmoved_(self._buffers, self._moved, params)  # a tensor without a gradient now: its step was 0
        for p in params:  # zero before a tensor's first step (h_t then counts nothing from it)
            if p not in self._buffers:
                self._buffers[p] = {"update": torch.zeros_like(p)}
        buffers = [self._buffers[p]["update"] for p in params]
        h, grad_norm, loss_value = self._read_back(params, buffers, loss)
        if not math.isfinite(h) or (loss is not None and not math.isfinite(loss_value)):
            self._skip()  # before the base sees the gradient: its state stays clean
            return loss
        self._learn(h, loss_value)
        log_multiplier, radius = self._multipliers(loss_value, grad_norm)
        param_norm = norms(params).norm() if radius is not None else None  # \|\theta_t\|, before the base moves it
        self.hybrid_state.multiplier_sum += math.exp(log_multiplier)
        if self._clips_z:  # Schedule-Free AdamW: the step scaled and clipped is z's, as in the built-in base
            self._base_step_at(math.exp(log_multiplier))
            z_steps_(buffers, params, self.param_groups)  # e_t = -\Delta z^{base} (h is taken)
            factor, self._pending_ratio = step_factor(buffers, param_norm, 0.0, radius)
            rescale_schedule_free_(params, [self.state[p]["z"] for p in params], buffers, self.param_groups, factor)
        else:
            snapshot_(buffers, params)  # \theta_t, over e_{t-1} (h is taken)
            if self._by_rate:  # the scale goes into the base's rate (Schedule-Free's z and averaging weights too)
                self._base_step_at(math.exp(log_multiplier))
                log_multiplier = 0.0  # the trust region alone is left to apply
            else:
                self.base.step()
            negated_update_(buffers, params)  # e_t = -d_t
            factor, self._pending_ratio = step_factor(buffers, param_norm, log_multiplier, radius)
            rescale_step_(params, buffers, factor)
        self._update_scale = -factor  # \Delta\theta_t = -F e_t, the buffers left unscaled
        if self.adapt_radius:  # the predicted decrease over -s, read at the next sync
            self._pending_predicted = dot([p.grad for p in params], buffers)
        self.hybrid_state.step += 1
        self._moved = params
        return loss

    def _base_step_at(self, multiplier: float) -> None:
        """The base's step with every group's lr times `multiplier` (each lr restored after it)."""
        rates = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * multiplier
        try:
            self.base.step()
        finally:
            for group, lr in zip(self.param_groups, rates):
                group["lr"] = lr

    def _pending(self) -> Tensors:
        """The 0-d tensors the last step left to read back, in `_settle`'s order: s, the trust ratio, g . e."""
        scale = self._update_scale if torch.is_tensor(self._update_scale) else None
        return [t for t in (scale, self._pending_ratio, self._pending_predicted) if t is not None]

    def _read_back(self, params: Tensors, buffers: Tensors, loss) -> tuple[float, float | None, float]:
        """The step's one host sync: (h_t, \\|g_t\\| with the controller, the loss or nan), and the last step's
        s, trust ratio and predicted decrease. h_t = s (g_t \\cdot e_{t-1}) is non-finite when any gradient is
        (0 \\cdot inf is nan: every tensor with a gradient has a buffer, zero before its first step, and s is
        finite), so it is the non-finite check too."""
        grads = [p.grad for p in params]
        device = grads[0].device
        values = [dot(grads, buffers)]  # g_t . e_{t-1}
        if self.controller is not None:
            values.append(norms(grads).pow(2).sum())
        pending = self._pending()
        values += pending
        values.append(torch.as_tensor(loss).detach() if loss is not None else torch.tensor(math.nan))
        read = torch.stack([global_value(v).to(device, torch.float64) for v in values]).tolist()
        rest = read[1:]
        grad_norm = math.sqrt(rest.pop(0)) if self.controller is not None else None
        self._settle(rest[:len(pending)])
        return self._update_scale * read[0], grad_norm, rest[-1]

    def _settle_pending(self) -> None:
        """Read back what the last step left pending, now (one host sync), outside a step."""
        pending = self._pending()
        if pending:
            self._settle(torch.stack([global_value(t).double() for t in pending]).tolist())

    def _settle(self, values: list[float]) -> None:
        """Record the last step's s, trust ratio and predicted decrease, read back (`values` in `_pending`'s
        order)."""
        values = list(values)
        s = self.hybrid_state
        if torch.is_tensor(self._update_scale):
            self._update_scale = values.pop(0)
        if self._pending_ratio is not None:
            s.radius_ratio = values.pop(0)
            s.clipped = s.radius_ratio < 1.0
            s.clipped_steps += int(s.clipped)
        if self._pending_predicted is not None:  # -g_{t-1} . \Delta\theta_{t-1} = -s (g_{t-1} . e_{t-1})
            s.prev_predicted_decrease = -self._update_scale * values.pop(0)
        self._pending_ratio = self._pending_predicted = None

    def _learn(self, h: float, loss: float) -> None:
        """The radius (with adapt_radius), the learned scale's step and the controller's, from h_t."""
        s = self.hybrid_state
        if self.adapt_radius and math.isfinite(loss):
            if s.prev_loss is not None and s.prev_predicted_decrease:
                s.ratio_ema = decrease_ratio_ema(s.ratio_ema, s.prev_loss, loss, s.prev_predicted_decrease)
                s.trust_radius = adapted_radius(s.trust_radius, s.ratio_ema, s.clipped)
            s.prev_loss = loss
        lr = float(self.param_groups[0]["lr"])
        rising, s.prev_lr = lr > s.prev_lr, lr  # a warmup is raising the rate
        if s.step == 0 or not (self.learn_scale or self.controller is not None):
            return
        s.scale, s.signal = normalized_hypergradient(s.scale, h, self.scale_betas)
        if self.learn_scale and rising:  # held, and what the warmup's steps said is dropped
            s.scale = ScaleState(log_scale=s.scale.log_scale)
        elif self.learn_scale:
            s.scale.log_scale = stepped_log_scale(s.scale, s.signal, s.clipped, s.radius_ratio, self.scale_lr,
                                                  self.scale_threshold, self.scale_floor, self.scale_betas[0])
            if not s.started:
                s.started = True
                s.scale.log_scale = started_log_scale(s.scale.log_scale, self.radius_start, s.radius_ratio)
        if self.controller is not None and s.prev_features is not None:
            heads = [LR_HEAD, RADIUS_HEAD] if s.clipped else [LR_HEAD]
            self.controller.surrogate_gradients_(torch.tensor(s.prev_features), s.signal, heads)
            self.controller_opt.step()

    def _multipliers(self, loss: float, grad_norm: float | None) -> tuple[float, float | None]:
        """(\\ell + c_t, \\rho e^{r_t} or None without a trust region), the controller's features observed."""
        s = self.hybrid_state
        if self.controller is not None:
            s.features = update_feature_stats(s.features, loss, grad_norm)
            x = self.controller.observe(training_state(s.features, s.step, s.cluster_id, self.num_clusters).features())
            lr_correction, s.radius_multiplier = self.controller.multipliers(x)
            s.correction, s.prev_features = math.log(lr_correction), x.tolist()
        radius = s.trust_radius * s.radius_multiplier if self.use_trust_region else None
        return s.scale.log_scale + s.correction, radius

    def _skip(self) -> None:
        s = self.hybrid_state
        s.skipped_steps += 1
        if self.adapt_radius and s.step > 0:  # the last step went too far
            s.trust_radius = shrunk_radius(s.trust_radius)

    # ------------------------------------------------------------------ state
    def _params(self) -> Tensors:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """The base's state_dict plus "hybrid" (the wrapper's scalars; each tensor's buffer e_{t-1} by the base's
        parameter index and "update_scale" s, with \\Delta\\theta_{t-1} = s e_{t-1}; the controller) and
        "wrapper_version". The hooks registered on the wrapper run as torch.optim.Optimizer runs them."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._settle_pending()  # a host sync, as every checkpoint has
        index = {p: i for i, p in enumerate(self._params())}
        hybrid = {"state": dataclasses.asdict(self.hybrid_state),
                  "updates": {index[p]: st["update"] for p, st in self._buffers.items() if p in index},
                  "update_scale": self._update_scale,
                  "moved": [index[p] for p in self._moved if p in index]}
        if self.controller is not None:
            hybrid["controller"] = self.controller.state_dict()
            hybrid["controller_opt"] = self.controller_opt.state_dict()
        state_dict = {**self.base.state_dict(), "hybrid": hybrid, "wrapper_version": WRAPPER_VERSION}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict` saved. The hooks registered on the wrapper run as torch.optim.Optimizer runs
        them (a pre-hook may return a replacement state_dict)."""
        state_dict = state_dict.copy()  # shallow, as torch's: a pre-hook may edit it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        version = state_dict.get("wrapper_version")
        check(version in READABLE_VERSIONS, f"this state_dict has wrapper_version {version!r} but the hybrid wrapper "
              f"reads versions {', '.join(map(str, READABLE_VERSIONS))}; load it with the hybridopt that saved it (a plain optimizer's "
              "state_dict goes to the base optimizer itself)")
        hybrid = state_dict["hybrid"]
        check(("controller" in hybrid) == (self.controller is not None), "this state_dict was saved "
              f"{'with' if 'controller' in hybrid else 'without'} the controller; build the wrapper the same way")
        self.base.load_state_dict({k: v for k, v in state_dict.items() if k not in ("hybrid", "wrapper_version")})
        params = self._params()
        self.hybrid_state = WrapperState.from_saved(hybrid["state"])
        self._buffers = {params[int(i)]: {"update": t.to(params[int(i)], copy=True)}
                         for i, t in hybrid["updates"].items()}
        # without "update_scale" (saved before the wrapper kept s) the buffers hold \Delta\theta itself
        self._update_scale = float(hybrid.get("update_scale", 1.0))
        self._moved = [params[i] for i in hybrid["moved"]]
        self._pending_ratio = self._pending_predicted = None
        if self.controller is not None:
            self.controller.load_state_dict(hybrid["controller"])
            self.controller_opt.load_state_dict(hybrid["controller_opt"])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def hybrid(base_optimizer, **options) -> HybridWrapper:
    """The learned step scale and trust region over `base_optimizer` (options: `HybridWrapper`'s).

    Example:
        opt = hybrid(torch.optim.AdamW(model.parameters(), lr=1e-3))
        loss = loss_fn(model(x), y); loss.backward()
        opt.step(loss=loss); opt.zero_grad()
    """
    return HybridWrapper(base_optimizer, **options)
