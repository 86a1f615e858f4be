"""The distillation divergences of `losses.divergence` and `kd_loss(divergence=...)`, against hand computations
with Python floats and by their properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridopt.data.teacher_cache import TopKTargets
from hybridopt.training.losses import (DIVERGENCES, IGNORE_INDEX, divergence, kd_loss, topk_distributions,
                                       topk_kl)

NON_FORWARD = [name for name in DIVERGENCES if name != "forward_kl"]


# --------------------------------------------------------------------------- a slow reference, in probabilities
def _kl_ref(a, b):
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)


def _mix_ref(a, b, w):
    return [w * ai + (1 - w) * bi for ai, bi in zip(a, b)]


def _ref(p, q, name, skew=0.1, beta=0.5):
    """The divergence of two probability lists, written from the formulas."""
    if name == "forward_kl":
        return _kl_ref(p, q)
    if name == "reverse_kl":
        return _kl_ref(q, p)
    if name == "skew_kl":
        return _kl_ref(p, _mix_ref(p, q, skew))
    if name == "skew_rkl":
        return _kl_ref(q, _mix_ref(q, p, skew))
    if name == "jsd":
        m = _mix_ref(p, q, beta)
        return beta * _kl_ref(p, m) + (1 - beta) * _kl_ref(q, m)
    assert name == "tv"
    return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))


def _softmax_ref(row, T):
    z = [math.exp(v / T) for v in row]
    return [v / sum(z) for v in z]


def _logs(*probs):
    return [torch.tensor(p, dtype=torch.float64).log() for p in probs]


P5 = [0.5, 0.2, 0.15, 0.1, 0.05]
Q5 = [0.1, 0.3, 0.2, 0.25, 0.15]


@pytest.mark.parametrize("name", DIVERGENCES)
def test_each_divergence_matches_the_hand_computation(name):
    log_p, log_q = _logs(P5, Q5)
    assert divergence(log_p, log_q, name).item() == pytest.approx(_ref(P5, Q5, name), rel=1e-12)
    # a batch of rows, any leading shape
    g = torch.Generator().manual_seed(0)
    log_p = F.log_softmax(torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2, -1)
    log_q = F.log_softmax(torch.randn(2, 3, 5, generator=g, dtype=torch.float64), -1)
    got = divergence(log_p, log_q, name)
    assert got.shape == (2, 3)
    for idx in [(0, 0), (0, 2), (1, 1)]:
        want = _ref(log_p[idx].exp().tolist(), log_q[idx].exp().tolist(), name)
        assert got[idx].item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_for_the_teacher_itself_and_positive_otherwise(name):
    g = torch.Generator().manual_seed(1)
    log_p = F.log_softmax(torch.randn(6, 7, generator=g) * 3, -1)
    log_q = F.log_softmax(torch.randn(6, 7, generator=g), -1)
    assert divergence(log_p, log_p.clone(), name).abs().max().item() < 1e-6
    assert (divergence(log_p, log_q, name) > 1e-4).all()


def test_reverse_divergences_swap_the_arguments():
    log_p, log_q = _logs(P5, Q5)
    assert divergence(log_p, log_q, "reverse_kl").item() == pytest.approx(
        divergence(log_q, log_p, "forward_kl").item(), rel=1e-14)
    assert divergence(log_p, log_q, "skew_rkl").item() == pytest.approx(
        divergence(log_q, log_p, "skew_kl").item(), rel=1e-14)


def test_jsd_is_symmetric_and_at_most_log_2_and_tv_at_most_1():
    g = torch.Generator().manual_seed(2)
    log_p = F.log_softmax(torch.randn(20, 6, generator=g, dtype=torch.float64) * 5, -1)
    log_q = F.log_softmax(torch.randn(20, 6, generator=g, dtype=torch.float64) * 5, -1)
    jsd = divergence(log_p, log_q, "jsd")
    assert torch.allclose(jsd, divergence(log_q, log_p, "jsd"), rtol=1e-12, atol=0)
    assert (jsd <= math.log(2)).all() and (divergence(log_p, log_q, "tv") <= 1).all()
    # the bounds are reached by disjoint supports
    disjoint_p = F.log_softmax(torch.tensor([[0.0, -1e4, -1e4]], dtype=torch.float64), -1)
    disjoint_q = F.log_softmax(torch.tensor([[-1e4, 0.0, -1e4]], dtype=torch.float64), -1)
    assert divergence(disjoint_p, disjoint_q, "jsd").item() == pytest.approx(math.log(2), rel=1e-12)
    assert divergence(disjoint_p, disjoint_q, "tv").item() == pytest.approx(1.0, rel=1e-12)


def test_skew_zero_is_the_plain_kl_and_the_skew_bounds_it():
    log_p, log_q = _logs(P5, Q5)
    forward, reverse = divergence(log_p, log_q, "forward_kl"), divergence(log_p, log_q, "reverse_kl")
    assert divergence(log_p, log_q, "skew_kl", skew=0.0).item() == pytest.approx(forward.item(), rel=1e-14)
    assert divergence(log_p, log_q, "skew_rkl", skew=0.0).item() == pytest.approx(reverse.item(), rel=1e-14)
    for skew in [0.05, 0.3, 0.7]:
        for name in ["skew_kl", "skew_rkl"]:
            got = divergence(log_p, log_q, name, skew=skew).item()
            assert got == pytest.approx(_ref(P5, Q5, name, skew=skew), rel=1e-12)
            assert got <= math.log(1 / skew)
    jsd = divergence(log_p, log_q, "jsd", beta=0.3).item()
    assert jsd == pytest.approx(_ref(P5, Q5, "jsd", beta=0.3), rel=1e-12)


def test_bad_names_and_weights_are_refused():
    log_p, log_q = _logs(P5, Q5)
    with pytest.raises(ValueError, match="forward_kl"):
        divergence(log_p, log_q, "kl")
    with pytest.raises(ValueError, match="skew"):
        divergence(log_p, log_q, "skew_kl", skew=1.5)
    with pytest.raises(ValueError, match="reverse_kl"):
        kd_loss(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), torch.randn(1, 2, 5), divergence="rkl")
    with pytest.raises(ValueError, match="reverse_kl"):  # a typo is caught even where no divergence is computed
        kd_loss(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), None, divergence="rkl")


# --------------------------------------------------------------------------- exact zeros and peaked logits
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradients_are_finite_for_peaked_logits(name, dtype):
    """Teacher probabilities that underflow to exactly 0, a student both soft and as peaked."""
    teacher = torch.tensor([[[0.0, -1e4, -1e4, -1e4, -1e4], [-1e4, -1e4, 0.0, -1e4, -1e4]]], dtype=dtype)
    assert (F.softmax(teacher, -1) == 0).any()
    labels = torch.tensor([[0, 1]])
    for student in [torch.randn(1, 2, 5, dtype=dtype), teacher.roll(1, -1), teacher.clone()]:
        student.requires_grad_(True)
        loss, parts = kd_loss(student, labels, teacher, alpha=0.0, temperature=1.0, divergence=name)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), (name, student)


@pytest.mark.parametrize("name", ["forward_kl", "skew_kl", "skew_rkl", "jsd", "tv"])
def test_teacher_log_zero_gives_finite_values_and_gradients(name):
    """`log p = -inf` (a masked token) counts 0; every divergence but the reverse KL stays finite there."""
    log_p = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=torch.float64)
    logits = torch.tensor([[1.0, 0.5, -0.2]], dtype=torch.float64, requires_grad=True)
    value = divergence(log_p, F.log_softmax(logits, -1), name)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    q = F.softmax(logits, -1).tolist()[0]
    assert value.item() == pytest.approx(_ref([1.0, 0.0, 0.0], q, name), rel=1e-12)


# --------------------------------------------------------------------------- top-k (cached) teacher targets
def _topk(teacher, k, T):
    logp = F.log_softmax(teacher / T, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return TopKTargets(ids, values)


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_topk_with_k_equal_to_the_vocabulary_is_the_dense_loss(name, weighted, tail):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 4, IGNORE_INDEX, 0], [0, 2, 3, 8], [5, 5, 6, IGNORE_INDEX]])
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64) if weighted else None
    dense, dense_parts = kd_loss(s, y, t, alpha=0.3, temperature=2.0, weights=w, divergence=name)
    sparse, sparse_parts = kd_loss(s, y, None, alpha=0.3, temperature=2.0, weights=w, teacher_topk=_topk(t, 9, 2.0),
                                   tail=tail, divergence=name)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-10)
    assert sparse_parts["kl"].item() == pytest.approx(dense_parts["kl"].item(), rel=1e-10)
    (g_dense,) = torch.autograd.grad(dense, s)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    assert torch.isfinite(g_sparse).all()
    assert torch.allclose(g_sparse, g_dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_topk_bucket_is_the_divergence_of_the_coarsened_distributions(name):
    """Hand computation: the k cached tokens plus one bucket; never above the dense divergence."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 12, generator=g, dtype=torch.float64)
    t = torch.randn(5, 12, generator=g, dtype=torch.float64) * 3
    T = 1.5
    targets = _topk(t, 4, T)
    got = divergence(*topk_distributions(s, targets, T), name)
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    for n in range(5):
        top = targets.ids[n].tolist()
        rest = [j for j in range(12) if j not in top]
        pk = [p[n, i].item() for i in top] + [sum(p[n, j].item() for j in rest)]
        qk = [q[n, i].item() for i in top] + [sum(q[n, j].item() for j in rest)]
        assert got[n].item() == pytest.approx(_ref(pk, qk, name), rel=1e-9)
    dense = divergence(p.log(), q.log(), name)
    assert (got >= -1e-12).all() and (got <= dense + 1e-12).all()  # coarsening never increases an f-divergence
    assert (got < dense - 1e-6).any()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_topk_uniform_is_the_divergence_to_the_teacher_completed_evenly(name):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 10, generator=g, dtype=torch.float64)
    t = torch.randn(4, 10, generator=g, dtype=torch.float64) * 2
    T = 2.0
    targets = _topk(t, 3, T)
    got = divergence(*topk_distributions(s, targets, T, tail="uniform"), name)
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    for n in range(4):
        top = targets.ids[n].tolist()
        completed = [(1 - sum(p[n, i].item() for i in top)) / 7] * 10
        for i in top:
            completed[i] = p[n, i].item()
        assert got[n].item() == pytest.approx(_ref(completed, q[n].tolist(), name), rel=1e-9)


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
def test_topk_distributions_agree_with_topk_kl(tail):
    """The forward KL keeps its own code path (`topk_kl`); the coarsened distributions give the same value."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(6, 11, generator=g, dtype=torch.float64)
    targets = _topk(torch.randn(6, 11, generator=g, dtype=torch.float64) * 2, 5, 1.0)
    got = divergence(*topk_distributions(s, targets, 1.0, tail), "forward_kl")
    assert torch.allclose(got, topk_kl(s, targets, 1.0, tail), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NON_FORWARD)
def test_topk_with_no_teacher_tail_stays_finite(name):
    """A teacher whose cached top-k holds all its mass (float32 rounding): the tail is floored, not log 0."""
    teacher = torch.tensor([[0.0, 1.0, -1e4, -1e4, -1e4, -1e4]] * 2)
    targets = _topk(teacher, 2, 1.0)
    assert (1 - targets.logprobs.exp().sum(-1)).abs().max() < 1e-6
    s = torch.randn(2, 6, requires_grad=True)
    for tail in ["bucket", "uniform"]:
        value = divergence(*topk_distributions(s, targets, 1.0, tail), name)
        (grad,) = torch.autograd.grad(value.sum(), s)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()


# --------------------------------------------------------------------------- kd_loss
@pytest.mark.parametrize("name", NON_FORWARD)
def test_kd_loss_matches_the_hand_computation(name):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 4, IGNORE_INDEX], [0, 2, 3]])
    alpha, T = 0.4, 2.0
    loss, parts = kd_loss(s, y, t, alpha=alpha, temperature=T, divergence=name)
    ce, div = [], []
    for s_row, t_row, label in zip(s.reshape(-1, 5).tolist(), t.reshape(-1, 5).tolist(), y.reshape(-1).tolist()):
        if label == IGNORE_INDEX:
            continue
        ce.append(-math.log(_softmax_ref(s_row, 1.0)[label]))
        div.append(_ref(_softmax_ref(t_row, T), _softmax_ref(s_row, T), name))
    ce, div = sum(ce) / len(ce), sum(div) / len(div)
    assert parts["kl"].item() == pytest.approx(div, rel=1e-10)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert loss.item() == pytest.approx(alpha * ce + (1 - alpha) * T * T * div, rel=1e-10)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_unit_weights_give_the_unweighted_loss(name):
    """The importance-weighted path with w = 1 is the unweighted token mean (same token count per sequence)."""
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, IGNORE_INDEX, 4, 0], [IGNORE_INDEX, 2, 3, 6], [5, 5, 6, IGNORE_INDEX]])
    plain, plain_parts = kd_loss(s, y, t, alpha=0.2, temperature=1.5, divergence=name)
    weighted, weighted_parts = kd_loss(s, y, t, alpha=0.2, temperature=1.5, weights=torch.ones(3, dtype=torch.float64),
                                       divergence=name)
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-12)
    assert weighted_parts["kl"].item() == pytest.approx(plain_parts["kl"].item(), rel=1e-12)
    (g_plain,) = torch.autograd.grad(plain, s)
    (g_weighted,) = torch.autograd.grad(weighted, s)
    assert torch.allclose(g_plain, g_weighted, rtol=1e-10, atol=1e-14)
    # and weights scale each sequence's token mean
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    _, parts = kd_loss(s, y, t, alpha=0.2, temperature=1.5, weights=w, divergence=name)
    per_seq = [kd_loss(s[i:i + 1], y[i:i + 1], t[i:i + 1], alpha=0.2, temperature=1.5, divergence=name)[1]["kl"]
               for i in range(3)]
    assert parts["kl"].item() == pytest.approx(sum(float(wi * d) for wi, d in zip(w, per_seq)) / 3, rel=1e-12)


def test_forward_kl_by_name_is_the_default_bit_for_bit():
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, 1] = IGNORE_INDEX
    for kwargs in [{}, {"weights": torch.tensor([0.3, 1.7])}]:
        base, base_parts = kd_loss(s, y, t, 0.5, 2.0, **kwargs)
        named, named_parts = kd_loss(s, y, t, 0.5, 2.0, **kwargs, divergence="forward_kl")
        assert torch.equal(base, named) and torch.equal(base_parts["kl"], named_parts["kl"])
