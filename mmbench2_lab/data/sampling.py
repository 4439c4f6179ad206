"""Which windows training draws: task weighting (coverage-aware training, spec section 5) and samplers.

Weighting modes, as the reference ``task_set.compute_task_weights`` + ``WMDataset`` apply them:

- ``valid_starts`` (the base model): every window equally likely, so P(task) is proportional to its number
  of valid window starts, i.e. to its frame count (heavy-tailed: 6.5 k to 260 k frames per task).
- ``uniform`` (coverage-aware): every task gets equal mass; within a task, windows stay equally likely.
- ``targeted``: mass alpha spread evenly over the SEEN and UNSEEN tasks (the targeted-collection tasks) and
  1 - alpha evenly over the rest; alpha collapses to 0 or 1 when one side has no task loaded.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence, TypeVar

import torch
from torch.utils.data import Sampler

from mmbench2_lab.data.windows import Block
from mmbench2_lab.tasks import tasks as registry_tasks

MODES = ("valid_starts", "uniform", "targeted")
T = TypeVar("T")


def targeted_task_names() -> set[str]:
    """The 20 targeted-collection tasks: SEEN (in pretraining) and UNSEEN."""
    return {t.name for split in ("seen", "unseen") for t in registry_tasks(split=split)}


def task_weights(starts: Mapping[str, int], mode: str = "valid_starts", *, alpha: float = 0.5,
                 targeted: Sequence[str] | None = None) -> dict[str, float]:
    """Per-task sampling mass summing to 1. starts: {task: number of valid window starts}.

    Tasks with no valid start get 0 in every mode. targeted: the focused tasks for ``targeted`` mode
    (default SEEN + UNSEEN).
    """
    if mode not in MODES:
        raise ValueError(f"unknown task weighting {mode!r}; choose one of {', '.join(MODES)}")
    live = [t for t, n in starts.items() if n > 0]
    if not live:
        raise ValueError("no task has a valid window start; nothing to sample")
    if mode == "valid_starts":
        total = sum(starts[t] for t in live)
        w = {t: starts[t] / total for t in live}
    elif mode == "uniform":
        w = {t: 1.0 / len(live) for t in live}
    else:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"targeted alpha must be in [0, 1], got {alpha}")
        focus = set(targeted_task_names() if targeted is None else targeted)
        on = [t for t in live if t in focus]
        off = [t for t in live if t not in focus]
        a = 0.0 if not on else 1.0 if not off else alpha
        w = {**{t: a / len(on) for t in on}, **{t: (1.0 - a) / len(off) for t in off}}
    return {t: w.get(t, 0.0) for t in starts}


class BlockSampler(Sampler[int]):
    """Draws dataset indices: a block (shard or strip) with probability w_task * count_block / count_task,
    then ``samples_per_shard`` windows uniformly from it (I/O locality; 1 = fully i.i.d. windows).

    Each (seed, rank, epoch) gives its own reproducible stream, so DDP ranks draw different windows from
    the same distribution; call ``set_epoch`` each epoch.
    """

    def __init__(self, blocks: Sequence[Block], weights: Mapping[str, float], num_samples: int, *,
                 samples_per_shard: int = 1, seed: int = 0, rank: int = 0):
        task_total: dict[str, int] = {}
        for b in blocks:
            task_total[b.task] = task_total.get(b.task, 0) + b.count
        missing = sorted(set(task_total) - set(weights))
        if missing:
            raise ValueError(f"no weight for tasks {missing[:5]}; pass a weight (0 to exclude) for every task")
        self.blocks = [b for b in blocks if b.count > 0 and weights[b.task] > 0]
        if not self.blocks:
            raise ValueError("every block has zero weight; nothing to sample")
        self.block_weights = torch.tensor([weights[b.task] * b.count / task_total[b.task] for b in self.blocks],
                                          dtype=torch.float64)
        self.num_samples, self.samples_per_shard = int(num_samples), max(1, int(samples_per_shard))
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.epoch) % 2 ** 63)
        draws = math.ceil(self.num_samples / self.samples_per_shard)
        chosen = torch.multinomial(self.block_weights, draws, replacement=True, generator=g)
        firsts = torch.tensor([self.blocks[i].first for i in chosen.tolist()])
        counts = torch.tensor([self.blocks[i].count for i in chosen.tolist()])
        u = torch.rand(draws, self.samples_per_shard, generator=g, dtype=torch.float64)
        idx = firsts[:, None] + (u * counts[:, None]).long().clamp_max(counts[:, None] - 1)
        return iter(idx.reshape(-1)[: self.num_samples].tolist())


def make_sampler(dataset, mode: str = "valid_starts", *, num_samples: int | None = None, alpha: float = 0.5,
                 targeted: Sequence[str] | None = None, samples_per_shard: int = 1, seed: int = 0,
                 rank: int = 0) -> BlockSampler:
    """A ``BlockSampler`` over a ``TokenizerWindows`` / ``DynamicsWindows`` with the given task weighting.

    num_samples defaults to ``len(dataset)`` (one nominal epoch).
    """
    weights = task_weights(dataset.starts_per_task, mode, alpha=alpha, targeted=targeted)
    return BlockSampler(dataset.blocks, weights, len(dataset) if num_samples is None else num_samples,
                        samples_per_shard=samples_per_shard, seed=seed, rank=rank)


def rank_partition(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's strided share of ``items`` (every world_size-th from ``rank``), as the reference strides
    tasks across DDP ranks so that per-worker caches see fewer files. With fewer items than ranks every
    rank keeps all of them (again as the reference does)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    items = list(items)
    return items if len(items) < world_size else items[rank::world_size]
