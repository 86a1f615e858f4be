"""Training objectives: what a step minimises, given the student's logits on a batch.

An objective is a callable `(logits, batch) -> (loss, parts)`, `parts` holding the detached `ce` and `kl`
terms the metrics report. Three are built in: plain next-token cross-entropy, distillation from a live teacher
run on the same batch, and distillation from the teacher-logit cache (offline). `objective_for` picks one from a
run's settings; the `Trainer` takes any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hybridopt.data.teacher_cache import TeacherCache, TopKTargets
from hybridopt.training.losses import kd_loss


@dataclass
class Batch:
    """One batch of training blocks, on the training device."""

    indices: list[int]  # the blocks' positions in the training data (the cache looks its targets up by them)
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX where there is no target
    weights: torch.Tensor | None = None  # (B,) importance weights of a cluster-balanced sampler, or None


class Objective(Protocol):
    def __call__(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class CrossEntropy:
    """Next-token cross-entropy on the labels (training without a teacher)."""

    def __call__(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return kd_loss(logits, batch.labels, weights=batch.weights)


@dataclass
class DistillFromTeacher:
    """`alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)` at temperature T, the frozen teacher run on the
    batch under `no_grad`."""

    teacher: torch.nn.Module
    alpha: float = 0.5
    temperature: float = 2.0

    def __call__(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch.input_ids).logits  # (B, T, V)
        return kd_loss(logits, batch.labels, teacher_logits, self.alpha, self.temperature, batch.weights)


@dataclass
class DistillFromCache:
    """The same loss with the KL taken against the teacher's cached top-k log-probabilities; `tail` says how the
    vocabulary outside them counts ("bucket" or "uniform", see `losses.topk_kl`)."""

    cache: TeacherCache
    alpha: float = 0.5
    temperature: float = 2.0
    tail: str = "bucket"

    def __call__(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        topk = TopKTargets(*(t.to(logits.device) for t in self.cache.targets(batch.indices)))  # (B, T, k)
        return kd_loss(logits, batch.labels, None, self.alpha, self.temperature, batch.weights, topk, self.tail)


def objective_for(teacher: torch.nn.Module | None = None, cache: TeacherCache | None = None, alpha: float = 0.5,
                  temperature: float = 2.0, tail: str = "bucket") -> Objective:
    """The objective of a run: from the cache when there is one, else from the live teacher, else (or with
    `alpha` 1, which leaves no KL term) plain cross-entropy."""
    if alpha < 1.0 and cache is not None:
        return DistillFromCache(cache, alpha, temperature, tail)
    if alpha < 1.0 and teacher is not None:
        return DistillFromTeacher(teacher, alpha, temperature)
    return CrossEntropy()
