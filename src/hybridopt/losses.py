"""Distillation losses: pure functions of logits.

The knowledge-distillation objective (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network") mixes the hard-label cross-entropy with the KL divergence between temperature-softened
teacher and student distributions:

    L = alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

The `T^2` factor keeps the KL term's gradient scale independent of `T`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    weights: torch.Tensor | None = None,
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

    Returns:
        `(loss, parts)` where `parts` holds the detached `ce` and `kl` terms (kl is the per-token
        KL at temperature `T`, before the `T^2` factor).
    """
    if weights is not None:
        return _weighted_kd_loss(student_logits, labels, teacher_logits, alpha, temperature, weights)
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


def _weighted_kd_loss(student_logits, labels, teacher_logits, alpha, temperature, weights):
    """`kd_loss` with per-sequence weights: token-mean loss per sequence, then `mean(w_i * l_i)`."""
    B, T, V = student_logits.shape
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logits = student_logits.to(dtype)
    mask = (labels != IGNORE_INDEX).to(dtype)  # (B, T)
    tokens = mask.sum(1).clamp_min(1)  # (B,)
    w = weights.to(dtype) / B

    def reduce(per_token: torch.Tensor) -> torch.Tensor:  # (B, T) -> weighted scalar
        return ((per_token * mask).sum(1) / tokens * w).sum()

    ce_tok = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").reshape(B, T)
    ce = reduce(ce_tok)
    if teacher_logits is None or alpha == 1.0:
        return ce, {"ce": ce.detach(), "kl": ce.new_zeros(())}
    with torch.no_grad():
        log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (B, T, V)
        p_t = log_p_t.exp()
    kl_tok = (p_t * (log_p_t - F.log_softmax(logits / temperature, dim=-1))).sum(-1)  # (B, T)
    kl = reduce(kl_tok)
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
