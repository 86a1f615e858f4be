"""Distillation losses: pure functions of logits.

The knowledge-distillation objective (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network") mixes the hard-label cross-entropy with the KL divergence between temperature-softened
teacher and student distributions:

    L = alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

The `T^2` factor keeps the KL term's gradient scale independent of `T`.

Sparse teacher targets (a top-k teacher-logit cache, as in offline distillation): the teacher's k most
likely tokens `K` and their exact log-probabilities at temperature `T` (computed over the whole
vocabulary when the cache was built). The rest of the vocabulary is one bucket, with mass
`p_tail = 1 - sum_{i in K} p_i` for the teacher and `q_tail = sum_{j not in K} q_j` for the student:

    KL_K = sum_{i in K} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

This is the KL divergence between the two distributions coarsened to K plus one bucket, so it never
exceeds the full KL, and it equals it when k = V (the bucket is empty). It says nothing about how the
student spreads its tail mass. `tail="uniform"` instead completes the teacher with its tail mass spread
evenly, `p_j = p_tail / (V - k)` for `j` not in K, and takes the full KL to that distribution:

    KL_U = sum_{i in K} p_i (log p_i - log q_i) + p_tail log(p_tail / (V - k)) - p_tail / (V - k) sum_{j not in K} log q_j

also equal to the full KL when k = V; it is the better guess when the teacher's tail is flat (a high
temperature, a small teacher). Which one distils better is measured in docs/RESULTS.md.

Divergences other than the forward KL (`kd_loss(divergence=...)`), between the teacher `p = softmax(z_t / T)`
and the student `q = softmax(z_s / T)`, per token, averaged and multiplied by `T^2` as the KL is:

    forward_kl  KL(p || q) = sum_i p_i (log p_i - log q_i)                      mode-covering (Hinton et al. 2015)
    reverse_kl  KL(q || p) = sum_i q_i (log q_i - log p_i)                      mode-seeking (MiniLLM, Gu et al.
                                                                                2024; GKD, Agarwal et al. 2024)
    skew_kl     KL(p || a p + (1 - a) q),  a = 0.1                              (DistiLLM, Ko et al. 2024)
    skew_rkl    KL(q || a q + (1 - a) p),  a = 0.1                              (DistiLLM)
    jsd         b KL(p || m) + (1 - b) KL(q || m),  m = b p + (1 - b) q,  b = 0.5
                                                                                (generalized JSD, GKD)
    tv          (1/2) sum_i |p_i - q_i|                                         (f-DISTILL, Wen et al. 2023)

The skewed KLs are bounded by `log(1 / a)` (the mixture keeps `a` of the target's own mass), the JSD at
`b = 1/2` by `log 2`, the total variation by 1; `a = 0` gives back the plain KLs. Everything is computed from
log-probabilities: a mixture is `log m = logaddexp(log b + log p, log(1 - b) + log q)`, never the log of a sum
of probabilities, and a term `p_i log(p_i / m_i)` is `exp(log p_i) (log p_i - log m_i)`, so probabilities that
underflow to 0 contribute 0 with finite gradients (a term with `log p_i = -inf` counts as 0).

With a top-k teacher cache, the forward KL is `topk_kl` (above). The other divergences are taken between the
distributions `topk_distributions` builds from the cache: with `tail="bucket"`, the two distributions coarsened
to the k cached tokens plus one tail bucket (teacher `1 - sum_{i in K} p_i`, student `logsumexp` of its other
log-probabilities); as all of these are f-divergences, coarsening never increases them. With `tail="uniform"`,
the teacher completed with its tail mass spread evenly over the other `V - k` tokens against the full student.
Both equal the dense divergence when k = V. The teacher's tail mass is only known to the precision of the cached
log-probabilities, so it is floored at their machine epsilon: a reverse divergence to a tail of exactly 0
would be infinite.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the cached targets' shape; losses stay pure functions of tensors
    from hybridopt.data.teacher_cache import TopKTargets

IGNORE_INDEX = -100
_MASKED_LOGIT = -1e4  # stands for "excluded" in a log-sum-exp: finite, so no NaN gradient can come from it


TAILS = ("bucket", "uniform")
DIVERGENCES = ("forward_kl", "reverse_kl", "skew_kl", "skew_rkl", "jsd", "tv")
SKEW = 0.1  # DistiLLM's default skew `a`
JSD_BETA = 0.5  # GKD's `b`: the symmetric Jensen-Shannon divergence


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """`KL(a || b)` over the last dim, from log-probabilities; entries with `a_i = 0` (`-inf`) count 0."""
    diff = torch.where(torch.isneginf(log_a), 0.0, log_a - log_b)  # no 0 * inf, in the value or its gradient
    return (log_a.exp() * diff).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """`log(w a + (1 - w) b)` elementwise, in log space."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, name: str, skew: float = SKEW,
               beta: float = JSD_BETA) -> torch.Tensor:
    """A divergence between the distributions `p` (teacher) and `q` (student), over the last dim.

    Args:
        log_p: `(..., V)` teacher log-probabilities.
        log_q: `(..., V)` student log-probabilities.
        name: one of `DIVERGENCES` (formulas in the module docstring).
        skew: the skew `a` of "skew_kl" and "skew_rkl", in [0, 1].
        beta: the mixture weight `b` of "jsd", in [0, 1].

    Returns:
        `(...)` divergence values (no `T^2` factor).
    """
    if not (0.0 <= skew <= 1.0 and 0.0 <= beta <= 1.0):
        raise ValueError(f"skew ({skew}) and beta ({beta}) are mixture weights: give values in [0, 1].")
    if name == "forward_kl":
        return _kl(log_p, log_q)
    if name == "reverse_kl":
        return _kl(log_q, log_p)
    if name == "skew_kl":
        return _kl(log_p, _log_mix(log_p, log_q, skew))
    if name == "skew_rkl":
        return _kl(log_q, _log_mix(log_q, log_p, skew))
    if name == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if name == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"Unknown divergence {name!r}: choose one of {', '.join(DIVERGENCES)}.")


def topk_kl(student_logits: torch.Tensor, targets: TopKTargets, temperature: float,
            tail: str = "bucket") -> torch.Tensor:
    """Per-token KL at temperature `T` from the teacher's top-k tokens, the rest of the vocabulary as one
    bucket (`KL_K`) or as the teacher's tail mass spread evenly (`KL_U`).

    Args:
        student_logits: `(N, V)` student logits.
        targets: ids and teacher log-probabilities, each `(N, k)`.
        temperature: the KD temperature the targets were computed at.
        tail: "bucket" or "uniform".

    Returns:
        `(N,)` KL divergences (no `T^2` factor).
    """
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # (N, V)
    ids = targets.ids.long()
    log_p = targets.logprobs.to(log_q.dtype)  # (N, k)
    log_q_top = log_q.gather(-1, ids)  # (N, k)
    p = log_p.exp()
    head = (p * (log_p - log_q_top)).sum(-1)
    if ids.shape[-1] >= log_q.shape[-1]:
        return head  # k = V: no tail (and 1 - sum(p) is only rounding, which the masked log q_tail would amplify)
    p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)  # rounding can push the sum a hair above 1
    if tail == "uniform":
        n_tail = log_q.shape[-1] - ids.shape[-1]
        sum_log_q_tail = log_q.sum(-1) - log_q_top.sum(-1)
        return head + torch.xlogy(p_tail, p_tail / n_tail) - p_tail / n_tail * sum_log_q_tail
    assert tail == "bucket", tail
    log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, _MASKED_LOGIT), dim=-1)
    return head + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail


def topk_distributions(student_logits: torch.Tensor, targets: TopKTargets, temperature: float,
                       tail: str = "bucket") -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities at temperature `T` as far as a top-k cache determines them:
    coarsened to the k tokens plus one tail bucket, or the teacher completed with an even tail.

    Args:
        student_logits: `(N, V)` student logits.
        targets: ids and teacher log-probabilities, each `(N, k)`.
        temperature: the KD temperature the targets were computed at.
        tail: "bucket" or "uniform".

    Returns:
        `(log_p, log_q)`, each `(N, k + 1)` for "bucket" (the cached tokens in cache order, then the bucket),
        `(N, V)` for "uniform", `(N, k)` when k = V.
    """
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # (N, V)
    ids = targets.ids.long()
    log_p_top = targets.logprobs.to(log_q.dtype)  # (N, k)
    k, V = ids.shape[-1], log_q.shape[-1]
    if k >= V:
        return log_p_top, log_q.gather(-1, ids)
    # 1 - sum p_i without rounding p_i first; below the cache's epsilon it is rounding (or exactly 0)
    p_tail = -torch.expm1(torch.logsumexp(log_p_top, dim=-1, keepdim=True))  # (N, 1)
    log_p_tail = p_tail.clamp_min(torch.finfo(targets.logprobs.dtype).eps).log()
    if tail == "uniform":
        return (log_p_tail - math.log(V - k)).expand(-1, V).scatter(-1, ids, log_p_top), log_q
    assert tail == "bucket", tail
    log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, _MASKED_LOGIT), dim=-1, keepdim=True)  # (N, 1)
    return torch.cat([log_p_top, log_p_tail], -1), torch.cat([log_q.gather(-1, ids), log_q_tail], -1)


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    weights: torch.Tensor | None = None,
    teacher_topk: TopKTargets | None = None,
    tail: str = "bucket",
    divergence: str = "forward_kl",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Knowledge-distillation loss, averaged over tokens whose label is not `IGNORE_INDEX`.

    Args:
        student_logits: `(B, T, V)` student logits.
        labels: `(B, T)` next-token targets, `IGNORE_INDEX` where there is none.
        teacher_logits: `(B, T, V)` teacher logits, or None for plain cross-entropy.
        alpha: weight of the cross-entropy term.
        temperature: softmax temperature `T` of the KL term.
        weights: `(B,)` per-sequence importance weights (cluster-balanced sampling); the loss is then
            `sum_i w_i l_i / B` over sequences, `l_i` their token-mean losses, so that its expectation
            under the sampler is the unweighted objective.
        teacher_topk: sparse teacher targets (a teacher-logit cache) instead of `teacher_logits`; the forward
            KL is then `topk_kl`, another divergence is taken between `topk_distributions`.
        tail: how the vocabulary outside the top-k counts: "bucket" or "uniform" (see `topk_kl` and
            `topk_distributions`).
        divergence: the distillation divergence between teacher and student, one of `DIVERGENCES`
            (module docstring); "forward_kl" is the KL above.

    Returns:
        `(loss, parts)` where `parts` holds the detached `ce` and `kl` terms (kl is the distillation
        divergence, a per-token mean at temperature `T`, before the `T^2` factor).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {divergence!r}: choose one of {', '.join(DIVERGENCES)}.")
    if weights is not None or teacher_topk is not None or divergence != "forward_kl":
        return _per_token_kd_loss(student_logits, labels, teacher_logits, alpha, temperature, weights, teacher_topk,
                                  tail, divergence)
    V = student_logits.size(-1)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # half logits are upcast
    logits = student_logits.reshape(-1, V).to(dtype)  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    ce = F.cross_entropy(logits, flat_labels, ignore_index=IGNORE_INDEX)
    if teacher_logits is None or alpha == 1.0:
        return ce, {"ce": ce.detach(), "kl": ce.new_zeros(())}
    assert teacher_logits.shape == student_logits.shape, (teacher_logits.shape, student_logits.shape)
    teacher_flat = teacher_logits.reshape(-1, V).to(dtype)
    mask = flat_labels != IGNORE_INDEX
    if not bool(mask.all()):
        logits, teacher_flat = logits[mask], teacher_flat[mask]  # (M, V)
    # KL(p_t || p_s) = H(p_t, p_s) - H(p_t): the soft-target cross-entropy minus the teacher's entropy,
    # which has no gradient. About twice as fast on CPU as `F.kl_div` on two log-softmaxes.
    with torch.no_grad():
        log_p_t = F.log_softmax(teacher_flat / temperature, dim=-1)
        p_t = log_p_t.exp()
        neg_entropy = (p_t * log_p_t).sum(-1).mean()
    kl = F.cross_entropy(logits / temperature, p_t) + neg_entropy
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def _per_token_kd_loss(student_logits, labels, teacher_logits, alpha, temperature, weights, teacher_topk, tail,
                       name="forward_kl"):
    """`kd_loss` from per-token terms: token mean per sequence, then the (importance-weighted) mean over
    sequences, `mean(w_i * l_i)` (w = 1 without weights). Dense or top-k teacher targets, any divergence `name`."""
    B, T, V = student_logits.shape
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logits = student_logits.to(dtype)
    mask = (labels != IGNORE_INDEX).to(dtype)  # (B, T)
    tokens = mask.sum(1).clamp_min(1)  # (B,)
    if weights is None:
        # Without weights every token counts once: the plain token mean, as the dense loss.
        def reduce(per_token: torch.Tensor) -> torch.Tensor:
            return (per_token * mask).sum() / mask.sum().clamp_min(1)
    else:
        w = weights.to(dtype) / B

        def reduce(per_token: torch.Tensor) -> torch.Tensor:  # (B, T) -> weighted scalar
            return ((per_token * mask).sum(1) / tokens * w).sum()

    ce_tok = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").reshape(B, T)
    ce = reduce(ce_tok)
    if (teacher_logits is None and teacher_topk is None) or alpha == 1.0:
        return ce, {"ce": ce.detach(), "kl": ce.new_zeros(())}
    if teacher_topk is not None:
        k = teacher_topk.ids.shape[-1]
        targets = teacher_topk._replace(ids=teacher_topk.ids.reshape(-1, k), logprobs=teacher_topk.logprobs.reshape(-1, k))
        if name == "forward_kl":
            kl_tok = topk_kl(logits.reshape(-1, V), targets, temperature, tail).reshape(B, T)
        else:
            kl_tok = divergence(*topk_distributions(logits.reshape(-1, V), targets, temperature, tail),
                                name).reshape(B, T)
    elif name == "forward_kl":
        with torch.no_grad():
            log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (B, T, V)
            p_t = log_p_t.exp()
        kl_tok = (p_t * (log_p_t - F.log_softmax(logits / temperature, dim=-1))).sum(-1)  # (B, T)
    else:
        with torch.no_grad():
            log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (B, T, V)
        kl_tok = divergence(log_p_t, F.log_softmax(logits / temperature, dim=-1), name)  # (B, T)
    kl = reduce(kl_tok)
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
