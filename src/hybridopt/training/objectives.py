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
from hybridopt.training.feature_distill import FeatureDistill
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
    """`alpha * CE + (1 - alpha) * T^2 * D(teacher, student)` at temperature T, the frozen teacher run on the
    batch under `no_grad`; `D` is forward KL unless `divergence` names another (`losses.DIVERGENCES`). With
    `features`, the weighted hidden-state and attention-relation losses of that forward pass are added."""

    teacher: torch.nn.Module
    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward_kl"
    features: FeatureDistill | None = None

    def __call__(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch.input_ids).logits  # (B, T, V)
        loss, parts = kd_loss(logits, batch.labels, teacher_logits, self.alpha, self.temperature, batch.weights,
                              divergence=self.divergence)
        if self.features is not None:
            extra, more = self.features.loss()
            loss, parts = loss + extra, {**parts, **more}
        return loss, parts


@dataclass
class DistillFromCache:
    """The same loss with the KL taken against the teacher's cached top-k log-probabilities; `tail` says how the
    vocabulary outside them counts ("bucket" or "uniform", see `losses.topk_kl`)."""

    cache: TeacherCache
    alpha: float = 0.5
    temperature: float = 2.0
    tail: str = "bucket"
    divergence: str = "forward_kl"

    def __call__(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        topk = TopKTargets(*(t.to(logits.device) for t in self.cache.targets(batch.indices)))  # (B, T, k)
        return kd_loss(logits, batch.labels, None, self.alpha, self.temperature, batch.weights, topk, self.tail,
                       divergence=self.divergence)


def objective_for(teacher: torch.nn.Module | None = None, cache: TeacherCache | None = None, alpha: float = 0.5,
                  temperature: float = 2.0, tail: str = "bucket", divergence: str = "forward_kl",
                  features: FeatureDistill | None = None) -> Objective:
    """The objective of a run: from the cache when there is one, else from the live teacher, else (or with
    `alpha` 1, which leaves no KL term) plain cross-entropy. `features` (hidden-state and attention-relation
    losses) need the live teacher."""
    if alpha < 1.0 and cache is not None:
        assert features is None, "feature distillation runs the teacher: it cannot train from the cache"
        return DistillFromCache(cache, alpha, temperature, tail, divergence)
    if teacher is not None and (alpha < 1.0 or features is not None):
        return DistillFromTeacher(teacher, alpha, temperature, divergence, features)
    return CrossEntropy()
