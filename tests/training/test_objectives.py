"""The objectives a Trainer takes, by their properties (TRL style): plain cross-entropy, distillation from a live
teacher, distillation from cached top-k targets, and which one a run's settings pick."""

import pytest
import torch
import torch.nn.functional as F

from hybridopt.data.teacher_cache import TopKTargets
from hybridopt.training.objectives import (Batch, CrossEntropy, DistillFromCache, DistillFromTeacher,
                                           objective_for)

B, T, V = 3, 5, 11


class _Logits(torch.nn.Module):
    """A stand-in teacher: returns fixed logits, as a transformers model's output."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.logits})()


class _FullCache:
    """A teacher-logit cache holding every token (k = V) of fixed teacher logits at temperature `t`."""

    def __init__(self, teacher_logits: torch.Tensor, t: float):
        self.teacher_logits, self.t = teacher_logits, t

    def targets(self, indices):
        logprobs, ids = F.log_softmax(self.teacher_logits / self.t, dim=-1).sort(dim=-1, descending=True)
        return TopKTargets(ids, logprobs)


def _batch() -> tuple[torch.Tensor, torch.Tensor, Batch]:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    return student, teacher, Batch(list(range(B)), torch.zeros(B, T, dtype=torch.long), labels)


def test_cross_entropy_is_the_token_mean_cross_entropy():
    student, _, batch = _batch()
    loss, parts = CrossEntropy()(student, batch)
    expected = F.cross_entropy(student.reshape(-1, V), batch.labels.reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert parts["kl"].item() == 0.0


def test_distilling_from_a_teacher_that_agrees_leaves_only_the_cross_entropy_term():
    student, _, batch = _batch()
    loss, parts = DistillFromTeacher(_Logits(student), alpha=0.3, temperature=2.0)(student, batch)
    assert parts["kl"].abs().item() < 1e-5
    torch.testing.assert_close(loss, 0.3 * parts["ce"], atol=1e-5, rtol=0)


def test_the_kl_term_is_scaled_by_temperature_squared():
    student, teacher, batch = _batch()
    loss, parts = DistillFromTeacher(_Logits(teacher), alpha=0.0, temperature=3.0)(student, batch)
    p = F.softmax(teacher / 3.0, dim=-1)
    kl = (p * (F.log_softmax(teacher / 3.0, dim=-1) - F.log_softmax(student / 3.0, dim=-1))).sum(-1).mean()
    torch.testing.assert_close(parts["kl"], kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, 9.0 * kl, atol=1e-4, rtol=1e-5)


def test_a_cache_of_every_token_gives_the_live_teachers_loss():
    student, teacher, batch = _batch()
    live, live_parts = DistillFromTeacher(_Logits(teacher), alpha=0.5, temperature=2.0)(student, batch)
    cached, cached_parts = DistillFromCache(_FullCache(teacher, 2.0), alpha=0.5, temperature=2.0)(student, batch)
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_parts["kl"], live_parts["kl"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("teacher, cache, alpha, expected", [
    (None, None, 0.5, CrossEntropy),
    ("t", None, 0.5, DistillFromTeacher),
    ("t", "c", 0.5, DistillFromCache),  # the cache wins: the teacher is not run every step
    (None, "c", 0.5, DistillFromCache),
    ("t", "c", 1.0, CrossEntropy),  # alpha 1 leaves no KL term: the teacher is not run at all
])
def test_a_runs_settings_pick_the_objective(teacher, cache, alpha, expected):
    assert type(objective_for(teacher, cache, alpha)) is expected
