"""hybridopt: distil a language model into a tiny low-bit Llama student.

The public API, importable from the top of the package:

    from hybridopt import HybridOptimizer, AuxiliaryNN, quantize_, QATConfig, ClusterStratifiedBatchSampler

Names are imported on first use (PEP 562), so `hybridopt --help` does not load torch and transformers.
Functions named like their module (`kmeans`) are imported from the module: `from hybridopt.kmeans import kmeans`.
The distillation recipe itself is `hybridopt.recipes.distill` (`run_distill`, `DistillRecipe`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    # the optimizer and its controller
    "HybridOptimizer": "hybridopt.optim.hybrid",
    "AuxiliaryNN": "hybridopt.optim.controller",
    "TrainingState": "hybridopt.optim.controller",
    "hybrid": "hybridopt.optim.wrapper",
    "MuonAdamW": "hybridopt.optim.muon_adamw",
    # the design document's API, thin over HybridOptimizer
    "HybridTrainingConfig": "hybridopt.manager",
    "HybridOptimizationManager": "hybridopt.manager",
    "ConstrainedOptimizer": "hybridopt.manager",
    # quantization
    "QATConfig": "hybridopt.quant.qat",
    "QATLinear": "hybridopt.quant.qat",
    "quantize_": "hybridopt.quant.qat",
    "set_quantization_mix": "hybridopt.quant.qat",
    "TERNARY": "hybridopt.quant.bits",
    "quantize_weight": "hybridopt.quant.quantizers",
    "dequantize_weight": "hybridopt.quant.quantizers",
    "fake_quantize_weight": "hybridopt.quant.quantizers",
    "PrecisionPlan": "hybridopt.quant.precision_plan",
    "plan_for_model": "hybridopt.quant.precision_plan",
    "export_packed": "hybridopt.export.packed",
    "load_packed": "hybridopt.export.packed",
    # students that start from their teacher
    "student_from_teacher": "hybridopt.models.from_teacher",
    "even_layers": "hybridopt.models.from_teacher",
    "measured_layers": "hybridopt.models.from_teacher",
    # data
    "ClusterStratifiedBatchSampler": "hybridopt.data.sampler",
    "ShuffledBatchSampler": "hybridopt.data.sampler",
    "cluster_data": "hybridopt.data.clusters",
    "TokenBlocks": "hybridopt.data.blocks",
    # training and evaluation
    "kd_loss": "hybridopt.training.losses",
    "FeatureDistill": "hybridopt.training.feature_distill",
    "QuantWarmup": "hybridopt.training.quant_warmup",
    "evaluate_lm": "hybridopt.training.evaluation",
    "Trainer": "hybridopt.training.trainer",
    "Reporter": "hybridopt.reporting",
    "DistillConfig": "hybridopt.config",
    "TeacherConfig": "hybridopt.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'hybridopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
