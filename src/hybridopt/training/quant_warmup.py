"""Quantization warmup: a pretrained model goes from full precision to quantized over the first K steps.

Quantizing a pretrained model's weights all at once throws it far from where it was trained; the warmup of
Hugging Face's 1.58-bit fine-tuning ("Fine-tuning LLMs to 1.58bit", 2024) instead blends the latent and the
quantized weight, `W + lambda * (Q(W) - W)`, with `lambda` rising linearly from `1/K` at the first step to 1 at step
`K` and after, so the training's end (and everything evaluated or exported from it) is fully quantized.
"""

from __future__ import annotations

import torch

from hybridopt.quant.qat import set_quantization_mix
from hybridopt.training.trainer import TrainerCallback


def warmup_mix(step: int, steps: int) -> float:
    """`lambda` at step `step` (counted from 1) of a warmup over `steps` steps."""
    return min(1.0, step / steps) if steps > 0 else 1.0


class QuantWarmup(TrainerCallback):
    """Sets the blend of every QAT layer of `model` before each training step."""

    def __init__(self, model: torch.nn.Module, steps: int):
        self.model, self.steps = model, steps

    def on_step_begin(self, step: int) -> None:
        set_quantization_mix(self.model, warmup_mix(step, self.steps))
