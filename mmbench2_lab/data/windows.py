"""Training windows over raw partitions or shard directories, as torch Datasets.

- ``TokenizerWindows``: T consecutive frames from one shard (or PNG strip), which may cross episode
  boundaries like the reference ``ShardedFrameDataset``: {"frames": (T, 3, H, W) float [0, 1], "task_idx"}.
- ``DynamicsWindows``: episode-aligned windows like the reference ``WMDataset``: T+1 frames with the T
  actions and rewards between them.

A frames directory is either a raw partition (``<task>-<i>.png`` strips) or a shard root
(``<task>/<task>_shard*.{pt,chunks}`` + index); ``open_frames`` tells them apart. Both datasets expose
``blocks``: contiguous index ranges whose windows start in the same shard or strip, which the samplers in
``sampling.py`` draw from.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbench2_lab.data.raw import StripFrames, read_raw
from mmbench2_lab.data.shards import ShardFrames, index_path
from mmbench2_lab.tasks import ACTION_DIM, get_task


@dataclass(frozen=True)
class Block:
    """Dataset indices [first, first + count) of ``task``, whose windows start in one shard or strip."""
    task: str
    first: int
    count: int


def _check_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"partition directory {directory} does not exist. Download it (`mmbench2-lab download --partitions "
            f"{directory.name.removesuffix('-shards')} --local-dir {directory.parent}`), preprocess it, or fix the path")
    return directory


def open_frames(frames_dir: str | Path, task: str) -> StripFrames | ShardFrames:
    """A task's frames in a raw partition (PNG strips) or a shard root (``<task>/`` with an index)."""
    frames_dir = _check_dir(frames_dir)
    if (frames_dir / task).is_dir():
        return ShardFrames(frames_dir / task)
    if (frames_dir / f"{task}-0.png").exists():
        return StripFrames(frames_dir, task)
    raise FileNotFoundError(f"task {task!r} has no frames in {frames_dir}: expected {task}-0.png strips (raw) or a "
                            f"{task}/ shard directory")


def find_tasks(directory: str | Path) -> list[str]:
    """Task names stored in a raw partition (``<task>.pt``) or shard root (``<task>/`` subdirectories)."""
    directory = _check_dir(directory)
    found = {p.stem for p in directory.glob("*.pt") if not p.name.startswith(".")}
    found |= {p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return sorted(found)


def _resolve_tasks(dirs: Sequence[Path], tasks: Sequence[str] | None, has_task) -> list[str]:
    """Requested tasks (each must be a known task present in some dir) or all tasks found."""
    if tasks is None:
        tasks = sorted({t for d in dirs for t in find_tasks(d)})
        if not tasks:
            raise FileNotFoundError(f"no tasks found in {', '.join(map(str, dirs))}")
    for t in tasks:
        get_task(t)  # unknown names raise with the closest matches
        if not any(has_task(d, t) for d in dirs):
            raise FileNotFoundError(f"task {t!r} is not in {', '.join(map(str, dirs))}; download, collect or "
                                    f"preprocess it, or drop it from the task list")
    return list(tasks)


def _has_frames(d: Path, t: str) -> bool:
    return (d / t).is_dir() or (d / f"{t}-0.png").exists()


class _Windows(Dataset):
    """Shared bookkeeping: per-task start arrays, dataset-index -> (task, start), and blocks."""

    def _index(self, starts: list[np.ndarray], block_ends: list[np.ndarray]) -> None:
        """starts[i]: sorted window starts of task i; block_ends[i]: frame index where each block ends."""
        self._starts = starts
        self._cum = np.cumsum([len(s) for s in starts]).tolist()
        self.blocks: list[Block] = []
        first = 0
        for task, s, ends in zip(self.tasks, starts, block_ends):
            block_of = np.searchsorted(ends, s, side="right")
            _, counts = np.unique(block_of, return_counts=True)
            for c in counts:
                self.blocks.append(Block(task, first, int(c)))
                first += int(c)
        if not self._cum or self._cum[-1] == 0:
            raise ValueError(f"no window of {self.seq_len} frames fits in the data of {', '.join(self.tasks)}; "
                             f"use a shorter seq_len or more data")

    def __len__(self) -> int:
        return self._cum[-1]

    def locate(self, idx: int) -> tuple[str, int]:
        """Dataset index -> (task, first frame of the window within that task's frames)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} windows")
        ti = bisect.bisect_right(self._cum, idx)
        local = idx - (self._cum[ti - 1] if ti else 0)
        return self.tasks[ti], int(self._starts[ti][local])

    @property
    def starts_per_task(self) -> dict[str, int]:
        """Number of windows of each task (summed over its sources)."""
        out: dict[str, int] = {}
        for t, s in zip(self.tasks, self._starts):
            out[t] = out.get(t, 0) + len(s)
        return out


class TokenizerWindows(_Windows):
    """Random T-frame windows for the tokenizer: {"frames": (T, 3, H, W) float32 in [0, 1], "task_idx": long}.

    Windows lie within one shard or strip of one source directory and ignore episode boundaries (the
    reference does the same). ``dirs`` are raw partitions and/or shard roots; ``task_idx`` is the task's
    id in the 210-task registry.
    """

    def __init__(self, dirs: str | Path | Sequence[str | Path], seq_len: int, *, tasks: Sequence[str] | None = None):
        dirs = [_check_dir(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]
        self.seq_len = int(seq_len)
        self.tasks, self._segments = [], []  # per entry: (task, frames source)
        starts, ends = [], []
        for task in _resolve_tasks(dirs, tasks, _has_frames):
            for d in dirs:
                if not _has_frames(d, task):
                    continue
                src = open_frames(d, task)
                # A raw strip can hold frames past the committed .pt after an interrupted write.
                n = len(read_raw(d, task)) if isinstance(src, StripFrames) else len(src)
                block_ends = np.minimum(np.asarray(src.block_ends), n)
                block_starts = np.concatenate([[0], block_ends[:-1]])
                s = [np.arange(b0, b1 - self.seq_len + 1) for b0, b1 in zip(block_starts, block_ends)]
                self.tasks.append(task)
                self._segments.append(src)
                starts.append(np.concatenate(s).astype(np.int64))
                ends.append(block_ends)
        self._index(starts, ends)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        ti = bisect.bisect_right(self._cum, idx)
        task, start = self.locate(idx)
        frames = self._segments[ti].read(start, start + self.seq_len)
        return {"frames": frames.to(torch.float32) / 255.0,
                "task_idx": torch.tensor(get_task(task).index, dtype=torch.long)}


def valid_starts(episode: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Window starts i for which frames i..i+T are one episode and steps i+1..i+T have finite action and reward.

    The reference ``WMDataset`` rule: ``episode[i] == episode[i+T]`` and no NaN in action/reward rows
    i+1..i+T. episode (N,), action (N, A), reward (N,) -> (M,) int64 sorted.
    """
    n, t = int(episode.shape[0]), int(seq_len)
    if n <= t:
        return torch.zeros(0, dtype=torch.int64)
    ok = ~(torch.isnan(action).any(dim=-1) | torch.isnan(reward))
    cs = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(ok.to(torch.int64), 0)])
    i = torch.arange(n - t)
    steps_ok = (cs[i + t + 1] - cs[i + 1]) == t  # rows i+1..i+T all finite
    same_ep = episode[: n - t] == episode[t:]
    return i[steps_ok & same_ep]


def held_out_episodes(episode_ids: torch.Tensor | np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Episode ids held out for validation: a seeded choice of round(fraction * n) of the unique ids.

    At least one episode is held out when there are two or more and fraction > 0; none is held out when
    there is only one (there would be nothing left to train on).
    """
    ids = np.unique(np.asarray(episode_ids))
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    k = 0 if fraction == 0 or len(ids) < 2 else min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return np.sort(np.random.default_rng(seed).choice(ids, size=k, replace=False))


class DynamicsWindows(_Windows):
    """Episode-aligned windows for the dynamics model.

    Returns {"obs": (T+1, 3, H, W) uint8, "act": (T, 16) float32, "act_mask": (T, 16), "rew": (T,),
    "task_idx": long, "lang_emb": (lang_dim,), "has_lang": bool}. ``act[t]`` and ``rew[t]`` belong to the
    step from obs[t] to obs[t+1]; NaN becomes 0 inside the task's action dims and everything past them is 0.

    data_dirs: raw partitions holding ``<task>.pt``; frame_dirs: where the frames are (same length as
    data_dirs; default: the PNG strips in data_dirs). Sources are concatenated per task with episode ids
    offset so no window crosses from one to the next. split: "all", or "train"/"val" with
    ``held_out_episodes(val_fraction, split_seed)`` per task. task_embeddings: {task: (lang_dim,)} text
    embeddings; tasks without one get zeros and has_lang False.
    """

    def __init__(self, data_dirs: str | Path | Sequence[str | Path], seq_len: int, *,
                 frame_dirs: Sequence[str | Path] | None = None, tasks: Sequence[str] | None = None,
                 split: str = "all", val_fraction: float = 0.1, split_seed: int = 0,
                 task_embeddings: Mapping[str, torch.Tensor] | None = None, lang_dim: int = 512):
        data_dirs = [_check_dir(d) for d in ([data_dirs] if isinstance(data_dirs, (str, Path)) else data_dirs)]
        frame_dirs = data_dirs if frame_dirs is None else [_check_dir(d) for d in frame_dirs]
        if len(frame_dirs) != len(data_dirs):
            raise ValueError(f"{len(data_dirs)} data_dirs but {len(frame_dirs)} frame_dirs; pair them one to one")
        if split not in ("all", "train", "val"):
            raise ValueError(f"split must be all, train or val, got {split!r}")
        for d in data_dirs:
            if not any(d.glob("*.pt")) and any(index_path(p).exists() for p in d.iterdir() if p.is_dir()):
                raise ValueError(f"{d} is a shard directory (frames only); pass the raw partition that holds "
                                 f"<task>.pt as data_dirs and {d} as frame_dirs")
        self.seq_len, self.lang_dim = int(seq_len), int(lang_dim)
        self.tasks, self._data, self._segments, self._lang = [], [], [], []
        starts, ends = [], []
        has_pt = lambda d, t: (d / f"{t}.pt").exists()  # noqa: E731
        for task in _resolve_tasks(data_dirs, tasks, has_pt):
            parts, segs, seg_ends, offset, frame0 = [], [], [], 0, 0
            for dd, fd in zip(data_dirs, frame_dirs):
                if not has_pt(dd, task):
                    continue
                raw = read_raw(dd, task)
                src = open_frames(fd, task)
                n = len(raw)
                if len(src) < n or (isinstance(src, ShardFrames) and len(src) != n):
                    raise ValueError(f"{task}: {dd / (task + '.pt')} describes {n} frames but {fd} holds {len(src)}; "
                                     f"the frames are stale or incomplete: rerun preprocess into a fresh directory")
                raw.episode = raw.episode + offset
                offset = int(raw.episode.max()) + 1 if n else offset
                parts.append(raw)
                segs.append((frame0, n, src))
                seg_ends.extend((frame0 + np.minimum(src.block_ends, n)).tolist())
                frame0 += n
            episode = torch.cat([p.episode for p in parts])
            action = torch.cat([p.action for p in parts])
            reward = torch.cat([p.reward for p in parts])
            s = valid_starts(episode, action, reward, self.seq_len)
            if split != "all":
                held = torch.as_tensor(held_out_episodes(episode, val_fraction, seed=split_seed + get_task(task).index))
                keep = torch.isin(episode[s], held)
                s = s[keep] if split == "val" else s[~keep]
            self.tasks.append(task)
            self._data.append((episode, action, reward))
            self._segments.append(segs)
            self._lang.append(self._embedding(task, task_embeddings))
            starts.append(s.numpy())
            ends.append(np.unique(np.asarray(seg_ends, dtype=np.int64)))
        self._index(starts, ends)

    def _embedding(self, task: str, embeddings: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
        if embeddings is None or task not in embeddings:
            return None
        emb = torch.as_tensor(embeddings[task], dtype=torch.float32).reshape(-1)
        if emb.numel() != self.lang_dim:
            raise ValueError(f"task embedding of {task!r} has {emb.numel()} values, expected lang_dim={self.lang_dim}")
        return emb

    def episodes(self, task: str) -> torch.Tensor:
        """(N,) episode id of every frame of ``task`` (after the per-source offsets)."""
        return self._data[self.tasks.index(task)][0]

    def num_frames(self, task: str) -> int:
        """Frames of ``task`` across its sources."""
        return len(self.episodes(task))

    def read_frames(self, task: str, start: int, end: int) -> torch.Tensor:
        """Frames [start, end) of ``task`` (sources concatenated): (n, 3, H, W) uint8."""
        return self._frames(self.tasks.index(task), start, end)

    def _frames(self, ti: int, start: int, end: int) -> torch.Tensor:
        parts = []
        for frame0, n, src in self._segments[ti]:
            lo, hi = max(start, frame0), min(end, frame0 + n)
            if lo < hi:
                parts.append(src.read(lo - frame0, hi - frame0))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.item(idx)

    def item(self, idx: int, *, with_obs: bool = True) -> dict[str, torch.Tensor]:
        """The window ``idx``; ``with_obs=False`` skips reading frames (for callers with cached latents)."""
        ti = bisect.bisect_right(self._cum, idx)
        task, start = self.locate(idx)
        spec, t = get_task(task), self.seq_len
        _, action, reward = self._data[ti]
        act = torch.zeros(t, ACTION_DIM)
        act[:, :spec.action_dim] = torch.nan_to_num(action[start + 1:start + 1 + t, :spec.action_dim], nan=0.0)
        mask = torch.tensor(spec.action_mask).expand(t, ACTION_DIM).clone()
        lang = self._lang[ti]
        obs = {"obs": self._frames(ti, start, start + t + 1)} if with_obs else {}
        return {**obs, "act": act, "act_mask": mask,
                "rew": reward[start + 1:start + 1 + t].clone(),
                "task_idx": torch.tensor(spec.index, dtype=torch.long),
                "lang_emb": torch.zeros(self.lang_dim) if lang is None else lang,
                "has_lang": torch.tensor(lang is not None)}
