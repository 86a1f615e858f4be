"""Measure FP32 vs 1-bit QAT vs ternary PTQ vs ternary QAT on the embedded default.

    python benchmarks/quant_table.py [--epochs 20] [--out benchmarks/results]

Each arm is `hybridopt distill --epochs N --no-baseline` plus its quantization flags, same seed,
same teacher, same data order. Writes `quant_table.json` (everything measured) and
`quant_table.md` (the README table) under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hybridopt.config import DistillConfig
from hybridopt.recipes.distill import run_distill
from hybridopt.reporting import Reporter

from common import RESULTS_DIR  # benchmarks/common.py, beside this script

ARMS = {
    "FP32 (no quantization)": {},
    "1-bit QAT (--qat)": {"qat": True},
    "ternary PTQ (--ternary)": {"ternary": True},
    "ternary QAT (--ternary --qat)": {"ternary": True, "qat": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, flags in ARMS.items():
        run_dir = out / "runs" / name.split(" (")[0].replace(" ", "-").lower()
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        res = run_distill(DistillConfig(epochs=args.epochs, baseline=False, out=str(run_dir), **flags),
                          Reporter(quiet=True))
        wall = time.perf_counter() - start
        q = res.get("quantization")
        rows.append({"arm": name, "flags": flags, "val_loss": res["student"]["loss"], "val_ppl": res["student"]["ppl"],
                     "teacher_val_loss": res["teacher"]["loss"], "wall_seconds": wall, "quantization": q})
        print(f"{name}: val loss {res['student']['loss']:.4f} ({wall:.0f} s)", file=sys.stderr)
    (out / "quant_table.json").write_text(json.dumps(rows, indent=2))
    lines = ["| arm | val loss | val ppl | FP-latent val loss | linear bits/weight | linear compression "
             "| whole-file compression | mean rel. weight error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["quantization"]
        if q is None:
            lines.append(f"| {r['arm']} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | - | 32 | 1.00x | 1.00x | 0 |")
        else:
            lines.append(f"| {r['arm']} | {q['val_loss_exported']:.4f} | {q['val_ppl_exported']:.2f} | "
                         f"{q['val_loss_fp_latent']:.4f} | {q['linear_bits_per_weight']:.3f} | "
                         f"{q['linear_compression']:.2f}x | {q['file_compression']:.2f}x | "
                         f"{q['weight_rel_error_mean']:.4f} |")
    (out / "quant_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
