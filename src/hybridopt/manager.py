"""The design document's API, as thin entry points over `HybridOptimizer` (no second implementation).

    config = HybridTrainingConfig(base_learning_rate=1e-3)
    manager = HybridOptimizationManager(config)
    for step, (batch, cluster_id) in enumerate(loader):
        loss = model(**batch).loss
        loss.backward()
        metrics = manager.optimization_step(model, loss, None, cluster_id, step)
        model.zero_grad()
    print(manager.summary_text())

Every switch really switches its component off: `use_auxiliary_nn=False` fixes the multipliers at 1,
`use_trust_region=False` removes the bound, `use_clustering=False` hides the batch's cluster from the
controller, `use_quantization=False` keeps full-precision linears (True swaps them for `QATLinear` at
`target_bits` on the first step). The document's `parameter_clusters` (mixed precision) and
`quantizer_scale` fields are not here: the mixed-precision plan is the CLI's `--param_clusters`, and
scales are fixed by the quantizer (absmean/absmax per channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hybridopt.optim.controller import AuxiliaryNN, TrainingState  # noqa: F401  (re-exported for seed users)
from hybridopt.optim.hybrid import HybridOptimizer
from hybridopt.quant.bits import TERNARY, canonical_bits
from hybridopt.quant.qat import QATConfig, qat_layers, quantize_


def _help(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class HybridTrainingConfig:
    """The design document's configuration, with its field names.

    Defaults differ from the document where a measurement says so: `initial_trust_radius` is relative to
    the parameter norm (0.1), `trust_radius_adaptation` is off (noisy on minibatches, see `HybridOptimizer`).
    """

    use_quantization: bool = _help(True, "swap linears for QAT layers at target_bits on the first step")
    use_clustering: bool = _help(True, "show the batch's data cluster to the controller")
    use_auxiliary_nn: bool = _help(True, "learn the lr (scale and controller) and radius multipliers; False fixes them at 1")
    use_trust_region: bool = _help(True, "bound each update's norm by the trust radius")
    data_clusters: int = _help(8, "number of data clusters the cluster ids come from")
    initial_trust_radius: float = _help(0.1, "trust radius relative to the parameter norm")
    trust_radius_adaptation: bool = _help(False, "adapt the radius from actual vs predicted decrease")
    base_learning_rate: float = _help(0.001, "learning rate before the learned multiplier")
    momentum: float = _help(0.9, "Adam beta1")
    weight_decay: float = _help(1e-5, "decoupled weight decay")
    target_bits: float = _help(TERNARY, "weight bits of the QAT layers: 1, 1.58 (ternary), 2, 4 or 8")
    auxiliary_nn_hidden_size: int = _help(16, "hidden width of the auxiliary network")
    auxiliary_nn_learning_rate: float = _help(0.001, "Adam learning rate of the auxiliary network")

    def __post_init__(self):
        for name in ("initial_trust_radius", "base_learning_rate", "auxiliary_nn_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.data_clusters < 1 or self.auxiliary_nn_hidden_size < 1:
            raise ValueError(f"data_clusters and auxiliary_nn_hidden_size must be at least 1, "
                             f"got {self.data_clusters} and {self.auxiliary_nn_hidden_size}")
        if self.use_quantization:
            try:
                canonical_bits(self.target_bits)
            except ValueError as e:
                raise ValueError(f"target_bits: {e}") from None


class HybridOptimizationManager:
    """Orchestrates QAT, the controller and the trust region for a model, one `optimization_step` at a time."""

    def __init__(self, config: HybridTrainingConfig):
        self.config = config
        self.optimizer: HybridOptimizer | None = None
        self.model: torch.nn.Module | None = None

    def prepare(self, model: torch.nn.Module) -> HybridOptimizer:
        """Swap in QAT layers (if asked) and build the optimizer; called by the first step."""
        c = self.config
        if c.use_quantization and not qat_layers(model):
            quantize_(model, QATConfig(bits=c.target_bits))
        self.model = model
        self.optimizer = HybridOptimizer(
            model.parameters(), lr=c.base_learning_rate, betas=(c.momentum, 0.999), weight_decay=c.weight_decay,
            base="adam",
            use_controller=c.use_auxiliary_nn, learn_scale=c.use_auxiliary_nn, use_trust_region=c.use_trust_region,
            trust_radius=c.initial_trust_radius, adapt_radius=c.trust_radius_adaptation,
            controller_lr=c.auxiliary_nn_learning_rate, controller_hidden=c.auxiliary_nn_hidden_size,
            num_clusters=c.data_clusters if c.use_clustering else 0)
        return self.optimizer

    def optimization_step(self, model: torch.nn.Module, loss: torch.Tensor | float,
                          gradients: list[torch.Tensor] | None = None, cluster_id: int | None = None,
                          step: int | None = None) -> dict:
        """Apply one update from `gradients` (default: the parameters' `.grad`); return its metrics."""
        if self.optimizer is None or model is not self.model:
            self.prepare(model)
        if gradients is not None:
            for p, g in zip(model.parameters(), gradients):
                p.grad = g
        self.optimizer.set_cluster(cluster_id if self.config.use_clustering else None)
        loss_value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        self.optimizer.step(loss=loss_value)
        s = self.optimizer.summary()
        lr = self.optimizer.param_groups[0]["lr"] * s["lr_multiplier"]
        return {"step": s["total_steps"] if step is None else step, "loss": loss_value, "learning_rate": lr,
                "lr_multiplier": s["lr_multiplier"], "trust_radius": s["trust_radius"],
                "constraint_active": s["clipped"]}

    def summary_text(self, final_loss: float | None = None) -> str:
        """The design document's summary block."""
        return format_summary(self.optimizer.summary(), final_loss)


def format_summary(summary: dict, final_loss: float | None = None) -> str:
    """The design document's `HYBRID OPTIMIZATION SUMMARY` block from `HybridOptimizer.summary()`."""
    bar = "=" * 60
    lines = [bar, "HYBRID OPTIMIZATION SUMMARY", bar, f"Total Steps: {summary['total_steps']}"]
    if final_loss is not None:
        lines.append(f"Final Loss: {final_loss:.6f}")
    lines += [f"Avg Learning Rate Multiplier: {summary['avg_lr_multiplier']:.2f}x"]
    if "learned_scale" in summary:
        lines.append(f"Final Learned Scale: {summary['learned_scale']:.3g}x")
    radius = summary["trust_radius"]
    lines += [f"Constraint Activation Rate: {100 * summary['constraint_activation_rate']:.1f}%",
              f"Final Trust Radius: {'off' if radius is None else f'{radius:.6f}'}", bar]
    return "\n".join(lines)


class ConstrainedOptimizer:
    """Momentum updates bounded by an absolute trust radius: `||delta theta||_2 <= constraint_radius`.

    Thin over `HybridOptimizer(base="sgd")` with the controller and the learned scale off: each call sets the group's learning
    rate and its parameter-relative `trust_radius` (the absolute radius over the parameter norm).
    """

    def __init__(self, parameters, momentum: float = 0.9):
        self.params = list(parameters)
        self._opt = HybridOptimizer(self.params, lr=1.0, betas=(momentum, 0.0), base="sgd", use_controller=False,
                                    learn_scale=False)

    def step(self, parameters=None, gradients: list[torch.Tensor] | None = None, learning_rate: float = 1e-3,
             constraint_radius: float = 0.01) -> dict:
        """One constrained step; returns the update norm and whether the constraint was active."""
        params = list(parameters) if parameters is not None else self.params
        if [id(p) for p in params] != [id(p) for p in self.params]:
            raise ValueError("ConstrainedOptimizer.step: pass the parameters given at construction, in order")
        if not (learning_rate > 0 and constraint_radius > 0):
            raise ValueError(f"learning_rate and constraint_radius must be positive, "
                             f"got {learning_rate} and {constraint_radius}")
        if gradients is not None:
            for p, g in zip(params, gradients):
                p.grad = g
        before = [p.detach().clone() for p in params]
        pnorm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params))
        self._opt.param_groups[0]["lr"] = learning_rate
        self._opt.hybrid_state.trust_radius = constraint_radius / max(pnorm, 1e-3)
        self._opt.step()
        norm = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(params, before)))
        return {"update_norm": norm, "constraint_active": self._opt.summary()["clipped"],
                "constraint_radius": constraint_radius}
