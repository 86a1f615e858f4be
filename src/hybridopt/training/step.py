"""How an optimizer is built, stepped and reported: the one place that knows the hybrid optimizer (and the
`hybrid(base)` wrapper) takes more than gradients (the batch's loss, its data cluster) and reports more (its multiplier, radius and clips). The
Trainer and the bench both step through `step_optimizer`.
"""

from __future__ import annotations

import torch

from hybridopt.config import OptimizerConfig
from hybridopt.models.modeling import param_groups
from hybridopt.optim.hybrid import HybridOptimizer
from hybridopt.optim.wrapper import HybridWrapper

HYBRID_BASE_NAMES = {"muon": "Muon (hidden matrices) and AdamW (embeddings, head, norms)",
                     "schedulefree": "Schedule-Free AdamW", "adam": "AdamW", "sgd": "SGD momentum"}


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module, num_clusters: int = 0) -> torch.optim.Optimizer:
    """AdamW, or the hybrid optimizer with `cfg.hybrid`; weight decay on matrices only (not norms or biases);
    over Muon, the embeddings and the output head take Adam's step (`modeling.param_groups`)."""
    groups = param_groups(model, cfg.weight_decay, muon=cfg.hybrid and cfg.hybrid_base == "muon")
    if cfg.hybrid:
        return HybridOptimizer(groups, lr=cfg.lr, betas=(0.9, 0.95), base=cfg.hybrid_base,
                               use_trust_region=cfg.trust_region,
                               trust_radius=cfg.trust_radius, adapt_radius=cfg.adapt_radius,
                               learn_scale=cfg.learn_scale, scale_lr=cfg.scale_lr,
                               scale_threshold=cfg.scale_threshold, min_scale=cfg.min_scale,
                               radius_start=cfg.radius_start,
                               use_controller=cfg.controller,
                               controller_lr=cfg.controller_lr, num_clusters=num_clusters)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def step_optimizer(opt: torch.optim.Optimizer, loss: float, cluster: int | None = None) -> None:
    """One update from the gradients in place: the hybrid optimizer also takes the batch's loss (the same on
    every rank under torchrun, so every rank decides alike) and the data cluster it came from (None: mixed)."""
    if isinstance(opt, HybridWrapper):
        opt.set_cluster(cluster)
        opt.step(loss=loss)
    else:
        opt.step()


def lr_multiplier(opt: torch.optim.Optimizer) -> float | None:
    """The hybrid optimizer's current learning-rate multiplier (the wrapper's: its scale of the base's step);
    None for any other optimizer."""
    return opt.scale if isinstance(opt, HybridWrapper) else None


def optimizer_metrics(opt: torch.optim.Optimizer) -> dict:
    """The hybrid optimizer's multiplier, radius and last clip for a metrics row ({} for any other)."""
    if not isinstance(opt, HybridOptimizer):
        return {}
    s = opt.summary()
    return {"lr_mult": s["lr_multiplier"], "trust_radius": s["trust_radius"], "clipped": int(s["clipped"])}


def optimizer_summary(opt: torch.optim.Optimizer) -> dict | None:
    """The hybrid optimizer's run summary (results.json, the design document's summary block); None otherwise."""
    return opt.summary() if isinstance(opt, HybridOptimizer) else None


def describe_optimizer(opt: torch.optim.Optimizer) -> str | None:
    """The `Optimizer:` line `--hybrid` prints (its base and which parts are on); None for plain AdamW."""
    if not isinstance(opt, HybridOptimizer):
        return None
    on = {True: "on", False: "off"}
    return (f"Optimizer: hybrid over {HYBRID_BASE_NAMES[opt.base_name]} (--hybrid_base {opt.base_name}); learned scale "
            f"{on[opt.learn_scale]}, controller {on[opt.use_controller]}, trust region {on[opt.use_trust_region]}")
