"""Training: the `Trainer` (one loop, one step) and the objectives it takes, the distillation losses, evaluation,
atomic checkpoints, torchrun data parallelism, metrics files, the files of a run folder, the default teacher, and
the measured quantization report.

May import: the core modules, quant, optim, export, models, data and the run configs.
"""
