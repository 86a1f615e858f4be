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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the cached targets' shape; losses stay pure functions of tensors
    from hybridopt.data.teacher_cache import TopKTargets

IGNORE_INDEX = -100
_MASKED_LOGIT = -1e4  # stands for "excluded" in a log-sum-exp: finite, so no NaN gradient can come from it


TAILS = ("bucket", "uniform")


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


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    weights: torch.Tensor | None = None,
    teacher_topk: TopKTargets | None = None,
    tail: str = "bucket",
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
        teacher_topk: sparse teacher targets (a teacher-logit cache) instead of `teacher_logits`; the KL
            term is then `topk_kl`.
        tail: how `topk_kl` treats the vocabulary outside the top-k: "bucket" or "uniform".

    Returns:
        `(loss, parts)` where `parts` holds the detached `ce` and `kl` terms (kl is the per-token
        KL at temperature `T`, before the `T^2` factor).
    """
    if weights is not None or teacher_topk is not None:
        return _per_token_kd_loss(student_logits, labels, teacher_logits, alpha, temperature, weights, teacher_topk,
                                  tail)
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


def _per_token_kd_loss(student_logits, labels, teacher_logits, alpha, temperature, weights, teacher_topk, tail):
    """`kd_loss` from per-token terms: token mean per sequence, then the (importance-weighted) mean over
    sequences, `mean(w_i * l_i)` (w = 1 without weights). Dense or top-k teacher targets."""
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
        kl_tok = topk_kl(logits.reshape(-1, V), targets, temperature, tail).reshape(B, T)
    else:
        with torch.no_grad():
            log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (B, T, V)
            p_t = log_p_t.exp()
        kl_tok = (p_t * (log_p_t - F.log_softmax(logits / temperature, dim=-1))).sum(-1)  # (B, T)
    kl = reduce(kl_tok)
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
