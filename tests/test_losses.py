import math

import pytest
import torch
import torch.nn.functional as F

from hybridopt.losses import IGNORE_INDEX, kd_loss


def _hand_kd(student, teacher, labels, alpha, T):
    """The KD loss written out token by token with Python floats."""
    ce_terms, kl_terms = [], []
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        if y == IGNORE_INDEX:
            continue
        log_z = math.log(sum(math.exp(v) for v in s_row))
        ce_terms.append(log_z - s_row[y])
        zs = math.log(sum(math.exp(v / T) for v in s_row))
        zt = math.log(sum(math.exp(v / T) for v in t_row))
        kl = 0.0
        for sv, tv in zip(s_row, t_row):
            log_p, log_q = tv / T - zt, sv / T - zs
            kl += math.exp(log_p) * (log_p - log_q)
        kl_terms.append(kl)
    ce = sum(ce_terms) / len(ce_terms)
    kl = sum(kl_terms) / len(kl_terms)
    return alpha * ce + (1 - alpha) * T * T * kl, ce, kl


@pytest.mark.parametrize("alpha,T", [(0.5, 2.0), (0.0, 1.0), (0.9, 4.0)])
def test_kd_loss_matches_hand_computation(alpha, T):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 4, IGNORE_INDEX], [0, 2, 3]])
    loss, parts = kd_loss(s, y, t, alpha=alpha, temperature=T)
    want, ce, kl = _hand_kd(s.reshape(-1, 5), t.reshape(-1, 5), y.reshape(-1), alpha, T)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-6)


def test_identical_logits_have_zero_kl():
    s = torch.randn(2, 4, 7)
    y = torch.randint(0, 7, (2, 4))
    loss, parts = kd_loss(s, y, s.clone(), alpha=0.3, temperature=3.0)
    assert parts["kl"].abs().item() < 1e-6
    assert loss.item() == pytest.approx(0.3 * parts["ce"].item(), rel=1e-5)


def test_alpha_one_or_no_teacher_is_cross_entropy():
    s, t = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    y = torch.randint(0, 6, (3, 4))
    ce = F.cross_entropy(s.reshape(-1, 6), y.reshape(-1))
    assert kd_loss(s, y, t, alpha=1.0)[0].item() == pytest.approx(ce.item())
    assert kd_loss(s, y, None)[0].item() == pytest.approx(ce.item())


def test_gradient_flows_to_student_only():
    s = torch.randn(2, 3, 5, requires_grad=True)
    t = torch.randn(2, 3, 5, requires_grad=True)
    y = torch.randint(0, 5, (2, 3))
    kd_loss(s, y, t.detach(), alpha=0.5, temperature=2.0)[0].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
