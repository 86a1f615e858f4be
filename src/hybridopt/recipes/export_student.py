"""`hybridopt export`: pack an already-trained student, from a run folder or any HF causal-LM folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from hybridopt.config import DistillConfig, ExportConfig
from hybridopt.errors import UserError, for_flag
from hybridopt.export import PACKED_NAME, export_packed
from hybridopt.generate import load_model
from hybridopt.layout import RunLayout, occupied
from hybridopt.precision_plan import PrecisionPlan
from hybridopt.qat import QATConfig, quantize_
from hybridopt.quant_report import format_report, quantization_report, save_report
from hybridopt.bits import TERNARY
from hybridopt.reporting import Reporter


def export_student(cfg: ExportConfig, reporter: Reporter | None = None) -> Path:
    """Quantize the model in `cfg.model` as asked (or as its run was trained) and write the packed file."""
    reporter = reporter or Reporter()
    src = Path(cfg.model)
    run = RunLayout(src)
    saved = DistillConfig.from_file(run.config) if run.config.is_file() else None
    fp_dir = run.student if (run.student / "config.json").is_file() else src
    if not (fp_dir / "config.json").is_file():
        raise UserError(f"--model '{src}' holds no Hugging Face model (config.json) nor a run's student/ folder")
    # `.resolve()`: the folder's real name, also for `--model .`
    out = Path(cfg.out) if cfg.out else (run.export if saved else src.resolve().with_name(f"{src.resolve().name}-packed"))
    if occupied(out) and not (out / PACKED_NAME).is_file():
        # Only a folder this tool exported into before (it holds a packed model) may be written again.
        raise UserError(f"--out '{out}' exists and holds something other than a hybridopt export; "
                        "choose another --out (nothing in it is replaced)")
    # A run is packed as it was trained; flags given here win; a plain model is packed to ternary.
    bits = cfg.bits or (saved.weight_bits if saved else None) or TERNARY
    quant = QATConfig(bits=bits, group_size=cfg.group_size or (saved.group_size if saved else None),
                      act_bits=cfg.act_bits or (saved.act_bits if saved else None),
                      include_head=cfg.quantize_head or bool(saved and saved.quantize_head))
    plan = None
    if run.plan.is_file():  # a mixed-precision run: its layers were trained at the plan's widths
        if cfg.bits is None:
            try:
                plan = PrecisionPlan.from_json(run.plan.read_text())
            except (OSError, ValueError, TypeError) as e:
                raise UserError(f"the run's precision plan {run.plan} is unreadable ({e}); "
                                "pass --bits for one width, or train the run again") from None
            quant = replace(quant, layer_bits=plan.layer_bits)
        else:
            reporter.line(f"--bits {cfg.bits:g}: every layer at that width, not the run's precision plan ({run.plan})")
    with for_flag("--model"):
        model, tokenizer, _ = load_model(fp_dir, torch.device("cpu"))
    with for_flag("--group_size"):
        names = quantize_(model, quant)
    path = export_packed(model, out, tokenizer, getattr(torch, cfg.export_dtype), plan)
    report = quantization_report(model, fp_dir, out, None, 1, torch.device("cpu"),
                                 "QAT" if saved and saved.qat else "PTQ")
    save_report(report, out)
    reporter.line(f"Packed {len(names)} Linear modules ({quant.describe()}) into {path}")
    reporter.line(format_report(report))
    return path
