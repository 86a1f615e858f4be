"""Cost of the hybrid optimizer against AdamW on the default student, measured as ratios in one run.

    python benchmarks/hybrid_overhead.py [--steps 30] [--blocks 4] [--out benchmarks/results]
        [--muon] [--compile] [--batch_size 16] [--only adamw_foreach muon hybrid_muon]

Times forward+backward+step of the default 3.41M-parameter student (batch 16 x 128 tokens, CE loss) under
AdamW with foreach (the reference of issue 13's cost goal), AdamW as torch builds it by default (one tensor at a
time on CPU), Schedule-Free AdamW (foreach), the hybrid over Schedule-Free (`distill --hybrid --hybrid_base schedulefree`) and the hybrid
over Adam, alternating blocks so machine noise hits all, and reports medians of the whole training step and
of `optimizer.step()` alone, each as a ratio to AdamW foreach's. With `--muon` it adds torch.optim.Muon on the
hidden matrices with AdamW on the rest (the bench's `muon` arm: `Float32Muon` on a CPU) and the hybrid over
Muon (`distill --hybrid --hybrid_base muon`). With `--compile` it adds AdamW foreach with its step under
`torch.compile` (as torch's documentation compiles an optimizer; the rate here is constant); its compilation
happens in the warm-up steps, whose time is reported apart. `--batch_size` sets the sequences of 128 tokens per
step (`optimizer.step()` costs the same at any batch, so its share of the training step falls as the batch
grows); `--only` times only the named optimizers (adamw_foreach, the reference, always). Writes
`hybrid_overhead.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import schedulefree
import torch
from transformers import LlamaForCausalLM

from hybridopt.bench.arms import ARMS, BuildContext
from hybridopt.optim.hybrid import HybridOptimizer
from hybridopt.models.modeling import param_groups

from common import RESULTS_DIR, default_student_config  # benchmarks/common.py, beside this script


class CompiledStep:
    """An optimizer whose `step()` runs under `torch.compile`."""

    def __init__(self, opt):
        self.opt = opt
        self._step = torch.compile(opt.step)

    def step(self):
        self._step()

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)


class Together:
    """Several optimizers stepped as one (Muon on the hidden matrices, AdamW on the rest)."""

    def __init__(self, opts):
        self.opts = opts

    def step(self):
        for opt in self.opts:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.opts:
            opt.zero_grad(set_to_none=set_to_none)


def _timed_steps(model, opt, x, n, hybrid):
    total, step_only = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        t1 = time.perf_counter()
        opt.step(loss=loss.item()) if hybrid else opt.step()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total.append(t2 - t0)
        step_only.append(t2 - t1)
    return total, step_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per optimizer per block")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--compile", action="store_true", help="also the compiled optimizers")
    parser.add_argument("--muon", action="store_true", help="also Muon and the hybrid over Muon")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences of 128 tokens per step")
    parser.add_argument("--only", nargs="+", help="time only these optimizers (and adamw_foreach)")
    args = parser.parse_args()
    cfg = default_student_config()
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, 128), generator=torch.Generator().manual_seed(0))
    makers = {
        "adamw_foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), foreach=True),
        "adamw_default": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95)),
        "schedulefree_adamw": lambda m: schedulefree.AdamWScheduleFree(m.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                                                     warmup_steps=0, foreach=True),
        "hybrid": lambda m: HybridOptimizer(m.parameters(), lr=1e-3, betas=(0.9, 0.95), base="schedulefree"),
        "hybrid_adam": lambda m: HybridOptimizer(m.parameters(), lr=1e-3, betas=(0.9, 0.95), base="adam"),
    }
    if args.muon:
        makers.update({
            "muon": lambda m: Together(ARMS["muon"].build(m, 1e-3, BuildContext(total_steps=1, warmup_steps=1))),
            "hybrid_muon": lambda m: HybridOptimizer(param_groups(m, 0.0, muon=True), lr=1e-3, betas=(0.9, 0.95),
                                                     base="muon"),
        })
    if args.compile:
        makers.update({
            "adamw_foreach_compiled": lambda m: CompiledStep(torch.optim.AdamW(
                m.parameters(), lr=1e-3, betas=(0.9, 0.95), foreach=True)),
        })
    if args.only:
        unknown = set(args.only) - set(makers)
        if unknown:
            parser.error(f"--only: unknown {sorted(unknown)} (with --muon/--compile: {sorted(makers)})")
        makers = {k: v for k, v in makers.items() if k == "adamw_foreach" or k in args.only}
    warmup_s = {}
    runs = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        opt = make(model)
        getattr(opt, "train", lambda: None)()  # Schedule-Free steps in train mode
        start = time.perf_counter()
        _timed_steps(model, opt, x, 3, isinstance(opt, HybridOptimizer))  # warm-up (and compilation)
        warmup_s[name] = time.perf_counter() - start
        runs[name] = (model, opt, [], [])
    for _ in range(args.blocks):
        for name, (model, opt, total, step_only) in runs.items():
            t, s = _timed_steps(model, opt, x, args.steps, isinstance(opt, HybridOptimizer))
            total += t
            step_only += s
    med = {name: (statistics.median(r[2]), statistics.median(r[3])) for name, r in runs.items()}
    ref = med["adamw_foreach"]
    result = {
        "parameters": sum(p.numel() for p in runs["adamw_foreach"][0].parameters()),
        "threads": torch.get_num_threads(), "blocks": args.blocks, "steps_per_block": args.steps,
        "batch": [args.batch_size, 128],
        "adamw_foreach_train_step_s": ref[0], "adamw_foreach_optimizer_step_s": ref[1],
        "optimizer_step_ratio": {name: m[1] / ref[1] for name, m in med.items() if name != "adamw_foreach"},
        "train_step_ratio": {name: m[0] / ref[0] for name, m in med.items() if name != "adamw_foreach"},
        "warmup_3_steps_s": warmup_s,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hybrid_overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
