"""Validation of a causal LM: token-averaged cross-entropy and perplexity, overall and per data cluster."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hybridopt.data.blocks import TokenBlocks


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, data: TokenBlocks, batch_size: int, device: torch.device,
                clusters=None, num_clusters: int | None = None) -> dict:
    """Cross-entropy (nats per token) and perplexity of a causal LM over every block of `data`.

    Args:
        model: a causal LM returning `.logits`.
        data: the blocks to score (every block, in order).
        batch_size: blocks per forward pass.
        device: where the model lives.
        clusters: the data cluster of every block, or None.
        num_clusters: K, so clusters without any block still get an entry.

    Returns:
        `{"loss", "ppl", "tokens"}`, and with `clusters` also `cluster_loss`: the loss of each cluster's
        blocks (None for a cluster without blocks); their size-weighted mean equals the overall loss.
    """
    was_training = model.training
    model.eval()
    per_block = []
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        input_ids, labels = (t.to(device) for t in data.batch(idx))
        logits = model(input_ids=input_ids).logits  # (B, T, V)
        B, T, V = logits.shape
        ce = F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1), reduction="none")
        per_block.append(ce.reshape(B, T).double().sum(1).cpu())
    model.train(was_training)
    sums = torch.cat(per_block)  # (N,) summed loss of each block
    count = len(data) * data.seq_len
    loss = float(sums.sum()) / count
    ppl = math.exp(loss) if loss < 700 else float("inf")
    result = {"loss": loss, "ppl": ppl, "tokens": count}
    if clusters is not None:
        labels = torch.as_tensor(clusters, dtype=torch.long)
        k = max(int(labels.max()) + 1, num_clusters or 0)
        blocks = torch.bincount(labels, minlength=k).double()
        cluster_sum = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, sums)
        nonempty = blocks > 0
        cluster_loss = cluster_sum / (blocks.clamp_min(1) * data.seq_len)
        weighted = float((cluster_loss[nonempty] * blocks[nonempty]).sum() / blocks.sum())
        assert math.isclose(weighted, loss, rel_tol=1e-9), f"per-cluster losses do not add up: {weighted} != {loss}"
        # None (JSON null) for a cluster without validation blocks: NaN is not JSON and never equals itself.
        result["cluster_loss"] = [v if n else None for v, n in zip(cluster_loss.tolist(), nonempty.tolist())]
    return result
