import math

import pytest
import torch
import torch.nn.functional as F

from hybridopt.training.losses import IGNORE_INDEX, kd_loss


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


# --------------------------------------------------------------------------- top-k (cached) teacher targets
from hybridopt.data.teacher_cache import TopKTargets  # noqa: E402
from hybridopt.training.losses import topk_kl  # noqa: E402


def _topk(teacher, k, T):
    """Top-k ids and exact log-probabilities at temperature T, as the teacher-logit cache stores them."""
    logp = F.log_softmax(teacher / T, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return TopKTargets(ids, values)


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
@pytest.mark.parametrize("weighted", [False, True])
def test_topk_with_k_equal_to_the_vocabulary_is_the_dense_loss(weighted, tail):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 4, IGNORE_INDEX, 0], [0, 2, 3, 8], [5, 5, 6, IGNORE_INDEX]])
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64) if weighted else None
    dense, dense_parts = kd_loss(s, y, t, alpha=0.3, temperature=2.0, weights=w)
    sparse, sparse_parts = kd_loss(s, y, None, alpha=0.3, temperature=2.0, weights=w, teacher_topk=_topk(t, 9, 2.0),
                                   tail=tail)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-10)
    assert sparse_parts["kl"].item() == pytest.approx(dense_parts["kl"].item(), rel=1e-10)
    (g_dense,) = torch.autograd.grad(dense, s)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    assert torch.isfinite(g_sparse).all()  # the empty tail bucket has no NaN gradient
    assert torch.allclose(g_sparse, g_dense, rtol=1e-9, atol=1e-12)


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
    """Hand computation: K plus one bucket; between 0 and the full KL."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 12, generator=g, dtype=torch.float64)
    t = torch.randn(5, 12, generator=g, dtype=torch.float64) * 3
    T = 1.5
    targets = _topk(t, 4, T)
    got = topk_kl(s, targets, T)
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    full = (p * (p.log() - q.log())).sum(-1)
    for n in range(5):
        top = targets.ids[n].tolist()
        rest = [j for j in range(12) if j not in top]
        pk, qk = p[n, top], q[n, top]
        pt, qt = p[n, rest].sum(), q[n, rest].sum()
        want = float((pk * (pk.log() - qk.log())).sum() + pt * (pt.log() - qt.log()))
        assert got[n].item() == pytest.approx(want, rel=1e-9)
    assert (got >= -1e-12).all() and (got <= full + 1e-12).all()
    assert (got < full).any()  # coarsening loses information: strictly below for some token


def test_topk_kl_is_zero_for_the_teacher_itself():
    t = torch.randn(6, 10, dtype=torch.float64)
    assert topk_kl(t.clone(), _topk(t, 3, 2.0), 2.0).abs().max().item() < 1e-12


def test_uniform_tail_is_the_kl_to_the_teacher_completed_evenly():
    """Hand computation: the teacher's top-k exact, its remaining mass spread over the other V - k tokens."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 10, generator=g, dtype=torch.float64)
    t = torch.randn(4, 10, generator=g, dtype=torch.float64) * 2
    T = 2.0
    targets = _topk(t, 3, T)
    got = topk_kl(s, targets, T, tail="uniform")
    p, log_q = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
    for n in range(4):
        top = targets.ids[n].tolist()
        completed = torch.full((10,), float(1 - p[n, top].sum()) / 7, dtype=torch.float64)
        completed[top] = p[n, top]
        want = float((completed * (completed.log() - log_q[n])).sum())
        assert got[n].item() == pytest.approx(want, rel=1e-9)
    assert (got >= 0).all()  # a KL divergence to a proper distribution
