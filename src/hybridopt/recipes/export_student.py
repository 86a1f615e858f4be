"""`hybridopt export`: pack an already-trained student, from a run folder or any HF causal-LM folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from hybridopt.config import ExportConfig
from hybridopt.errors import UserError
from hybridopt.export import export_packed
from hybridopt.generate import load_model
from hybridopt.precision_plan import PrecisionPlan
from hybridopt.qat import QATConfig
from hybridopt.recipes.pipeline import PLAN_NAME, apply_quantization
from hybridopt.recipes.quant_report import format_report, quantization_report, save_report


def export_student(cfg: ExportConfig) -> Path:
    """Quantize the model in `cfg.model` as asked (or as its run was trained) and write the packed file."""
    src = Path(cfg.model)
    run_config = src / "run_config.json"
    saved = json.loads(run_config.read_text()) if run_config.is_file() else {}
    fp_dir = src / "student" if (src / "student" / "config.json").is_file() else src
    if not (fp_dir / "config.json").is_file():
        raise UserError(f"--model '{src}' holds no Hugging Face model (config.json) nor a run's student/ folder")
    bits = cfg.bits or saved.get("bits") or (1.58 if saved.get("ternary") else 1.0 if saved.get("qat") else 1.58)
    qcfg = QATConfig(bits=bits, group_size=cfg.group_size or saved.get("group_size"),
                     act_bits=cfg.act_bits or saved.get("act_bits"),
                     include_head=cfg.quantize_head or bool(saved.get("quantize_head")))
    plan = None
    if (src / PLAN_NAME).is_file():  # a mixed-precision run: its layers were trained at the plan's widths
        if cfg.bits is None:
            try:
                plan = PrecisionPlan.from_json((src / PLAN_NAME).read_text())
            except (OSError, ValueError, TypeError) as e:
                raise UserError(f"the run's precision plan {src / PLAN_NAME} is unreadable ({e}); "
                                "pass --bits for one width, or train the run again") from None
            qcfg = replace(qcfg, layer_bits=plan.layer_bits)
        else:
            print(f"--bits {cfg.bits:g}: every layer at that width, not the run's precision plan ({src / PLAN_NAME})")
    model, tokenizer, _ = load_model(fp_dir, torch.device("cpu"))
    names = apply_quantization(model, qcfg)
    out = Path(cfg.out) if cfg.out else (src / "export" if saved else src.with_name(src.name + "-packed"))
    path = export_packed(model, out, tokenizer, getattr(torch, cfg.export_dtype), plan)
    report = quantization_report(model, fp_dir, out, None, 1, torch.device("cpu"), "QAT" if saved.get("qat") else "PTQ")
    save_report(report, out)
    print(f"Packed {len(names)} Linear modules ({qcfg.describe()}) into {path}")
    print(format_report(report))
    return path
