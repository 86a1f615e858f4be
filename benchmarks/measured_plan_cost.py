"""Cost of `--plan_method measured` on the default student, as a ratio to a training step in one run.

    python benchmarks/measured_plan_cost.py [--repeats 5] [--out benchmarks/results]

Measuring one width assignment in context is one pass over the `--calibration_batches` (8) batches
of 16 x 128 tokens with the assignment's quantized weights swapped in (`in_context_loss`). It is
timed alternately with AdamW training steps (forward, backward, step) of the same default
3.41M-parameter student, so machine noise hits both; medians are reported, and the ratio says how
many training steps one assignment costs. Writes `measured_plan_cost.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from hybridopt.training.losses import kd_loss
from hybridopt.quant.precision_plan import in_context_loss
from hybridopt.quant.qat import quantizable_linears
from hybridopt.quant.bits import TERNARY

from common import RESULTS_DIR, default_student_config  # benchmarks/common.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed assignments (and blocks of 8 steps)")
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    cfg = default_student_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (16, 129), generator=g) for _ in range(args.calibration_batches)]
    loss_fn = lambda b: kd_loss(model(input_ids=b[:, :-1]).logits, b[:, 1:])[0]  # noqa: E731
    names = quantizable_linears(model)
    measure = in_context_loss(model, batches, loss_fn, None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    widths = [TERNARY, 2.0, 4.0, 8.0]

    def train_step(b):
        loss_fn(b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    measure(dict.fromkeys(names, TERNARY))  # warm-up (and the quantized weights of one width cached)
    train_step(batches[0])
    assignment, step = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        measure({n: widths[(i + r) % len(widths)] for i, n in enumerate(names)})
        assignment.append(time.perf_counter() - t0)
        for b in batches:
            t0 = time.perf_counter()
            train_step(b)
            step.append(time.perf_counter() - t0)
    result = {
        "threads": torch.get_num_threads(), "calibration_batches": args.calibration_batches,
        "assignment_s": statistics.median(assignment), "train_step_s": statistics.median(step),
        "assignment_in_train_steps": statistics.median(assignment) / statistics.median(step),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "measured_plan_cost.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
