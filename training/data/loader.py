"""Deterministic, resumable distributed sampling and batch collation."""
from __future__ import annotations

import torch

from .tokenize import IGNORE


class ResumableSampler:
    """Shuffles indices per epoch with (seed, epoch); rank r takes every world-th index.

    The state is (epoch, consumed): `consumed` counts samples taken by each rank in the
    current epoch, so a resumed sampler yields exactly the next sample on every rank.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.n, self.rank, self.world, self.seed, self.shuffle = num_samples, rank, world_size, seed, shuffle
        self.per_rank = num_samples // world_size  # drop the ragged tail so ranks stay in step
        if self.per_rank == 0:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")
        self.epoch, self.consumed = 0, 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            idx = list(range(self.n))
        else:
            g = torch.Generator().manual_seed(self.seed + epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        return idx[self.rank: self.per_rank * self.world: self.world]

    def __iter__(self):
        while True:
            order = self._order(self.epoch)
            while self.consumed < self.per_rank:
                i = order[self.consumed]
                self.consumed += 1
                yield i
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sample; labels -100 and attention 0 on padding."""
    T = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n] = torch.as_tensor(s["input_ids"])
        labels[b, :n] = torch.as_tensor(s["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(dataset: list[dict], sampler: ResumableSampler, micro_batch_size: int, pad_id: int):
    """Endless micro-batches in sampler order."""
    it = iter(sampler)
    while True:
        yield collate([dataset[next(it)] for _ in range(micro_batch_size)], pad_id)


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
