"""`hybridopt export`: pack an already-trained student, from a run folder or any HF causal-LM folder, into our
packed format (`export_student`) or a GGUF file for llama.cpp (`export_student_gguf`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from hybridopt.config import GGUF_BLOCKS, DistillConfig, ExportConfig
from hybridopt.errors import UserError, for_flag
from hybridopt.export.packed import PACKED_NAME, export_packed
from hybridopt.training.saved import load_model
from hybridopt.export.gguf import GGUFReport, export_gguf, packed_codes
from hybridopt.export.gguf_read import written_by_hybridopt
from hybridopt.training.layout import OutputRefused, RunLayout, check_output, claim_output, lock_run, occupied
from hybridopt.quant.precision_plan import PrecisionPlan
from hybridopt.quant.qat import QATConfig, quantize_
from hybridopt.training.quant_report import format_report, quantization_report, save_report
from hybridopt.quant.bits import TERNARY
from hybridopt.reporting import Reporter


def _student_source(cfg: ExportConfig) -> tuple[Path, RunLayout, DistillConfig | None, Path]:
    """`(src, run, saved run config or None, the folder holding the model)` for `--model`."""
    src = Path(cfg.model)
    run = RunLayout(src)
    saved = DistillConfig.from_file(run.config) if run.config.is_file() else None
    fp_dir = run.student if (run.student / "config.json").is_file() else src
    if not (fp_dir / "config.json").is_file():
        raise UserError(f"--model '{src}' holds no Hugging Face model (config.json) nor a run's student/ folder")
    return src, run, saved, fp_dir


def _quantization(cfg: ExportConfig, run: RunLayout, saved: DistillConfig | None, default_bits: float | None,
                  reporter: Reporter) -> tuple[QATConfig | None, PrecisionPlan | None]:
    """How to quantize: a run as it was trained (its precision plan too); flags given here win; a plain
    model at `default_bits` (None: left in full precision)."""
    bits = cfg.bits or (saved.weight_bits if saved else None) or default_bits
    if bits is None:
        return None, None
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
    return quant, plan


def export_student(cfg: ExportConfig, reporter: Reporter | None = None) -> Path:
    """Quantize the model in `cfg.model` as asked (or as its run was trained) and write the packed file."""
    reporter = reporter or Reporter()
    src, run, saved, fp_dir = _student_source(cfg)
    # `.resolve()`: the folder's real name, also for `--model .`
    out = Path(cfg.out) if cfg.out else (run.export if saved else src.resolve().with_name(f"{src.resolve().name}-packed"))
    if cfg.out or not saved:  # a run's own export/ is the run's (older ones may hold only a .gguf, no marker)
        with for_flag("--out", OutputRefused):  # only a folder this tool exported into may be written again
            check_output(out, "export", legacy=(PACKED_NAME,))
    # A run is packed as it was trained; flags given here win; a plain model is packed to ternary.
    quant, plan = _quantization(cfg, run, saved, TERNARY, reporter)
    with for_flag("--model"):
        model, tokenizer, _ = load_model(fp_dir, torch.device("cpu"))
    with for_flag("--group_size"):
        names = quantize_(model, quant)
    # One export writes a folder at a time; a run's own export/ is written by its run, which holds the run's lock.
    with for_flag("--out", OutputRefused):
        lock = lock_run(run.root if saved and out.resolve() == run.export.resolve() else out)
    try:
        path = export_packed(model, claim_output(out, "export"), tokenizer, getattr(torch, cfg.export_dtype), plan)
        report = quantization_report(model, fp_dir, out, None, 1, torch.device("cpu"),
                                     "QAT" if saved and saved.qat else "PTQ")
        save_report(report, out)
    finally:
        lock.close()
    reporter.line(f"Packed {len(names)} Linear modules ({quant.describe()}) into {path}")
    reporter.line(format_report(report))
    return path


def export_student_gguf(cfg: ExportConfig, gguf_type: str, embed_type: str | None = None,
                        reporter: Reporter | None = None) -> GGUFReport:
    """Write the model in `cfg.model` as a GGUF file for llama.cpp (`hybridopt export --format gguf`).

    A run is written as it was trained (its precision plan too), a packed export as it was packed, a plain
    model ternarized for tq1_0/tq2_0 (or at `--bits`) and otherwise left in full precision. `cfg.out` names
    the `.gguf` file (default: `<run>/export/model-<type>.gguf`, or `<model>-<type>.gguf` beside a folder).
    """
    reporter = reporter or Reporter()
    src, run, saved, fp_dir = _student_source(cfg)
    default = src.resolve().with_name(f"{src.resolve().name}-{gguf_type}.gguf")
    out = Path(cfg.out) if cfg.out else (run.export / f"model-{gguf_type}.gguf" if saved else default)
    if out.suffix != ".gguf":
        raise UserError(f"--out '{out}' must name a .gguf file")
    if occupied(out) and not written_by_hybridopt(out):
        raise UserError(f"--out '{out}' exists and is not a GGUF file hybridopt wrote; choose another --out "
                        "(nothing is replaced)")
    packed = (fp_dir / PACKED_NAME).is_file()
    if packed and (cfg.bits or cfg.group_size or cfg.quantize_head):
        raise UserError(f"--model '{src}' is a packed export, whose widths are fixed; pass its run or the "
                        "full-precision student to change --bits, --group_size or --quantize_head")
    with for_flag("--model"):
        model, tokenizer, _ = load_model(fp_dir, torch.device("cpu"))
    codes, quant = None, None
    if packed:
        with for_flag("--model"):
            codes = packed_codes(fp_dir)
    else:
        quant, _ = _quantization(cfg, run, saved, TERNARY if gguf_type.startswith("tq") else None, reporter)
        if quant is not None:
            with for_flag("--group_size"):
                quantize_(model, quant)
    if saved and not cfg.out:
        claim_output(run.export, "export")
    out.parent.mkdir(parents=True, exist_ok=True)  # a new file in a folder of yours replaces nothing
    with for_flag("--type"):
        # widths the ternary and 1-bit blocks do not divide (a pretrained model's, 576) are padded exactly
        report = export_gguf(model, out, tokenizer, gguf_type, embed_type, codes=codes, name=src.resolve().name,
                             pad=gguf_type in GGUF_BLOCKS or gguf_type == "auto")
    if quant is not None and quant.act_bits:
        report.notes.append("the run quantized activations per token (--act_bits 8); llama.cpp quantizes them "
                            "per block of 32 or 256 itself, so its outputs differ slightly")
    reporter.line(report.format())
    return report
