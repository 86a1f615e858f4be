"""The optimizer: `HybridOptimizer` (a learned learning-rate scale, the design document's meta-learned controller
and a trust region over an Adam, Schedule-Free, Muon or SGD step), its pure update functions, the controller
network (`AuxiliaryNN`) and the learning-rate schedule.

May import: the core modules (errors, utils). Nothing here knows about models, data or runs.
"""
