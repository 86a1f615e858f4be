"""Cost of the hybrid optimizer against AdamW on the default student, measured as ratios in one run.

    python benchmarks/hybrid_overhead.py [--steps 30] [--out benchmarks/results]

Times forward+backward+step of the default 3.41M-parameter student (batch 16 x 128 tokens, CE loss),
alternating AdamW and HybridOptimizer blocks so machine noise hits both, and reports medians of:
the whole training step, and `optimizer.step()` alone. Writes `hybrid_overhead.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from hybridopt.hybrid_optimizer import HybridOptimizer

from common import default_student_config  # benchmarks/common.py, beside this script


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
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    cfg = default_student_config()
    x = torch.randint(0, cfg.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name in ("adamw", "hybrid"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        opt = (HybridOptimizer(model.parameters(), lr=1e-3, betas=(0.9, 0.95)) if name == "hybrid"
               else torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95)))
        _timed_steps(model, opt, x, 3, name == "hybrid")  # warm-up
        runs[name] = (model, opt, [], [])
    for _ in range(args.blocks):
        for name, (model, opt, total, step_only) in runs.items():
            t, s = _timed_steps(model, opt, x, args.steps, name == "hybrid")
            total += t
            step_only += s
    med = {name: (statistics.median(r[2]), statistics.median(r[3])) for name, r in runs.items()}
    result = {
        "parameters": sum(p.numel() for p in runs["adamw"][0].parameters()),
        "threads": torch.get_num_threads(),
        "adamw_train_step_s": med["adamw"][0], "hybrid_train_step_s": med["hybrid"][0],
        "adamw_optimizer_step_s": med["adamw"][1], "hybrid_optimizer_step_s": med["hybrid"][1],
        "train_step_ratio": med["hybrid"][0] / med["adamw"][0],
        "optimizer_step_ratio": med["hybrid"][1] / med["adamw"][1],
        "overhead_fraction_of_adamw_train_step": (med["hybrid"][1] - med["adamw"][1]) / med["adamw"][0],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hybrid_overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
