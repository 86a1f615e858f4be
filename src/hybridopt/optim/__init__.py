"""The optimizer: `HybridOptimizer` (a learned learning-rate scale, the design document's meta-learned controller
and a trust region over a Muon, Adam, Schedule-Free or SGD step) and the pieces of its rule, one file each:

- `hybrid.py`: `HybridOptimizer`, the `hybrid(base)` wrapper over a torch optimizer it builds by name (`MuonAdamW`,
  torch's AdamW or SGD, schedulefree's AdamWScheduleFree); `RULE_VERSION`.
- `wrapper.py`: `hybrid(base)`, the learned scale, controller and trust region over any torch optimizer's step,
  and the step's state; the rule in its docstring.
- `muon.py`: Muon's orthogonalised direction.
- `muon_adamw.py`: `MuonAdamW`, Muon on the hidden matrices and AdamW on the rest as one torch optimizer, and
  Adam's update.
- `scale.py`: the learned scale, hypergradient descent on the log learning rate.
- `controller.py`: the controller network (`AuxiliaryNN`) and the training-state features it reads.
- `trust_region.py`: the trust region's norms and clip factors, and the radius adaptation.
- `schedules.py`: learning-rate schedules.
- `arguments.py`: the bases, argument ranges and per-base defaults (no torch; the CLI's configs check with them).

May import: the core modules (errors, utils). Nothing here knows about models, data or runs.
"""
