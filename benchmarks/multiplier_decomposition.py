"""Where the hybrid optimizer's learning-rate multiplier moves from, step by step (issue 13).

    python benchmarks/multiplier_decomposition.py [--tasks distill mlp] [--lrs 1e-4 3.16e-3 0.1] [--seeds 0 1 2]
                                                  [--out benchmarks/results]

The multiplier is e^{l_t + c_t}: the learned scale l_t and the controller's correction c_t = f(W_t, x_t)
(weights W_t, normalised training-state features x_t). Each step's change of f splits exactly into

    the learned scale's step        l_t - l_{t-1}
    the controller learning         f(W_t, x_{t-1}) - f(W_{t-1}, x_{t-1})   (weights move, features fixed)
    the features moving             f(W_t, x_t) - f(W_t, x_{t-1})           (features move, weights fixed)

and "applied" is the change of the correction as applied, c_t - c_{t-1} (the sum of the two; rule 10's
`controller_smoothing`, which made it an EMA, is gone).

On the bench's own tasks, budgets, schedule (warmup-cosine) and `distill --hybrid --hybrid_base adam` settings (`hybrid_adam`),
for every learning rate and seed; reported per part as the RMS per step and the largest single step (in log
units: 0.1 is x1.105), plus the final multiplier and validation loss. Writes multiplier_decomposition.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from hybridopt.bench.arms import ARMS, _hybrid_kwargs, param_groups
from hybridopt.bench.tasks import run_arm
from hybridopt.config import BenchConfig
from hybridopt.optim.controller import LR_HEAD
from hybridopt.optim.hybrid import HybridOptimizer
from hybridopt.recipes.bench import _tasks
from hybridopt.reporting import Reporter

from common import RESULTS_DIR  # benchmarks/common.py, beside this script

PARTS = ("scale", "learning", "features", "applied")


class DecomposedHybrid(HybridOptimizer):
    """HybridOptimizer recording each step's change of the log multiplier, split into PARTS."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.parts: dict[str, list[float]] = {k: [] for k in PARTS}

    def _correction(self, weights: dict, x: list[float]) -> float:
        probe = copy.deepcopy(self.controller)
        probe.load_state_dict(weights)
        with torch.no_grad():
            return float(probe(torch.tensor(x))[LR_HEAD])

    def step(self, loss=None, closure=None):
        s = self.hybrid_state
        weights, x, scale, correction = (copy.deepcopy(self.controller.state_dict()), s.prev_features,
                                         s.scale.log_scale, s.correction)
        out = super().step(loss, closure)
        if x is not None and s.prev_features is not None:
            now = self.controller.state_dict()
            before = self._correction(weights, x)
            moved = self._correction(now, x)
            self.parts["scale"].append(s.scale.log_scale - scale)
            self.parts["learning"].append(moved - before)
            self.parts["features"].append(self._correction(now, s.prev_features) - moved)
            self.parts["applied"].append(s.correction - correction)
        return out


RECORDED: list[DecomposedHybrid] = []


def _build(model, lr, ctx):
    opt = DecomposedHybrid(param_groups(model), lr=lr, base="adam", **_hybrid_kwargs())
    RECORDED.append(opt)
    return [opt]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["distill", "mlp"], choices=["distill", "mlp"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3.16e-3, 0.1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    torch.set_num_threads(1)
    arm = replace(ARMS["hybrid_adam"], build=_build)
    rows = []
    for task in _tasks(BenchConfig(task=args.tasks), torch.device("cpu"), Reporter(quiet=True)):
        for lr in args.lrs:
            stats = {k: [] for k in PARTS}
            finals, multipliers = [], []
            for seed in args.seeds:
                result = run_arm(task, arm, lr, seed)
                opt = RECORDED.pop()
                for k in PARTS:
                    stats[k] += opt.parts[k]
                finals.append(result.final_loss)
                multipliers.append(opt.lr_multiplier)
            row = {"task": task.name, "lr": lr, "seeds": args.seeds, "steps": len(stats["scale"]),
                   "final_loss_median": statistics.median(finals), "final_multiplier_median": statistics.median(multipliers)}
            for k in PARTS:
                row[f"{k}_rms"] = math.sqrt(statistics.fmean(v * v for v in stats[k]))
                row[f"{k}_max"] = max(abs(v) for v in stats[k])
            rows.append(row)
            print(f"{task.name:8s} lr {lr:<8.3g} " + "  ".join(f"{k} rms {row[f'{k}_rms']:.4f} max {row[f'{k}_max']:.3f}"
                                                             for k in PARTS)
                  + f"  final x{row['final_multiplier_median']:.2f} loss {row['final_loss_median']:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multiplier_decomposition.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
