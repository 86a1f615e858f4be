"""Validation loss against stored bits: the measured and Fisher plans vs uniform widths vs a random plan.

    python benchmarks/precision_pareto.py [--epochs 20] [--clusters 4] [--out benchmarks/results]

Two tables on the embedded default.

Post-training quantization (PTQ): one full-precision `hybridopt distill --no-baseline --epochs N`
student, measured once (Fisher on the calibration batches `distill` uses), then quantized by
plans at several budgets and evaluated: the Fisher plan with K parameter clusters (the width
assignment with the lowest Fisher-weighted error), the measured plan (the same clusters, the
assignment with the lowest cross-entropy on the calibration batches), the per-layer optimum of the
Fisher error (every layer its own cluster), and random plans (the Fisher plan's widths shuffled among
same-shape layers; mean and range over `--random_seeds` shuffles).

Quantization-aware training (QAT): every arm is `hybridopt distill --qat --param_clusters K
--no-baseline --epochs N`, so all share the schedule (one full-precision epoch, then QAT with the plan):

* uniform ternary: `--ternary --avg_bits 1.58` (the plan can only be all-ternary);
* measured plan at a budget B: `--ternary --avg_bits B` (the default `--plan_method measured`);
* Fisher plan at B: `--ternary --avg_bits B --plan_method sensitivity`;
* random at B: `--ternary --avg_bits B --plan_method random` (the Fisher plan's widths shuffled among
  layers of the same shape: same bits, placement not by sensitivity);
* uniform 2-bit and 4-bit: `--bits 2 --avg_bits 2`, `--bits 4 --avg_bits 4`.

Writes `precision_pareto_ptq.{json,md}` and (unless --skip_qat) `precision_pareto.{json,md}` under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hybridopt.config import DistillConfig
from hybridopt.data.splits import corpus_documents, token_splits
from hybridopt.training.evaluation import evaluate_lm
from hybridopt.models.modeling import load_teacher
from hybridopt.quant.precision_plan import build_plan, calibration_batches, in_context_loss, measure_layers, mix_name
from hybridopt.quant.qat import QATConfig, quantizable_linears, quantize_
from hybridopt.quant.bits import TERNARY
from hybridopt.recipes.distill import run_distill
from hybridopt.reporting import Reporter
from hybridopt.training.default_teacher import ensure_default_teacher
from hybridopt.training.objectives import objective_for
from hybridopt.training.trainer import Trainer

from common import RESULTS_DIR  # benchmarks/common.py, beside this script


def ptq_table(epochs: int, clusters: int, budgets: list[float], random_seeds: int,
              runs: Path) -> tuple[list[dict], list[dict]]:
    """Rows of the PTQ table (one full-precision student, many plans), and the one-layer table."""
    run_dir = runs / "fp"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = DistillConfig(epochs=epochs, baseline=False, out=str(run_dir))
    run_distill(cfg, Reporter(quiet=True))
    device = torch.device("cpu")
    teacher, tokenizer = load_teacher(ensure_default_teacher(), device)
    docs, _ = corpus_documents([])
    train, val = token_splits(docs, tokenizer, cfg.seq_len, cfg.val_fraction)
    student = AutoModelForCausalLM.from_pretrained(str(run_dir / "student"), dtype=torch.float32)
    recipe = Trainer(cfg, student, train, val, runs / "scratch", device,
                     objective_for(teacher, alpha=cfg.alpha, temperature=cfg.temperature), reporter=Reporter(quiet=True))
    names = quantizable_linears(student)
    batches = calibration_batches(len(train), cfg.batch_size, cfg.calibration_batches, cfg.seed)
    measured = {base: measure_layers(student, names, batches, lambda b: recipe.batch_loss(b)[0], base, None)
                for base in (TERNARY, 4.0)}
    calibration_ce = in_context_loss(student, batches, recipe.batch_ce, None)  # what `distill` measures plans by

    def evaluate(layer_bits: dict[str, float] | None) -> float:
        model = copy.deepcopy(student)
        if layer_bits is not None:
            quantize_(model, QATConfig(bits=TERNARY, layer_bits=layer_bits))
        return evaluate_lm(model, val, cfg.batch_size, device)["loss"]

    def row(arm: str, plan, loss: float, **extra) -> dict:
        r = {"arm": arm, "mix": mix_name(plan.layer_bits), "bits": plan.stored_bits + plan.scale_bits,
             "fisher_error": plan.sensitivity, "val_loss": loss, **extra}
        print(f"PTQ {arm}: val loss {loss:.4f} at {r['bits']:.3f} bits/weight ({r['mix']})", file=sys.stderr)
        return r

    rows = [{"arm": "full precision", "mix": "fp32", "bits": 32.0, "fisher_error": 0.0, "val_loss": evaluate(None)}]
    for base in (TERNARY, 2.0, 4.0, 8.0):
        table, numel, scale_bits = measured[min(base, 4.0) if base != 2.0 else TERNARY]
        table = {n: {b: e for b, e in t.items() if b >= base} for n, t in table.items()}  # base = the floor
        plan = build_plan(table, numel, 1, base, scale_bits)
        rows.append(row(f"uniform {mix_name(plan.layer_bits).split(' x')[0]}", plan, evaluate(plan.layer_bits)))
    table, numel, scale_bits = measured[TERNARY]
    for budget in budgets:
        plan = build_plan(table, numel, clusters, budget, scale_bits)
        rows.append(row(f"Fisher plan, K={clusters}, budget {budget:g}", plan, evaluate(plan.layer_bits)))
        chosen = build_plan(table, numel, clusters, budget, scale_bits, method="measured", measure=calibration_ce)
        rows.append(row(f"measured plan, K={clusters}, budget {budget:g}", chosen, evaluate(chosen.layer_bits),
                        calibration_loss=chosen.measured_loss, candidates=chosen.measured_count))
        optimum = build_plan(table, numel, len(names), budget, scale_bits)
        rows.append(row(f"per-layer optimum, budget {budget:g}", optimum, evaluate(optimum.layer_bits)))
        shuffled = [build_plan(table, numel, clusters, budget, scale_bits, seed=s, method="random")
                    for s in range(random_seeds)]
        losses = [evaluate(p.layer_bits) for p in shuffled]
        rows.append(row(f"random, budget {budget:g}", shuffled[0], statistics.mean(losses),
                        fisher_error_mean=statistics.mean(p.sensitivity for p in shuffled),
                        val_loss_min=min(losses), val_loss_max=max(losses), seeds=random_seeds))
        rows[-1]["fisher_error"] = rows[-1].pop("fisher_error_mean")
    # The plan sums per-layer errors as if they were independent. Test that in context: every layer
    # alone raised to 8 bits in the all-ternary model, and alone left ternary in the all-8-bit model.
    ternary, eight = dict.fromkeys(names, TERNARY), dict.fromkeys(names, 8.0)
    table = measured[TERNARY][0]
    one_layer = [{"layer": n, "fisher_ternary": table[n][TERNARY], "fisher_8": table[n][8.0],
                  "raised_to_8": evaluate({**ternary, n: 8.0}), "alone_ternary": evaluate({**eight, n: TERNARY})}
                 for n in names]
    return rows, one_layer


def arms(budgets: list[float]) -> dict[str, dict]:
    out = {"uniform ternary": {"ternary": True, "avg_bits": TERNARY}}
    for b in budgets:
        out[f"measured plan, budget {b:g}"] = {"ternary": True, "avg_bits": b}
        out[f"Fisher plan, budget {b:g}"] = {"ternary": True, "avg_bits": b, "plan_method": "sensitivity"}
        out[f"random, budget {b:g}"] = {"ternary": True, "avg_bits": b, "plan_method": "random"}
    out["uniform 2-bit"] = {"bits": 2.0, "avg_bits": 2.0}
    out["uniform 4-bit"] = {"bits": 4.0, "avg_bits": 4.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--ptq_budgets", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0])
    parser.add_argument("--random_seeds", type=int, default=5)
    parser.add_argument("--skip_qat", action="store_true", help="only the PTQ table")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    ptq, one_layer = ptq_table(args.epochs, args.clusters, args.ptq_budgets, args.random_seeds,
                               out / "runs" / "precision-ptq")
    (out / "precision_pareto_ptq.json").write_text(json.dumps({"arms": ptq, "one_layer": one_layer}, indent=2))
    lines = ["| arm (PTQ) | widths | bits/weight (codes + scales) | Fisher-weighted error | val loss | val ppl |",
             "|---|---|---|---|---|---|"]
    for r in ptq:
        loss = f"{r['val_loss']:.4f}"
        if "val_loss_min" in r:
            loss += f" ({r['val_loss_min']:.4f}-{r['val_loss_max']:.4f}, {r['seeds']} shuffles)"
        lines.append(f"| {r['arm']} | {r['mix']} | {r['bits']:.3f} | {r['fisher_error']:.3g} | {loss} | "
                     f"{math.exp(r['val_loss']):.2f} |")
    all_ternary = next(r["val_loss"] for r in ptq if r["arm"] == "uniform ternary")
    all_eight = next(r["val_loss"] for r in ptq if r["arm"] == "uniform 8-bit")
    lines += ["", f"One layer at a time (PTQ; all ternary: val loss {all_ternary:.4f}, all 8-bit: {all_eight:.4f}):",
              "", "| layer | Fisher-weighted error, ternary | val loss, this layer alone 8-bit | "
              "val loss, this layer alone ternary |", "|---|---|---|---|"]
    for r in one_layer:
        lines.append(f"| {r['layer'].removeprefix('model.')} | {r['fisher_ternary']:.3g} | "
                     f"{r['raised_to_8']:.4f} ({r['raised_to_8'] - all_ternary:+.4f}) | "
                     f"{r['alone_ternary']:.4f} ({r['alone_ternary'] - all_eight:+.4f}) |")
    (out / "precision_pareto_ptq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.skip_qat:
        return
    rows = []
    for name, flags in arms(args.budgets).items():
        run_dir = out / "runs" / "precision" / name.replace(", ", "-").replace(" ", "-")
        shutil.rmtree(run_dir, ignore_errors=True)
        res = run_distill(DistillConfig(epochs=args.epochs, baseline=False, out=str(run_dir), qat=True,
                                        param_clusters=args.clusters, **flags), Reporter(quiet=True))
        q, plan = res["quantization"], res["precision_plan"]
        mix = mix_name(plan["layer_bits"])
        rows.append({"arm": name, "flags": flags, "val_loss": q["val_loss_exported"], "val_ppl": q["val_ppl_exported"],
                     "stored_bits": q["linear_bits_per_weight"], "code_bits": plan["stored_bits"],
                     "fisher_error": plan["sensitivity"], "optimum_fisher_error": plan["optimum_sensitivity"],
                     "mix": mix, "plan": plan})
        print(f"{name}: val loss {q['val_loss_exported']:.4f}, {q['linear_bits_per_weight']:.3f} bits/weight ({mix})",
              file=sys.stderr)
    (out / "precision_pareto.json").write_text(json.dumps(rows, indent=2))
    lines = ["| arm | widths | bits/weight (codes + scales) | Fisher-weighted error | val loss | val ppl |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['mix']} | {r['stored_bits']:.3f} | {r['fisher_error']:.3g} | "
                     f"{r['val_loss']:.4f} | {r['val_ppl']:.2f} |")
    (out / "precision_pareto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
