"""The distill recipe's student: a fresh Llama of the asked size, or one that starts from its teacher (its weights,
all its layers or a depth-pruned subset), and what the teacher-start losses need (the layer map)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, PreTrainedTokenizerBase

from hybridopt.config import DistillConfig
from hybridopt.data.blocks import TokenBlocks
from hybridopt.errors import UserError, for_flag
from hybridopt.models.from_teacher import (check_supported, even_layers, llama_config, measured_layers,
                                          student_from_teacher)
from hybridopt.models.modeling import build_model, context_length, student_config, vocab_size
from hybridopt.quant.precision_plan import calibration_batches
from hybridopt.reporting import Reporter


@dataclass
class StudentSpec:
    """How to build the run's student (the distilled one and its no-teacher baseline start alike)."""

    config: LlamaConfig
    layer_map: list[int] | None  # the teacher layer each student layer came from (a teacher start), else None
    influence: list[float] | None = None  # each teacher layer's block influence (--layer_choice measured)

    def build(self, teacher: torch.nn.Module, seed: int, device: torch.device) -> torch.nn.Module:
        """The student's initial model on `device`: the same every call."""
        if self.layer_map is not None:
            return student_from_teacher(teacher, self.layer_map).to(device)
        return build_model(self.config, seed).to(device)


def student_spec(cfg: DistillConfig, teacher: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 train: TokenBlocks, device: torch.device, reporter: Reporter) -> StudentSpec:
    """The student the flags ask for: `--student llama` (a fresh one sharing the teacher's vocabulary) or
    `--student teacher` (with `--student_layers`, the layers `--layer_choice` picks)."""
    if cfg.student == "llama":
        ctx = context_length(teacher.config)
        return StudentSpec(student_config(teacher.config, vocab_size(teacher), cfg, tokenizer,
                                          max_positions=ctx or cfg.seq_len), None)
    with for_flag("--student teacher"):
        check_supported(teacher)
    total = teacher.config.num_hidden_layers
    keep = cfg.student_layers or total
    if keep > total:
        raise UserError(f"--student_layers {keep} exceeds the teacher's {total} layers; keep at most {total}")
    influence = None
    if keep == total:
        layers = list(range(total))
    elif cfg.layer_choice == "even":
        layers = even_layers(total, keep)
    else:
        batches = calibration_batches(len(train), cfg.batch_size, cfg.calibration_batches, cfg.seed)
        layers, influence = measured_layers(teacher, keep, [train.batch(b)[0].to(device) for b in batches])
    config = llama_config(teacher.config, len(layers))
    if keep < total:
        how = "evenly spaced" if influence is None else "highest block influence"
        reporter.line(f"Depth pruning: keeping {keep} of the teacher's {total} layers ({how}): {layers}")
    return StudentSpec(config, layers, influence)
