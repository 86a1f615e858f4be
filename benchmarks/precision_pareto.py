"""Validation loss against stored bits: the sensitivity plan vs uniform widths vs a random plan.

    python benchmarks/precision_pareto.py [--epochs 20] [--clusters 4] [--out benchmarks/results]

Every arm is `hybridopt distill --qat --param_clusters K --no-baseline --epochs N` on the embedded
default, so all share the schedule (one full-precision epoch, then QAT with the plan):

* uniform ternary: `--ternary --avg_bits 1.58` (the plan can only be all-ternary);
* plan at a budget B: `--ternary --avg_bits B`;
* random at B: `--ternary --avg_bits B --plan_method random` (the plan's widths shuffled among layers
  of the same shape: same bits, placement not by sensitivity);
* uniform 4-bit: `--bits 4 --avg_bits 4`.

Writes `precision_pareto.json` and `precision_pareto.md` under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

from hybridopt.config import DistillConfig
from hybridopt.recipes.pipeline import run_distill


def arms(budgets: list[float]) -> dict[str, dict]:
    out = {"uniform ternary": {"ternary": True, "avg_bits": 1.58}}
    for b in budgets:
        out[f"plan, budget {b:g}"] = {"ternary": True, "avg_bits": b}
        out[f"random, budget {b:g}"] = {"ternary": True, "avg_bits": b, "plan_method": "random"}
    out["uniform 4-bit"] = {"bits": 4.0, "avg_bits": 4.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    rows = []
    for name, flags in arms(args.budgets).items():
        run_dir = out / "runs" / "precision" / name.replace(", ", "-").replace(" ", "-")
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):
            res = run_distill(DistillConfig(epochs=args.epochs, baseline=False, out=str(run_dir), qat=True,
                                            param_clusters=args.clusters, **flags))
        q, plan = res["quantization"], res["precision_plan"]
        widths = sorted(set(plan["layer_bits"].values()))
        mix = ", ".join(f"{'ternary' if b == 1.58 else f'{b:g}-bit'} x{list(plan['layer_bits'].values()).count(b)}"
                        for b in widths)
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
