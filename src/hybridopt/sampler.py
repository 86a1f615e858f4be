"""Batch samplers: deterministic from (seed, epoch), resumable at any step, rank-agnostic."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShuffledBatchSampler(Sampler[list[int]]):
    """A fresh permutation each epoch, cut into full batches, optionally capped.

    The order depends only on `(seed, epoch)`, so a resumed run replays it exactly;
    `start_step` skips batches already consumed in the current epoch.

    Args:
        num_items: dataset size.
        batch_size: items per batch (the last partial batch is dropped).
        seed: base seed of the permutation.
        max_batches: cap on batches per epoch; 0 or None for a full pass.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, max_batches: int | None = None):
        assert num_items > 0 and batch_size > 0
        self.num_items = num_items
        self.batch_size = min(batch_size, num_items)
        self.seed = seed
        self.max_batches = max_batches or None
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the permutation of `epoch` and skip its first `start_step` batches."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        full = self.num_items // self.batch_size
        return min(full, self.max_batches) if self.max_batches else full

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g)
        for b in range(self.start_step, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.set_epoch(state["epoch"], state["start_step"])
