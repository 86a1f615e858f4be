r"""HybridOptimizer: the `hybrid(base)` wrapper over a base it builds by name, with the CLI's arguments.

    HybridOptimizer(params, lr, base="muon")  ==  hybrid(MuonAdamW(params, lr), controller=AuxiliaryNN(), ...)

The rule is the wrapper's (`wrapper.py`): the base takes its step d_t, which is scaled by the learned
e^{\ell_t + c_t} and clipped to the trust radius \rho_t e^{r_t} \max(\|\theta_t\|, 10^{-3}):

    \Delta\theta_t = e^{\ell_t + c_t} d_t \min(1, \mu_t / (e^{\ell_t + c_t} \|d_t\|_2))

with \ell learned by normalised hypergradient descent on h_t = g_t \cdot \Delta\theta_{t-1} (`scale.py`) and
(c_t, r_t) from the design document's controller network (`controller.py`). The bases, each a torch optimizer
with decoupled weight decay \lambda at the group's rate \eta:

    "muon"          `MuonAdamW`: Muon's orthogonalised Nesterov momentum on the matrices of groups that keep
                    `orthogonalize` (the default), Adam's step on the rest (`muon_adamw.py`)
    "adam"          torch.optim.AdamW: -\eta (\hat m_t / (\sqrt{\hat v_t} + \epsilon) + \lambda \theta_t)
    "schedulefree"  schedulefree.AdamWScheduleFree (no warmup of its own): the scale multiplies its rate, the
                    trust region clips z's step; call `eval()` before evaluating or saving, `train()` after
    "sgd"           torch.optim.SGD with momentum \beta_1 (weight decay added to the gradient, as torch's SGD)

"muon" is the default in Python as on the command line: in `hybridopt bench` the hybrid over Muon was the one
arm within 5% of the best at every learning rate of the grid on every task (docs/RESULTS.md).

Rule 11 (this file since 2026-12-06) takes rule 10's steps (the built-in implementation that preceded it) to
float rounding over Adam, Muon and Schedule-Free AdamW: `tests/optim/test_hybrid_reference.py` holds both to
the same line-by-line reference. It differs over SGD with weight decay (rule 10 decoupled it), and it dropped
rule 10's `trust_mode="per_tensor"`, `trace_decay`, `controller_smoothing`, `learn_controller` and `compile`.
"""

from __future__ import annotations

import torch

from hybridopt.optim.arguments import check, checked_arguments
from hybridopt.optim.controller import AuxiliaryNN
from hybridopt.optim.muon_adamw import MuonAdamW
from hybridopt.optim.wrapper import HybridWrapper

RULE_VERSION = 11  # bumped with every change to what a step computes (names the hybrid-trained teachers' cache entries)
DEFAULT_BASE = "muon"


def build_base(params, base: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               muon_momentum: float) -> torch.optim.Optimizer:
    """The torch optimizer `HybridOptimizer` wraps for `base` (one of `BASES`)."""
    if base == "muon":
        return MuonAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=muon_momentum)
    if base == "adam":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if base == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=weight_decay)
    import schedulefree  # noqa: PLC0415 (0.2 s of import, only for this base)

    opt = schedulefree.AdamWScheduleFree(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                         warmup_steps=0)
    opt.train()  # schedulefree builds its optimizers in eval mode
    return opt


def _check_group(group) -> None:
    check(not (isinstance(group, dict) and "trust_radius" in group), "a param group cannot set its own "
          "trust_radius: the trust region bounds one norm over all parameters, so there is one trust_radius for all "
          "parameters (the optimizer's argument)")


class HybridOptimizer(HybridWrapper):
    """The learned step scale, the design document's controller and the trust region over a base built by name.

    Args:
        params: parameters or param groups (a group may set its own `lr` and `weight_decay`; over "muon", a
            group with `"orthogonalize": False` takes Adam's step: give embeddings and the output head one, as
            Muon's authors advise; `hybridopt.models.modeling.param_groups(model, wd, muon=True)` does).
        lr: the base's learning rate, the learned scale's starting point (schedulers scale it).
        betas: Adam's betas (beta1 is the momentum of "sgd" and the interpolation of "schedulefree").
        eps: Adam's epsilon.
        weight_decay: the base's weight decay (decoupled, but coupled for "sgd").
        base: "muon" (the default), "adam", "schedulefree" or "sgd" (the module docstring says what each is).
        learn_scale, scale_lr, scale_betas, scale_threshold, min_scale, radius_start, adapt_radius,
            controller_lr, num_clusters: as `hybrid(...)`'s (`HybridWrapper`); min_scale and radius_start
            default by base (`arguments.base_defaults`).
        use_controller: add the controller network (None: off over "schedulefree", on otherwise).
        use_trust_region: bound each step's norm by the trust radius.
        trust_radius: the initial radius, relative to the parameters' norm.
        controller_hidden: the controller network's hidden width.
        muon_momentum: the momentum of Muon's Nesterov buffer with base "muon".
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, base: str = DEFAULT_BASE, learn_scale: bool = True,
                 scale_lr: float = 0.1, scale_betas: tuple[float, float] = (0.9, 0.99), scale_threshold: float = 0.5,
                 use_controller: bool | None = None, use_trust_region: bool = True, trust_radius: float = 0.1,
                 adapt_radius: bool = False, controller_lr: float = 1e-3, controller_hidden: int = 16,
                 num_clusters: int = 0, min_scale: float | None = None, radius_start: float | None = None,
                 muon_momentum: float = 0.95):
        min_scale, use_controller, radius_start = checked_arguments(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, base=base, scale_lr=scale_lr,
            scale_betas=scale_betas, scale_threshold=scale_threshold, use_controller=use_controller,
            adapt_radius=adapt_radius, controller_lr=controller_lr, controller_hidden=controller_hidden,
            num_clusters=num_clusters, min_scale=min_scale, radius_start=radius_start, muon_momentum=muon_momentum)
        check(trust_radius > 0, f"trust_radius must be positive, got {trust_radius}")
        params = list(params)
        for group in params:
            _check_group(group)
        # drawn from the caller's random stream even when off, as rule 10 drew it (the runs after it unchanged)
        controller = AuxiliaryNN(controller_hidden)
        super().__init__(build_base(params, base, lr, tuple(betas), eps, weight_decay, muon_momentum),
                         learn_scale=learn_scale, scale_lr=scale_lr, scale_threshold=scale_threshold,
                         scale_betas=scale_betas, min_scale=min_scale, radius_start=radius_start,
                         trust_radius=trust_radius if use_trust_region else None, adapt_radius=adapt_radius,
                         controller=controller if use_controller else False, controller_lr=controller_lr,
                         num_clusters=num_clusters)
        self.base_name = base

    def add_param_group(self, param_group: dict) -> None:
        _check_group(param_group)
        super().add_param_group(param_group)

    @property
    def use_controller(self) -> bool:
        return self.controller is not None

    def load_state_dict(self, state_dict: dict) -> None:
        check("wrapper_version" in state_dict or "hybrid" not in state_dict, "this optimizer state was saved by "
              f"HybridOptimizer's rule 10 or earlier (its own built-in steps); rule {RULE_VERSION} wraps torch "
              "optimizers and cannot continue it: resume with the hybridopt that saved it, or start the run anew")
        super().load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base_name!r}, scale={self.scale:.4g})"
