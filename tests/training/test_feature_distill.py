"""Hidden-state and attention-relation distillation: hand computations, zero for a student equal to its teacher."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridopt.models.from_teacher import student_from_teacher
from hybridopt.training.feature_distill import FeatureDistill, hidden_cosine_loss, relation_kl


def test_hidden_cosine_loss_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (1, 2, 2)
    t = torch.tensor([[[0.0, 2.0], [3.0, 3.0]]])
    # token 1: orthogonal, 1 - 0; token 2: parallel, 1 - 1; a second layer pair equal: 0
    assert float(hidden_cosine_loss([s, s], [t, s])) == pytest.approx((1.0 + 0.0) / 2 / 2)
    assert float(hidden_cosine_loss([s], [5 * s])) == pytest.approx(0.0, abs=1e-7)  # scale-free


def test_relation_kl_by_hand():
    # one head, T = 2: token 0 attends to itself only (KL 0); token 1 to both positions
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, T=2, d=2)
    t = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])

    def relations(x):
        scores = x[0] @ x[0].T / math.sqrt(2)
        return torch.softmax(scores[1, :2], -1)  # token 1's row

    p, q = relations(t), relations(s)
    kl_token1 = float((p * (p / q).log()).sum())
    assert float(relation_kl(s, t, heads=1)) == pytest.approx(kl_token1 / 2, rel=1e-5)
    assert float(relation_kl(t, t, heads=1)) == pytest.approx(0.0, abs=1e-7)


def test_relation_kl_splits_heads():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    per_head = [relation_kl(s[..., h * 4:(h + 1) * 4], t[..., h * 4:(h + 1) * 4], 1) for h in range(2)]
    assert float(relation_kl(s, t, heads=2)) == pytest.approx(float(sum(per_head) / 2), rel=1e-5)


def _pair():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    teacher = LlamaForCausalLM(config).eval().requires_grad_(False)
    return teacher, student_from_teacher(teacher, [0, 1, 3])


def test_feature_losses_vanish_for_the_teacher_itself_and_grow_when_it_moves():
    teacher, student = _pair()
    features = FeatureDistill(student, teacher, [0, 1, 3], hidden_weight=1.0, attn_weight=1.0, attn_layer=2)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    full = student_from_teacher(teacher)  # all layers: every pair is the same computation
    same = FeatureDistill(full, teacher, [0, 1, 2, 3], hidden_weight=1.0, attn_weight=1.0)
    full(input_ids=ids), teacher(input_ids=ids)
    loss, parts = same.loss()
    assert float(parts["hidden"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["attn"]) == pytest.approx(0.0, abs=1e-6)
    same.remove()
    # the pruned student's layer 2 is teacher layer 3 fed by layer 1's output, not layer 2's: losses > 0
    student(input_ids=ids), teacher(input_ids=ids)
    loss, parts = features.loss()
    assert float(parts["hidden"]) > 1e-4 and float(parts["attn"]) > 1e-6
    assert float(loss.detach()) == pytest.approx(float(parts["hidden"] + parts["attn"]), rel=1e-6)
    loss.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad is not None  # the loss reaches the student
    assert not features.captured  # nothing kept past the step
    features.remove()
    student(input_ids=ids)
    assert not features.captured
