"""The design document's module name, from a checkout: `from hybrid_optimization import HybridOptimizationManager`.

Re-exports `hybridopt.manager` (and the controller's `AuxiliaryNN`, `TrainingState`); the package is the
source of truth.
"""
from hybridopt.optim.controller import AuxiliaryNN, TrainingState
from hybridopt.manager import ConstrainedOptimizer, HybridOptimizationManager, HybridTrainingConfig, format_summary

__all__ = ["AuxiliaryNN", "ConstrainedOptimizer", "HybridOptimizationManager", "HybridTrainingConfig", "TrainingState",
           "format_summary"]
