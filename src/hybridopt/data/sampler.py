"""Batch samplers: deterministic from (seed, epoch), resumable at any step, rank-agnostic."""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch.utils.data import Sampler


class _EpochBatchSampler(Sampler[list[int]]):
    """What both samplers share: `num_items // batch_size` batches per epoch (optionally capped), an
    epoch selected by `set_epoch`, and a start step to resume mid-epoch."""

    def __init__(self, num_items: int, batch_size: int, seed: int, max_batches: int | None):
        assert num_items > 0 and batch_size > 0
        self.num_items = num_items
        self.batch_size = min(batch_size, num_items)
        self.seed = seed
        self.max_batches = max_batches or None
        self.epoch = 0
        self.start_step = 0
        self.step = 0  # the next batch of the epoch: batches already handed out are behind it

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the batches of `epoch` and skip its first `start_step`."""
        self.epoch = epoch
        self.start_step = self.step = start_step

    def __len__(self) -> int:
        full = self.num_items // self.batch_size
        return min(full, self.max_batches) if self.max_batches else full

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, len(self)):
            self.step = step + 1  # counted before the yield: a state saved after this batch resumes after it
            yield self.batch_at(step)

    def batch_at(self, step: int) -> list[int]:
        raise NotImplementedError

    def _identity(self) -> dict:
        """What must match for a saved position to mean the same batches."""
        return {"seed": self.seed, "num_items": self.num_items, "batch_size": self.batch_size,
                "max_batches": self.max_batches}

    def state_dict(self) -> dict:
        """The position (epoch, next batch) and what the batches depend on."""
        return {"epoch": self.epoch, "step": self.step, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the sampler must draw the same batches as the saved one.

        Raises:
            ValueError: the saved sampler had other data, batch size, cap, mode or clusters.
        """
        self.seed = state["seed"]
        diff = [k for k, v in self._identity().items() if k in state and state[k] != v]
        if diff:
            raise ValueError(f"cannot resume this sampler from a state with different {', '.join(diff)}")
        self.set_epoch(state["epoch"], state.get("step", state.get("start_step", 0)))  # older state dicts said "start_step"


class ShuffledBatchSampler(_EpochBatchSampler):
    """A fresh permutation each epoch, cut into full batches, optionally capped.

    The order depends only on `(seed, epoch)`, so a resumed run replays it exactly;
    `start_step` skips batches already consumed in the current epoch.

    Args:
        num_items: dataset size.
        batch_size: items per batch (the last partial batch is dropped).
        seed: base seed of the permutation.
        max_batches: cap on batches per epoch; 0 or None for a full pass.
    """

    weighted = False  # every example counts once: no importance weights

    def __init__(self, num_items: int, batch_size: int, seed: int, max_batches: int | None = None):
        super().__init__(num_items, batch_size, seed, max_batches)
        self._perm_key: tuple[int, int] | None = None
        self._perm: torch.Tensor | None = None

    def batch_at(self, step: int) -> list[int]:
        """The indices of batch `step` of the current epoch."""
        return self._order()[step * self.batch_size : (step + 1) * self.batch_size].tolist()

    def _order(self) -> torch.Tensor:
        """The permutation of the current epoch, drawn once per (seed, epoch), not once per batch."""
        key = (self.seed, self.epoch)
        if self._perm_key != key:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm_key, self._perm = key, torch.randperm(self.num_items, generator=g)
        return self._perm


SAMPLING_MODES = ("proportional", "balanced", "single", "iid")


def randomized_rounding(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integers `c` with `sum(c) == round(sum(x))` and `E[c] == x`, each `c_k` in `{floor(x_k), ceil(x_k)}`.

    Systematic sampling of the fractional parts: one uniform offset `u`, and cluster `k` gets an extra
    unit for every point `u + j` that falls in its slice of the cumulative fractions.
    """
    x = x.double()
    base = x.floor()
    cum = torch.cumsum(x - base, 0)
    cum = torch.cat([cum.new_zeros(1), cum])
    u = torch.rand((), generator=generator, dtype=torch.float64)
    extra = torch.ceil(cum[1:] - u - 1e-9) - torch.ceil(cum[:-1] - u - 1e-9)
    return (base + extra.clamp(0, 1)).long()


class ClusterStratifiedBatchSampler(_EpochBatchSampler):
    """Batches drawn cluster by cluster, so every batch covers the data's clusters as asked.

    Modes (`p_k = |C_k| / N` is the size share of cluster k, `q_k` the expected share of the batch):

    * `proportional`: `q_k = p_k`; per-batch counts by randomised rounding of `B p_k`, so the batch
      loss stays an unbiased estimate of `L = sum_k p_k L_k` with unit weights.
    * `balanced`: `q_k = 1/K`; every cluster equally represented; `example_weights` returns
      `p_k / q_k` so the weighted batch mean is still unbiased for `L`.
    * `single`: the whole batch from one cluster, drawn with probability `p_k` (unbiased, unit
      weights, but higher gradient variance; kept as an ablation of the design document's rule).
    * `iid`: clusters ignored, `B` examples uniformly without replacement.

    Every mode draws each batch afresh (examples can recur across the batches of an epoch), so `iid`
    is the control for the stratified modes, not the per-epoch shuffle a run without clusters uses.

    Within a cluster, examples are drawn uniformly without replacement (with replacement only when a
    cluster is smaller than its count). Batch `step` of `epoch` depends only on `(seed, epoch, step)`:
    there is no state carried between batches, so a resumed run replays the exact same batches.
    The sampler knows nothing about ranks; sharding across processes wraps it.

    Args:
        labels: cluster id of every training example, `(N,)`, ids in `[0, K)`.
        batch_size: examples per batch.
        seed: base seed.
        mode: one of `SAMPLING_MODES`.
        max_batches: batches per epoch; 0 or None for `N // batch_size`.
    """

    def __init__(self, labels, batch_size: int, seed: int, mode: str = "proportional",
                 max_batches: int | None = None):
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(SAMPLING_MODES)}")
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        assert self.labels.dim() == 1 and len(self.labels) > 0 and int(self.labels.min()) >= 0
        super().__init__(len(self.labels), batch_size, seed, max_batches)
        self.mode = mode
        self.num_clusters = int(self.labels.max()) + 1
        self.members = [torch.nonzero(self.labels == k).flatten() for k in range(self.num_clusters)]
        self.sizes = torch.tensor([len(m) for m in self.members], dtype=torch.float64)
        self.p = self.sizes / self.num_items
        if mode == "balanced":
            nonempty = self.sizes > 0
            self.q = nonempty.double() / nonempty.sum()
        else:
            self.q = self.p.clone()
        # p_k / q_k: 1 for every mode but `balanced` (0 for empty clusters, never drawn).
        self.cluster_weights = torch.where(self.q > 0, self.p / self.q.clamp_min(1e-300), 0.0).float()

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_033 + step) % 2**63)

    def counts(self, g: torch.Generator) -> torch.Tensor:
        """Examples per cluster in one batch, `(K,)` summing to the batch size."""
        if self.mode == "single":
            k = int(torch.multinomial(self.p.float(), 1, generator=g))
            c = torch.zeros(self.num_clusters, dtype=torch.long)
            c[k] = self.batch_size
            return c
        return randomized_rounding(self.batch_size * self.q, g)

    def batch_at(self, step: int) -> list[int]:
        """The indices of batch `step` of the current epoch."""
        g = self._generator(step)
        if self.mode == "iid":
            return torch.randperm(self.num_items, generator=g)[: self.batch_size].tolist()
        out = []
        for k, c in enumerate(self.counts(g).tolist()):
            if c == 0:
                continue
            m = self.members[k]
            pick = torch.randperm(len(m), generator=g)[:c] if c <= len(m) else torch.randint(len(m), (c,), generator=g)
            out.append(m[pick])
        return torch.cat(out).tolist()

    def example_weights(self, indices: list[int]) -> torch.Tensor:
        """`p_k / q_k` of each example's cluster, `(B,)`: the weights that keep the batch mean unbiased."""
        return self.cluster_weights[self.labels[torch.as_tensor(indices)]]

    @property
    def weighted(self) -> bool:
        """Whether some example weight differs from 1 (only `balanced` over unequal clusters)."""
        return bool((self.cluster_weights[self.q > 0] != 1).any())

    def batch_cluster(self, indices: list[int]) -> int | None:
        """The cluster of a cluster-pure batch, None for a mixed one."""
        ks = self.labels[torch.as_tensor(indices)].unique()
        return int(ks[0]) if len(ks) == 1 else None

    def _identity(self) -> dict:
        digest = hashlib.sha256(self.labels.numpy().tobytes()).hexdigest()[:16]
        return {**super()._identity(), "mode": self.mode, "labels": digest}
