"""The arms of `hybridopt bench`: the optimizers compared, each with its schedule and learning-rate grid.

An arm builds its optimizer(s) for a model at one grid value. Every arm gets the same parameter groups
(weight decay 0.01 on matrices, none on norms and biases, as `hybridopt distill`), the same warmup (5% of
the steps) where it has a schedule, and the same number of grid points. The grids are one log grid scaled
per family: Adam-type rates as given, SGD rates x100 (SGD's steps are gradient-sized, Adam's are
sign-sized), Prodigy's `d_coef` (its own knob; lr stays 1) centred on its default 1.

The arms (the design document's four first, then what practitioners pick, then ablations of the hybrid):

    sgd                  SGD with momentum 0.9, constant rate (the design document's baseline)
    sgd_cosine           + warmup and cosine decay
    sgd_cosine_clusters  + cluster-stratified batches (data clusters)
    hybrid_sgd           the design document's full hybrid: controller and trust region over SGD momentum,
                         warmup-cosine, data clusters
    adamw_cosine         AdamW + warmup-cosine (the reference every arm is measured against)
    schedulefree_adamw   Schedule-Free AdamW (`schedulefree`), its own warmup, no schedule
    prodigy              Prodigy (`prodigyopt`), lr 1 with warmup-cosine, grid over d_coef
    muon                 torch.optim.Muon on the 2-D hidden weights (AdamW-matched RMS), AdamW on
                         embeddings, norms and head, one rate for both, warmup-cosine; on a CPU its
                         Newton-Schulz orthogonalisation runs in float32 (`Float32Muon`)
    hybrid_adam          `distill --hybrid --hybrid_base adam`: learned scale, controller and trust region over
                         the Adam direction, warmup-cosine
    hybrid_muon          `distill --hybrid` (its defaults): learned scale, controller and trust region over
                         Muon's orthogonalised momentum on the hidden matrices and Adam's on the rest,
                         warmup-cosine (as the muon arm's)
    hybrid_sf            `distill --hybrid --hybrid_base schedulefree`: learned scale and trust region over Schedule-Free
                         AdamW's step, warmup then constant, the scale one-sided (it may raise the rate, not
                         lower it), no controller
    hybrid_frozen        hybrid_muon with the controller off (frozen at initialisation it multiplies by exactly 1)
    hybrid_random        hybrid_muon's own multipliers at the same lr and seed, shuffled in time
                         (same spread, no information)
    hybrid_no_trust      hybrid_muon without the trust region
    wrap_adamw           `hybrid(torch.optim.AdamW(...))`: the wrapper over torch's own AdamW (fused on a GPU),
                         with hybrid_adam's settings, warmup-cosine
    wrap_sf              the wrapper over schedulefree's AdamWScheduleFree (the bench's warmup, then
                         constant), with hybrid_sf's settings
    wrap_muon            the wrapper over the muon arm's two optimizers, each wrapped (torch.optim.Muon on the
                         hidden matrices, Float32Muon on a CPU; AdamW on the rest), with hybrid_muon's settings

The ablations take apart `distill --hybrid`'s defaults (hybrid_muon); the `muon` arm is all of it off. The
wrap_* arms are the same rule over the optimizers users already have, against the built-in bases of the
three hybrid arms they are named after.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.optim._muon
from torch import nn

from hybridopt.models import modeling
from hybridopt.config import TrainConfig
from hybridopt.optim.arguments import base_defaults
from hybridopt.optim.hybrid import HybridOptimizer
from hybridopt.optim.muon import orthogonalized
from hybridopt.optim.wrapper import hybrid

WEIGHT_DECAY = 0.01
MOMENTUM = 0.9
BETAS = (0.9, 0.95)  # as `hybridopt distill`
SGD_SCALE = 100.0  # SGD's grid is the Adam grid times this
PRODIGY_CENTRE = 1.0  # Prodigy's grid (d_coef) is the Adam grid moved to centre on this


def param_groups(model: nn.Module, muon: bool = False) -> list[dict]:
    """Weight decay on matrices only, as `hybridopt distill` (`modeling.param_groups`)."""
    return modeling.param_groups(model, WEIGHT_DECAY, muon)


class ReplayedMultiplierHybrid(HybridOptimizer):
    """The hybrid optimizer with its controller and learned scale off and the learning-rate multiplier of each
    step taken from a given sequence (the `hybrid_random` ablation: another run's multipliers, shuffled)."""

    def __init__(self, params, multipliers: Sequence[float], **kwargs):
        super().__init__(params, **{**kwargs, "use_controller": False, "learn_scale": False})
        self.multipliers = list(multipliers)

    @torch.no_grad()
    def step(self, loss=None, closure=None):
        m = self.multipliers[min(self.hybrid_state.step, len(self.multipliers) - 1)]
        self.hybrid_state.scale.log_scale = math.log(m)
        return super().step(loss, closure)


def _hybrid_kwargs() -> dict:
    """The settings `hybridopt distill --hybrid` gives the hybrid optimizer (TrainConfig's defaults)."""
    d = TrainConfig()
    return dict(betas=BETAS, use_trust_region=d.trust_region, trust_radius=d.trust_radius,
                adapt_radius=d.adapt_radius, controller_lr=d.controller_lr,
                learn_scale=d.learn_scale, scale_lr=d.scale_lr, scale_threshold=d.scale_threshold,
                min_scale=d.min_scale, radius_start=d.radius_start, use_controller=d.controller)


def _wrapper_kwargs(base: str) -> dict:
    """The settings `hybridopt distill --hybrid --hybrid_base base` gives the hybrid optimizer, as the wrapper's
    options (its base-dependent defaults resolved as `HybridOptimizer` resolves them)."""
    d = TrainConfig()
    min_scale, controller, radius_start = base_defaults(base, d.min_scale, d.controller, d.radius_start)
    return dict(learn_scale=d.learn_scale, scale_lr=d.scale_lr, scale_threshold=d.scale_threshold,
                min_scale=min_scale, trust_radius=d.trust_radius if d.trust_region else None,
                adapt_radius=d.adapt_radius, controller_lr=d.controller_lr, controller=controller,
                radius_start=radius_start)


@dataclass(frozen=True)
class BuildContext:
    """What an arm may need besides the model and the grid value."""

    total_steps: int
    warmup_steps: int
    num_clusters: int = 0
    replay_multipliers: Sequence[float] | None = None  # hybrid_random: the multipliers to shuffle
    seed: int = 0


def _sgd(model, lr, ctx):
    return [torch.optim.SGD(param_groups(model), lr=lr, momentum=MOMENTUM)]


def _adamw(model, lr, ctx):
    return [torch.optim.AdamW(param_groups(model), lr=lr, betas=BETAS)]


def _schedulefree(model, lr, ctx):
    import schedulefree

    return [schedulefree.AdamWScheduleFree(param_groups(model), lr=lr, betas=BETAS, warmup_steps=ctx.warmup_steps)]


def _prodigy(model, d_coef, ctx):
    import prodigyopt

    return [prodigyopt.Prodigy(param_groups(model), lr=1.0, betas=BETAS, d_coef=d_coef, safeguard_warmup=True,
                               use_bias_correction=True)]


def newton_schulz_float32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation (`torch.optim._muon._zeropower_via_newtonschulz`'s signature: the same
    quintic iteration, coefficients and normalisation) computed in float32 instead of bfloat16."""
    return orthogonalized(grad.float(), ns_coefficients, ns_steps, eps).to(grad.dtype)


@contextlib.contextmanager
def _float32_orthogonalisation() -> Iterator[None]:
    module = torch.optim._muon
    if not hasattr(module, "_zeropower_via_newtonschulz"):
        raise RuntimeError("this torch's Muon has no _zeropower_via_newtonschulz to run in float32; "
                           "run the muon arm on a GPU")
    original = module._zeropower_via_newtonschulz
    module._zeropower_via_newtonschulz = newton_schulz_float32
    try:
        yield
    finally:
        module._zeropower_via_newtonschulz = original


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz orthogonalisation in float32, for CPUs.

    torch's iteration runs in bfloat16, the right choice on a GPU; a CPU without bfloat16 matrix units runs it
    about 30x slower than float32 (the distill task's 14 hidden matrices: 4.6 s a step against 0.15 s), which
    kept Muon out of CPU benches. Everything else is torch's Muon; the orthogonalised update differs from the
    bfloat16 one by bfloat16's rounding (about 1% relative). The swap of torch's function lasts one step, in
    this process (bench workers are processes)."""

    @torch.no_grad()
    def step(self, closure=None):
        with _float32_orthogonalisation():
            return super().step(closure)


def _muon(model, lr, ctx):
    hidden, *rest = param_groups(model, muon=True)  # the hidden matrices first, as the hybrid over Muon gets them
    muon = Float32Muon if all(p.device.type == "cpu" for p in hidden["params"]) else torch.optim.Muon
    return [muon(hidden["params"], lr=lr, weight_decay=WEIGHT_DECAY, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(rest, lr=lr, betas=BETAS)]


def _wrapped(base: str) -> Callable:
    """The `hybrid(...)` wrapper over torch's or schedulefree's optimizer(s) standing for `base`."""
    def build(model, lr, ctx):
        if base == "adam":
            on_gpu = next(model.parameters()).device.type == "cuda"
            optimizers = [torch.optim.AdamW(param_groups(model), lr=lr, betas=BETAS, fused=on_gpu or None)]
        elif base == "schedulefree":
            import schedulefree

            optimizers = [schedulefree.AdamWScheduleFree(param_groups(model), lr=lr, betas=BETAS, warmup_steps=0)]
        else:
            optimizers = _muon(model, lr, ctx)
        return [hybrid(opt, **_wrapper_kwargs(base)) for opt in optimizers]
    return build


def _hybrid(base: str, clusters: bool = False, **overrides) -> Callable:
    def build(model, lr, ctx):
        kwargs = {**_hybrid_kwargs(), **overrides}
        return [HybridOptimizer(param_groups(model, muon=base == "muon"), lr=lr, base=base,
                                num_clusters=ctx.num_clusters if clusters else 0, **kwargs)]
    return build


def _hybrid_random(model, lr, ctx):
    if not ctx.replay_multipliers:
        raise ValueError(f"hybrid_random replays {REPLAYED}'s multipliers: run {REPLAYED} first")
    shuffled = list(ctx.replay_multipliers)
    random.Random(ctx.seed).shuffle(shuffled)
    return [ReplayedMultiplierHybrid(param_groups(model, muon=True), shuffled, lr=lr, base="muon",
                                     **_hybrid_kwargs())]


@dataclass(frozen=True)
class Arm:
    """One optimizer setting of the bench.

    Attributes:
        name: short name (results, tables, `--arms`).
        description: one line for the tables.
        family: which grid it runs on: "adam", "sgd" or "prodigy".
        schedule: "cosine" (warmup then cosine to 10%), "warmup" (then constant), "constant", or "none" (the
            optimizer schedules itself).
        clusters: sample cluster-stratified batches.
        build: (model, grid value, BuildContext) -> the optimizers (Muon has two).
    """

    name: str
    description: str
    family: str
    schedule: str
    build: Callable[[nn.Module, float, BuildContext], list[torch.optim.Optimizer]]
    clusters: bool = False

    def grid(self, adam_grid: Sequence[float]) -> list[float]:
        """This arm's values on the shared log grid (the same number of points for every arm)."""
        if self.family == "sgd":
            return [float(f"{v * SGD_SCALE:.3g}") for v in adam_grid]
        if self.family == "prodigy":
            mid = sorted(adam_grid)[len(adam_grid) // 2]
            return [float(f"{v * PRODIGY_CENTRE / mid:.3g}") for v in adam_grid]
        return list(adam_grid)

    @property
    def knob(self) -> str:
        return "d_coef" if self.family == "prodigy" else "lr"


ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("sgd", "SGD momentum 0.9, constant rate (design document baseline)", "sgd", "constant", _sgd),
    Arm("sgd_cosine", "SGD momentum + warmup-cosine", "sgd", "cosine", _sgd),
    Arm("sgd_cosine_clusters", "SGD momentum + warmup-cosine + data clusters", "sgd", "cosine", _sgd, clusters=True),
    Arm("hybrid_sgd", "design document's full hybrid: controller + trust region over SGD momentum, cosine, "
        "data clusters", "sgd", "cosine", _hybrid("sgd", clusters=True), clusters=True),
    Arm("adamw_cosine", "AdamW + warmup-cosine (reference)", "adam", "cosine", _adamw),
    Arm("schedulefree_adamw", "Schedule-Free AdamW", "adam", "none", _schedulefree),
    Arm("prodigy", "Prodigy, warmup-cosine, grid over d_coef", "prodigy", "cosine", _prodigy),
    Arm("muon", "Muon (hidden matrices) + AdamW (embeddings, norms, head), warmup-cosine", "adam", "cosine", _muon),
    Arm("hybrid_adam", "distill --hybrid --hybrid_base adam: learned scale + controller + trust region over Adam, "
        "warmup-cosine", "adam", "cosine",
        _hybrid("adam")),
    Arm("hybrid_muon", "distill --hybrid: learned scale + controller + trust region over Muon "
        "(hidden matrices) and Adam (the rest), warmup-cosine", "adam", "cosine", _hybrid("muon")),
    Arm("hybrid_sf", "distill --hybrid --hybrid_base schedulefree: learned scale (one-sided) + trust region over Schedule-Free AdamW, no "
        "controller, warmup then constant", "adam", "warmup", _hybrid("schedulefree")),
    Arm("hybrid_frozen", "ablation: hybrid_muon, controller off (frozen at initialisation: the learned scale alone)", "adam",
        "cosine", _hybrid("muon", use_controller=False)),
    Arm("hybrid_random", "ablation: hybrid_muon's multipliers shuffled in time", "adam", "cosine", _hybrid_random),
    Arm("hybrid_no_trust", "ablation: hybrid_muon without the trust region", "adam", "cosine",
        _hybrid("muon", use_trust_region=False)),
    Arm("wrap_adamw", "hybrid(torch.optim.AdamW): the wrapper over torch's AdamW, hybrid_adam's settings, "
        "warmup-cosine", "adam", "cosine", _wrapped("adam")),
    Arm("wrap_sf", "hybrid(AdamWScheduleFree): the wrapper over schedulefree's optimizer, hybrid_sf's settings, "
        "warmup then constant", "adam", "warmup", _wrapped("schedulefree")),
    Arm("wrap_muon", "hybrid(torch.optim.Muon) and hybrid(AdamW): the muon arm's two optimizers each wrapped, "
        "hybrid_muon's settings, warmup-cosine", "adam", "cosine", _wrapped("muon")),
]}

REFERENCE = "adamw_cosine"
HYBRID = "hybrid_muon"  # `distill --hybrid`'s defaults: the headline and the design document's claims check it
REPLAYED = HYBRID  # the run whose multipliers hybrid_random shuffles
HYBRIDS = (HYBRID, "hybrid_sf", "hybrid_adam")  # the bases of `distill --hybrid`
BASELINE = "sgd"


def set_lr_scale(optimizers: list[torch.optim.Optimizer], base_lrs: list[list[float]], scale: float) -> None:
    """Set every group's lr to its initial value times `scale` (the schedule's factor at this step)."""
    for opt, lrs in zip(optimizers, base_lrs):
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr * scale
