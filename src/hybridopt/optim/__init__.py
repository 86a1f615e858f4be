"""The optimizer: `HybridOptimizer` (a learned learning-rate scale, the design document's meta-learned controller
and a trust region over an Adam, Schedule-Free, Muon or SGD step) and the pieces of its rule, one file each:

- `hybrid.py`: `HybridOptimizer` and its state; the rule in its docstring.
- `updates.py`: the base updates (Adam, Schedule-Free, SGD momentum), Schedule-Free's averaging, the compiled step.
- `muon.py`: Muon's orthogonalised direction.
- `muon_adamw.py`: `MuonAdamW`, Muon on the hidden matrices and AdamW on the rest as one torch optimizer.
- `wrapper.py`: `hybrid(base)`, the learned scale and trust region over any torch optimizer.
- `scale.py`: the learned scale, hypergradient descent on the log learning rate.
- `controller.py`: the controller network (`AuxiliaryNN`) and the training-state features it reads.
- `trust_region.py`: the trust region's norms and clip factors, and the radius adaptation.
- `schedules.py`: learning-rate schedules.
- `arguments.py`: the bases, argument ranges and per-base defaults (no torch; the CLI's configs check with them).

May import: the core modules (errors, utils). Nothing here knows about models, data or runs.
"""
