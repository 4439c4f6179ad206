"""Synthetic episodes for the data-plane tests: known pixels, actions and rewards to compare against."""
from __future__ import annotations

import numpy as np

from mmbench2_lab.data.raw import RawWriter
from mmbench2_lab.tasks import get_task


def make_episodes(task: str, lengths, size: int = 16, seed: int = 0) -> list[dict]:
    """One dict per episode: frames (T+1, size, size, 3) uint8, actions (T, action_dim), rewards (T,)."""
    rng = np.random.default_rng(seed)
    adim = get_task(task).action_dim
    return [{"frames": rng.integers(0, 256, (t + 1, size, size, 3), dtype=np.uint8),
             "actions": rng.uniform(-1, 1, (t, adim)).astype(np.float32),
             "rewards": rng.normal(size=t).astype(np.float32)} for t in lengths]


def write_episodes(directory, task: str, episodes: list[dict], **writer_kw) -> None:
    with RawWriter(directory, task, **writer_kw) as w:
        for ep in episodes:
            w.add_episode(ep["frames"], ep["actions"], ep["rewards"])


def all_frames_chw(episodes: list[dict]) -> np.ndarray:
    """Every frame of the episodes in storage order, (N, 3, H, W)."""
    return np.concatenate([ep["frames"] for ep in episodes]).transpose(0, 3, 1, 2)
