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
    "HybridOptimizer": "hybridopt.hybrid_optimizer",
    "AuxiliaryNN": "hybridopt.controller",
    "TrainingState": "hybridopt.controller",
    # the design document's API, thin over HybridOptimizer
    "HybridTrainingConfig": "hybridopt.manager",
    "HybridOptimizationManager": "hybridopt.manager",
    "ConstrainedOptimizer": "hybridopt.manager",
    # quantization
    "QATConfig": "hybridopt.qat",
    "QATLinear": "hybridopt.qat",
    "quantize_": "hybridopt.qat",
    "TERNARY": "hybridopt.bits",
    "quantize_weight": "hybridopt.quantizers",
    "dequantize_weight": "hybridopt.quantizers",
    "fake_quantize_weight": "hybridopt.quantizers",
    "PrecisionPlan": "hybridopt.precision_plan",
    "plan_for_model": "hybridopt.precision_plan",
    "export_packed": "hybridopt.export",
    "load_packed": "hybridopt.export",
    # data
    "ClusterStratifiedBatchSampler": "hybridopt.sampler",
    "ShuffledBatchSampler": "hybridopt.sampler",
    "cluster_data": "hybridopt.data_clusters",
    "TokenBlocks": "hybridopt.dataset",
    # training and evaluation
    "kd_loss": "hybridopt.losses",
    "evaluate_lm": "hybridopt.evaluation",
    "Trainer": "hybridopt.training",
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
