"""Measured compression and quantization error of an exported student (no claimed numbers).

* Compression: bytes on disk, FP32 safetensors (the latent student) vs the packed file, for the
  quantized linear layers alone (from the files' headers) and for the whole files.
* Bits per weight actually stored in the quantized linears, scales included.
* Weight error: mean over quantized layers of `||W - Q(W)||_F / ||W||_F`.
* Task error: validation loss/perplexity of the exported model (loaded back from the packed file)
  vs the full-precision latent model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hybridopt.errors import UserError, first_line
from hybridopt.fileio import WRITE_ERRORS, atomic_write, json_text, write_failure
from hybridopt.data.blocks import TokenBlocks
from hybridopt.training.evaluation import evaluate_lm
from hybridopt.export.packed import PACKED_NAME, load_packed, read_packed, safetensors_tensor_bytes
from hybridopt.quant.qat import qat_layers
from hybridopt.quant.bits import bits_name
from hybridopt.quant.quantizers import relative_error

REPORT_NAME = "quant_report.json"


def quantization_report(model: torch.nn.Module, fp32_dir: Path, export_dir: Path, val: TokenBlocks | None,
                        batch_size: int, device: torch.device, mode: str) -> dict:
    """Measure the export in `export_dir` against the FP32 latent model saved in `fp32_dir`.

    Without `val`, the task-level (validation loss) fields are left out.
    """
    layers = qat_layers(model)
    fp32_bytes = safetensors_tensor_bytes(fp32_dir / "model.safetensors")
    packed_bytes = safetensors_tensor_bytes(export_dir / PACKED_NAME)
    keys = [f"{name}.weight" for name in layers]
    linear_fp32 = sum(fp32_bytes[k] for k in keys)
    linear_packed = sum(packed_bytes[f"{k}.packed"] + packed_bytes[f"{k}.scale"] for k in keys)
    n_weights = sum(m.weight.numel() for m in layers.values())
    fp32_file = (fp32_dir / "model.safetensors").stat().st_size
    packed_file = (export_dir / PACKED_NAME).stat().st_size
    errors = {name: relative_error(m.weight, m.bits, m.group_size) for name, m in layers.items()}

    bits = sorted({m.bits for m in layers.values()})
    report = {
        "mode": mode,
        "bits": bits,
        "quantized_layers": len(layers),
        "quantized_weights": n_weights,
        "linear_fp32_bytes": linear_fp32,
        "linear_packed_bytes": linear_packed,
        "linear_compression": linear_fp32 / linear_packed,
        "linear_bits_per_weight": 8 * linear_packed / n_weights,
        "file_fp32_bytes": fp32_file,
        "file_packed_bytes": packed_file,
        "file_compression": fp32_file / packed_file,
        "weight_rel_error_mean": sum(errors.values()) / len(errors),
        "weight_rel_error_per_layer": errors,
    }
    if val is not None:
        latent = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32, local_files_only=True,
                                                      trust_remote_code=False).to(device)
        fp_eval = evaluate_lm(latent, val, batch_size, device)
        q_eval = evaluate_lm(load_packed(export_dir, device), val, batch_size, device)
        report.update(val_loss_fp_latent=fp_eval["loss"], val_ppl_fp_latent=fp_eval["ppl"],
                      val_loss_exported=q_eval["loss"], val_ppl_exported=q_eval["ppl"],
                      val_loss_gap=q_eval["loss"] - fp_eval["loss"])
    return report


def save_report(report: dict, export_dir: Path, then: str = "run the command again") -> Path:
    """Write `report` to `export_dir`/quant_report.json (atomically); `then` says how to go on if it cannot be
    written (`run the command again`, `continue with --resume`).

    Raises:
        UserError: the write failed (a full disk): one sentence naming the file; the packed model stays whole.
    """
    path = export_dir / REPORT_NAME
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json_text(report)))
    except WRITE_ERRORS as e:
        raise UserError(write_failure(f"cannot write the quantization report '{path}'", path, first_line(e),
                                      f"The packed model beside it is whole; free some space and {then}", e,
                                      f"The packed model beside it is whole; fix that and {then}")) from None
    return path


def format_report(report: dict) -> str:
    """The human-readable block printed by `distill` and `inspect`."""
    bits = ", ".join(bits_name(b, long=True) for b in report["bits"])
    lines = [
        f"Quantization ({report['mode']}, {bits} weights, {report['quantized_layers']} linear layers, "
        f"{report['quantized_weights']:,} weights):",
        f"  linear layers : {report['linear_fp32_bytes']:,} B FP32 -> {report['linear_packed_bytes']:,} B packed "
        f"= {report['linear_compression']:.2f}x, {report['linear_bits_per_weight']:.3f} bits/weight (scales included)",
        f"  whole model   : {report['file_fp32_bytes']:,} B FP32 file -> {report['file_packed_bytes']:,} B packed file "
        f"= {report['file_compression']:.2f}x",
        f"  weight error  : mean ||W - Q(W)|| / ||W|| = {report['weight_rel_error_mean']:.4f}",
    ]
    if "val_loss_exported" in report:
        lines.append(f"  task error    : val loss {report['val_loss_fp_latent']:.4f} (FP latent) -> "
                     f"{report['val_loss_exported']:.4f} (exported), perplexity {report['val_ppl_fp_latent']:.2f} -> "
                     f"{report['val_ppl_exported']:.2f}")
    return "\n".join(lines)


def describe_export(path: Path) -> str:
    """Per-layer table of a packed file, from its header alone."""
    metadata, _ = read_packed(path)  # checked: every quant entry has its shape, bits and packing
    quant = json.loads(metadata["quant"])
    sizes = safetensors_tensor_bytes(path if path.is_file() else path / PACKED_NAME)
    lines = [f"{'layer':<44}{'shape':>14}{'bits':>6}{'packing':>10}{'bytes':>10}"]
    for key, info in quant.items():
        shape = "x".join(map(str, info["shape"]))
        nbytes = sizes[f"{key}.packed"] + sizes[f"{key}.scale"]
        lines.append(f"{key:<44}{shape:>14}{info['bits']:>6g}{info['packing']:>10}{nbytes:>10,}")
    return "\n".join(lines)
