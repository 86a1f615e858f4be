"""The `hybrid(base)` wrapper's own cost on the default student: its `step()` minus the base's, per AdamW step.

    python benchmarks/wrapper_cost.py [--rounds 12] [--steps 15] [--warmup 5] [--threads 2] [--out benchmarks/results]
        [--name wrapper_cost]

The issue's goal: the wrapper's own cost (its step minus the base's) at most 0.3 of an AdamW step on the
default student. The default student (benchmarks/common.py: the Llama `hybridopt distill` builds, 2 layers,
hidden 256, vocab 4096, 3.41M parameters) gets one fixed set of random gradients (the step's cost does not
depend on their values); each optimizer steps its own copy of the model with them. Pairs, each base against the
wrapper over it with its default options (learned scale, trust radius 0.1, the loss passed as a 0-d tensor):
AdamW (foreach, the reference), SGD with momentum (foreach) and RMSprop (foreach), plus the wrapper over AdamW
without a trust region (`trust_radius=None`: the snapshot, delta and read-back alone). After `--warmup`
steps each, the optimizers take turns one `step()` at a time, `--steps` timed calls each per round, for
`--rounds` rounds (the order reversed every other round), so load from other processes hits all alike; medians
over every timed call are reported, and the own cost is

    (median hybrid(base) step - median base step) / median AdamW step

(also per base step; per round, whose spread shows the noise; and from the lower quartiles of the step times,
which load from other processes moves less). Writes `--name`.json and `--name`.md (wrapper_cost.json and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hybridopt import hybrid
from hybridopt.models.modeling import build_model

from common import RESULTS_DIR, default_student_config  # benchmarks/common.py, beside this script

LR = {"adamw": 1e-3, "sgd": 1e-2, "rmsprop": 1e-3}
BASES = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=LR["adamw"], betas=(0.9, 0.95), weight_decay=0.1, foreach=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=LR["sgd"], momentum=0.9, foreach=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=LR["rmsprop"], foreach=True),
}
# name -> (base, wrapper options or None for the bare base)
ARMS = {
    "adamw": ("adamw", None), "hybrid(adamw)": ("adamw", {}),
    "hybrid(adamw), no trust region": ("adamw", {"trust_radius": None}),
    "sgd": ("sgd", None), "hybrid(sgd)": ("sgd", {}),
    "rmsprop": ("rmsprop", None), "hybrid(rmsprop)": ("rmsprop", {}),
}


def make_arm(base: str, options: dict | None, grads: list[torch.Tensor]):
    """A fresh student (the same weights every time) holding `grads`, and the optimizer over it."""
    model = build_model(default_student_config(), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = BASES[base](params)
    return (hybrid(opt, **options) if options is not None else opt), params


def timed_step(opt, wrapped: bool, loss: torch.Tensor) -> float:
    start = time.perf_counter()
    opt.step(loss=loss) if wrapped else opt.step()
    return time.perf_counter() - start


def quartile(values: list[float]) -> float:
    return statistics.quantiles(values, n=4)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12, help="rounds of turns")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per optimizer per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="wrapper_cost", help="the results' file name, without .json / .md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [p.shape for p in build_model(default_student_config(), seed=0).parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    grads = [1e-3 * torch.randn(s, generator=g) for s in shapes]
    loss = torch.tensor(3.0)  # what a training loop passes: the step's loss, a 0-d tensor

    load_before = os.getloadavg()[0]  # other processes on the machine: their load moves the times
    arms = {name: make_arm(base, options, grads) for name, (base, options) in ARMS.items()}
    for _ in range(args.warmup):
        for name, (opt, _) in arms.items():
            timed_step(opt, ARMS[name][1] is not None, loss)
    times = {name: [] for name in arms}
    rounds = {name: [] for name in arms}  # each round's median
    for r in range(args.rounds):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))  # neither side always goes first
        this_round = {name: [] for name in arms}
        for _ in range(args.steps):  # one step each in turn: a burst of load from elsewhere hits every arm
            for name in order:
                this_round[name].append(timed_step(arms[name][0], ARMS[name][1] is not None, loss))
        for name, t in this_round.items():
            times[name] += t
            rounds[name].append(statistics.median(t))
    for name, (opt, params) in arms.items():  # the steps did happen, and stayed finite
        assert all(torch.isfinite(p).all() for p in params), name
        if ARMS[name][1] is not None:
            assert opt.hybrid_state.step == args.warmup + args.rounds * args.steps, name

    median = {name: statistics.median(t) for name, t in times.items()}
    lower = {name: quartile(t) for name, t in times.items()}  # less moved by load from other processes
    adamw = median["adamw"]
    per_round_adamw = rounds["adamw"]
    costs = {}
    for name, (base, options) in ARMS.items():
        if options is None:
            continue
        per_round = [(h - b) / a for h, b, a in zip(rounds[name], rounds[base], per_round_adamw)]
        costs[name] = {"base": base, "options": options,
                       "own_cost_per_adamw_step": (median[name] - median[base]) / adamw,
                       "own_cost_per_base_step": (median[name] - median[base]) / median[base],
                       "own_cost_ms": (median[name] - median[base]) * 1e3,
                       "own_cost_per_adamw_step_from_lower_quartiles": (lower[name] - lower[base]) / lower["adamw"],
                       "per_round_own_cost_per_adamw_step": {"median": statistics.median(per_round),
                                                             "min": min(per_round), "max": max(per_round)}}
    n_params = sum(p.numel() for p in arms["adamw"][1])
    command = (f"python benchmarks/wrapper_cost.py --rounds {args.rounds} --steps {args.steps} "
               f"--warmup {args.warmup} --threads {args.threads}"
               + (f" --name {args.name}" if args.name != "wrapper_cost" else ""))
    result = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": f"cpu, {torch.get_num_threads()} threads, {os.cpu_count()} cores", "torch": torch.__version__,
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
              "student": {"parameters": n_params, "tensors": len(arms["adamw"][1]), "layers": 2, "hidden": 256,
                          "vocab": default_student_config().vocab_size},
              "goal": "own cost per AdamW step <= 0.3", "rounds": args.rounds, "steps_per_round": args.steps,
              "warmup_steps": args.warmup, "learning_rates": LR,
              "median_step_ms": {name: m * 1e3 for name, m in median.items()},
              "lower_quartile_step_ms": {name: q * 1e3 for name, q in lower.items()}, "own_cost": costs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    load = result["load_average_1min"]
    lines = [f"Produced by `{command}` on {result['device']} (torch {result['torch']}), {result['date']}; "
             f"1-minute load average {load['before']:.1f} before, {load['after']:.1f} after.", "",
             f"Default student, {n_params:,} parameters in {result['student']['tensors']} tensors, fixed random "
             f"gradients; median of {args.rounds} x {args.steps} timed `step()` calls per optimizer, taken in turns. "
             "Goal: the wrapper's own cost at most 0.3 of an AdamW step.", "",
             "| optimizer | step (ms) | own cost (ms) | own cost / AdamW step | own cost / base step | "
             "per-round own cost / AdamW step (min .. max) | from lower quartiles |", "|---|---|---|---|---|---|---|"]
    for name, m in median.items():
        c = costs.get(name)
        if c is None:
            lines.append(f"| {name} | {m * 1e3:.2f} | | | | | |")
        else:
            pr = c["per_round_own_cost_per_adamw_step"]
            lines.append(f"| {name} | {m * 1e3:.2f} | {c['own_cost_ms']:.2f} | {c['own_cost_per_adamw_step']:.2f} | "
                         f"{c['own_cost_per_base_step']:.2f} | {pr['min']:.2f} .. {pr['max']:.2f} | "
                         f"{c['own_cost_per_adamw_step_from_lower_quartiles']:.2f} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
