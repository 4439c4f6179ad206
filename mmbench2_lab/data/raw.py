"""The MMBench2 raw layout: one directory per partition, two kinds of file per task.

- ``<task>.pt``: a dict of per-frame arrays over all episodes, concatenated in episode order
  (``episode`` int64 (N,), ``action`` float32 (N, 16), ``reward`` float32 (N,), ``terminated`` bool (N,),
  optionally ``obs`` state vectors). Actions and rewards follow the *incoming* convention: row k holds the
  action that led to frame k and the reward received on that step, so each episode's first row is NaN.
- ``<task>-<i>.png``: horizontal strips, RGB uint8, H high and H * n wide, holding frames in order
  (n <= 4008 per strip, which keeps a 224 px strip under twice PIL's decompression-bomb limit).

This is the layout of the Hugging Face dataset ``nicklashansen/mmbench2`` and of the reference collector
(``env_wrapper.save_raw_format``), so files written here preprocess and load with the reference tools and
vice versa. Frames are square at any size (224 official, 64 for the CPU presets).
"""
from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mmbench2_lab.tasks import ACTION_DIM, get_task

FRAMES_PER_STRIP = 4008
_STRIP_NAME = re.compile(r"^(?P<task>.+)-(?P<i>\d+)\.png$")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` and move tmp onto ``path``, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass
class RawTask:
    """One task's per-frame arrays from ``<task>.pt``, normalised to the padded 16-d action width.

    episode (N,) int64, action (N, 16) float32 (incoming convention, NaN at episode starts, zero beyond the
    task's action dim when the file stored fewer columns), reward (N,) float32, terminated (N,) bool,
    obs (N, S) float32 or None.
    """
    task: str
    episode: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    obs: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.episode.shape[0])

    @property
    def num_episodes(self) -> int:
        return int(torch.unique(self.episode).numel())


def task_file(directory: str | Path, task: str) -> Path:
    return Path(directory) / f"{task}.pt"


def strip_paths(directory: str | Path, task: str) -> list[Path]:
    """The PNG strips of a task, in frame order (``-0``, ``-1``, ...; stops at the first gap)."""
    paths = []
    directory = Path(directory)
    while (p := directory / f"{task}-{len(paths)}.png").exists():
        paths.append(p)
    return paths


def list_raw_tasks(directory: str | Path) -> list[str]:
    """Task names with a ``<task>.pt`` in a raw partition directory, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"raw data directory {directory} does not exist")
    return sorted(p.stem for p in directory.glob("*.pt") if not p.name.startswith("."))


def _pad_actions(action: torch.Tensor, action_dim: int, where: str) -> torch.Tensor:
    """(N,), (N, action_dim) or (N, 16) -> (N, 16) float32; anything else is an error naming the width."""
    if action.ndim == 1:
        action = action[:, None]
    if action.ndim != 2 or action.shape[1] not in (ACTION_DIM, action_dim):
        raise ValueError(
            f"{where}: action has shape {tuple(action.shape)}; expected (N, {ACTION_DIM}) (padded) or "
            f"(N, {action_dim}) (the task's action dim). The file belongs to another task or is corrupt.")
    action = action.to(torch.float32)
    if action.shape[1] < ACTION_DIM:
        action = torch.cat([action, action.new_zeros(action.shape[0], ACTION_DIM - action.shape[1])], dim=1)
    return action


def read_raw(directory: str | Path, task: str) -> RawTask:
    """Load ``<directory>/<task>.pt`` (reference or our own) and check its arrays agree in length."""
    spec = get_task(task)
    path = task_file(directory, task)
    if not path.exists():
        raise FileNotFoundError(f"task {task!r} has no {path.name} in {directory}; list the directory to see "
                                f"which tasks it holds, or download/collect this task first")
    try:  # weights_only: a data file is never allowed to run code
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError or struct.error here
        raise ValueError(f"{path} does not load with torch.load(weights_only=True) ({type(err).__name__}: {str(err).splitlines()[0][:100]}): it is "
                         f"truncated, not a task file, or holds objects other than tensors; delete it and download "
                         f"or collect the task again") from err
    missing = [k for k in ("episode", "action", "reward") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; a raw task file holds episode, action, reward, "
                         f"terminated")
    episode = torch.as_tensor(data["episode"]).to(torch.int64).reshape(-1)
    n = int(episode.shape[0])
    reward = torch.as_tensor(data["reward"]).to(torch.float32)
    if reward.ndim == 2 and reward.shape[1] == 1:
        reward = reward[:, 0]
    action = _pad_actions(torch.as_tensor(data["action"]), spec.action_dim, str(path))
    terminated = torch.as_tensor(data.get("terminated", torch.zeros(n, dtype=torch.bool))).to(torch.bool)
    obs = data.get("obs")
    obs = None if obs is None else torch.as_tensor(obs).to(torch.float32)
    for name, arr in (("action", action), ("reward", reward), ("terminated", terminated), ("obs", obs)):
        if arr is not None and arr.shape[0] != n:
            raise ValueError(f"{path}: {name} has {arr.shape[0]} rows but episode has {n}; the file is corrupt")
    return RawTask(task, episode, action, reward.reshape(n), terminated.reshape(n), obs)


# -- frames -----------------------------------------------------------------------------------------------
def _open_png(path: Path) -> Image.Image:
    with warnings.catch_warnings():
        # A 4008-frame strip at 224 px is 201 M pixels, above PIL's 179 M warning threshold by design.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def strip_to_frames(strip: np.ndarray) -> torch.Tensor:
    """(H, n * H, 3) uint8 strip -> (n, 3, H, H) uint8 frames."""
    h, w, _ = strip.shape
    if w % h:
        raise ValueError(f"strip is {h}x{w}: its width is not a multiple of its height (square frames)")
    n = w // h
    return torch.from_numpy(np.ascontiguousarray(strip.reshape(h, n, h, 3).transpose(1, 3, 0, 2)))


def frames_to_strip(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """(n, 3, H, W) uint8 frames -> (H, n * W, 3) uint8 strip."""
    frames = torch.as_tensor(frames)
    n, c, h, w = frames.shape
    return frames.permute(2, 0, 3, 1).reshape(h, n * w, c).numpy()


class StripFrames:
    """Random access to a task's frames in its PNG strips: ``read(start, end) -> (n, 3, H, H) uint8``.

    Only PNG headers are read up front; strips are decoded on demand and the last ``cache_strips`` decoded
    strips are kept (a 4008-frame strip is 600 MB at 224 px, 49 MB at 64 px).
    """

    def __init__(self, directory: str | Path, task: str, cache_strips: int = 2):
        self.paths = strip_paths(directory, task)
        if not self.paths:
            raise FileNotFoundError(f"task {task!r} has no PNG strips ({task}-0.png, ...) in {directory}")
        lengths, self.size = [], None
        for p in self.paths:
            with _open_png(p) as im:
                w, h = im.size
            if w % h or (self.size is not None and h != self.size):
                raise ValueError(f"{p}: strip is {h}x{w}; expected height {self.size or h} and a width that is "
                                 f"a multiple of it")
            self.size = h
            lengths.append(w // h)
        self.lengths = lengths
        self._ends = np.cumsum(lengths)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cache_strips = max(1, cache_strips)

    def __len__(self) -> int:
        return int(self._ends[-1])

    @property
    def block_ends(self) -> list[int]:
        """Cumulative frame count at the end of each strip (the unit of I/O locality)."""
        return [int(e) for e in self._ends]

    def strip(self, i: int) -> torch.Tensor:
        """All frames of strip i: (n_i, 3, H, H) uint8."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        with _open_png(self.paths[i]) as im:
            frames = strip_to_frames(np.asarray(im.convert("RGB")))
        self._cache[i] = frames
        while len(self._cache) > self._cache_strips:
            self._cache.popitem(last=False)
        return frames

    def read(self, start: int, end: int) -> torch.Tensor:
        """Frames [start, end) -> (end - start, 3, H, H) uint8."""
        return read_blocks(self._ends, start, end, self.strip, lambda: self.size, self.paths[0].parent)


def read_blocks(ends: np.ndarray, start: int, end: int, block, size, where) -> torch.Tensor:
    """Frames [start, end) from consecutive blocks (PNG strips, shards) ending at the cumulative ``ends``.

    ``block(i)`` returns block i's frames (anything sliceable to (n, 3, H, W) uint8); ``size()`` gives the
    frame side for an empty result (called only then). The result never aliases a block a reader caches.
    """
    total = int(ends[-1]) if len(ends) else 0
    if not 0 <= start <= end <= total:
        raise IndexError(f"frames [{start}, {end}) out of range for {total} frames in {where}")
    parts, i = [], int(np.searchsorted(ends, start, side="right"))
    while start < end:
        first = int(ends[i - 1]) if i else 0
        take = min(end, int(ends[i])) - start
        parts.append(block(i)[start - first:start - first + take])
        start += take
        i += 1
    if not parts:
        side = size()
        return torch.empty((0, 3, side, side), dtype=torch.uint8)
    return parts[0].clone() if len(parts) == 1 else torch.cat(parts)


def write_strip(frames: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Write (n, 3, H, W) uint8 frames as one RGB PNG strip, atomically."""
    strip = frames_to_strip(frames)
    return atomic_write(path, lambda tmp: Image.fromarray(strip, "RGB").save(tmp, format="PNG"))


# -- writer -----------------------------------------------------------------------------------------------
class RawWriter:
    """Adds episodes to a task's raw files, resuming an existing directory when ``append=True``.

    Each ``flush`` rewrites the last, partly filled strip and any new strips, then ``<task>.pt``: every file
    is replaced atomically and the ``.pt`` (which says how many frames exist) goes last, so a crash at any
    point leaves the previous complete state readable and the next ``append`` continues from it.

    Usage::

        with RawWriter("data/mine", "cheetah-run", append=True) as w:
            w.add_episode(frames, actions, rewards)   # frames (T+1, H, W, 3), actions (T, A), rewards (T,)
    """

    def __init__(self, directory: str | Path, task: str, *, append: bool = False,
                 frames_per_strip: int = FRAMES_PER_STRIP):
        self.spec = get_task(task)
        self.task = task
        self.directory = Path(directory)
        self.frames_per_strip = int(frames_per_strip)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.size: int | None = None
        self._arrays = {"episode": [], "action": [], "reward": [], "terminated": [], "obs": []}
        self._n_strips = 0  # full strips already on disk that never change again
        self._tail: list[torch.Tensor] = []  # frames after the full strips, (n, 3, H, H) uint8 each
        self._dirty = False
        if task_file(self.directory, task).exists():
            if not append:
                raise ValueError(f"{task_file(self.directory, task)} exists; pass append=True (--resume) to add "
                                 f"episodes to it, or write to another directory")
            self._load_existing()

    # state ---------------------------------------------------------------------------------------------
    def _load_existing(self) -> None:
        raw = read_raw(self.directory, self.task)
        if raw.obs is not None:
            self._arrays["obs"].append(raw.obs)
        for key in ("episode", "action", "reward", "terminated"):
            self._arrays[key].append(getattr(raw, key))
        n = len(raw)
        if n == 0:
            return
        strips = StripFrames(self.directory, self.task, cache_strips=1)
        if len(strips) < n:
            raise ValueError(f"{self.directory}: {self.task}.pt describes {n} frames but the PNG strips hold "
                             f"{len(strips)}; the directory is damaged")
        self.size = strips.size
        # Keep strips wholly inside the n committed frames; re-buffer the frames of a partial last strip.
        # Anything after frame n (strips written before a crash that preceded the .pt) is discarded.
        done = 0
        for i, length in enumerate(strips.lengths):
            if done + length <= n and length == self.frames_per_strip:
                self._n_strips, done = i + 1, done + length
            else:
                break
        if done < n:
            self._tail = [strips.read(done, n)]
        starts = np.concatenate([[0], np.cumsum(strips.lengths)[:-1]])
        for p, start in zip(strips.paths, starts):
            if start >= n:  # holds only frames the .pt never committed
                p.unlink()

    @property
    def num_frames(self) -> int:
        return sum(int(e.shape[0]) for e in self._arrays["episode"])

    @property
    def num_episodes(self) -> int:
        eps = self._arrays["episode"]
        return int(torch.unique(torch.cat(eps)).numel()) if eps else 0

    @property
    def next_episode_id(self) -> int:
        eps = [e for e in self._arrays["episode"] if e.numel()]
        return int(torch.cat(eps).max()) + 1 if eps else 0

    # adding --------------------------------------------------------------------------------------------
    def add_episode(self, frames, actions, rewards, terminated=None, states=None) -> int:
        """Append one episode and return its id.

        frames: (T+1, H, H, 3) uint8 observations o_0..o_T; actions: (T, A) the actions taken at steps
        0..T-1 with A = 16 (entries past the task's action dim are stored as 0) or the task's action dim; rewards: (T,) the rewards of those steps;
        terminated: (T,) bool or None; states: (T+1, S) state vectors or None. Stored in the incoming
        convention: row k pairs o_k with a_{k-1}, r_{k-1}; row 0 gets NaN.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] != frames.shape[2] or frames.dtype != np.uint8:
            raise ValueError(f"{self.task}: frames must be (T+1, H, H, 3) uint8, got {frames.shape} {frames.dtype}")
        t = frames.shape[0] - 1
        if t < 1:
            raise ValueError(f"{self.task}: an episode needs at least 2 frames (one step), got {frames.shape[0]}")
        if self.size is not None and frames.shape[1] != self.size:
            raise ValueError(f"{self.task}: frames are {frames.shape[1]}x{frames.shape[2]} but {self.directory} "
                             f"holds {self.size}x{self.size} frames; collect at --size {self.size}")
        actions = torch.as_tensor(np.asarray(actions, dtype=np.float32))
        if actions.ndim != 2 or actions.shape[0] != t or actions.shape[1] not in (ACTION_DIM, self.spec.action_dim):
            raise ValueError(f"{self.task}: actions have shape {tuple(actions.shape)}; expected ({t}, "
                             f"{ACTION_DIM}) or ({t}, {self.spec.action_dim}) for {t + 1} frames")
        actions = _pad_actions(actions, self.spec.action_dim, self.task)
        actions[:, self.spec.action_dim:] = 0.0  # the env only ever applies the first action_dim entries
        rewards = torch.as_tensor(np.asarray(rewards, dtype=np.float32)).reshape(-1)
        if rewards.shape[0] != t:
            raise ValueError(f"{self.task}: rewards have {rewards.shape[0]} entries; expected {t} (one per action)")
        term = torch.zeros(t, dtype=torch.bool) if terminated is None else torch.as_tensor(
            np.asarray(terminated, dtype=bool)).reshape(-1)
        if term.shape[0] != t:
            raise ValueError(f"{self.task}: terminated has {term.shape[0]} entries; expected {t}")
        has_obs = bool(self._arrays["obs"])
        if self.num_frames and has_obs != (states is not None):
            raise ValueError(f"{self.task}: pass states for every episode or for none "
                             f"({'earlier episodes have them' if has_obs else 'earlier episodes have none'})")
        if states is not None:
            states = torch.as_tensor(np.asarray(states, dtype=np.float32))
            if states.shape[0] != t + 1:
                raise ValueError(f"{self.task}: states have {states.shape[0]} rows; expected {t + 1} (one per frame)")
            self._arrays["obs"].append(states.reshape(t + 1, -1))

        eid = self.next_episode_id
        nan_row = torch.full((1, ACTION_DIM), float("nan"))
        self._arrays["episode"].append(torch.full((t + 1,), eid, dtype=torch.int64))
        self._arrays["action"].append(torch.cat([nan_row, actions]))
        self._arrays["reward"].append(torch.cat([torch.tensor([float("nan")]), rewards]))
        self._arrays["terminated"].append(torch.cat([torch.zeros(1, dtype=torch.bool), term]))
        self._tail.append(torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))))
        self.size = frames.shape[1]
        self._dirty = True
        return eid

    # writing -------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write pending frames (strips first) and then ``<task>.pt``."""
        if not self._dirty:
            return
        tail = torch.cat(self._tail) if self._tail else None
        if tail is not None:
            for j, s in enumerate(range(0, tail.shape[0], self.frames_per_strip)):
                write_strip(tail[s:s + self.frames_per_strip],
                            self.directory / f"{self.task}-{self._n_strips + j}.png")
        data = {k: torch.cat(v) for k, v in self._arrays.items() if v}
        atomic_write(task_file(self.directory, self.task), lambda tmp: torch.save(data, tmp))
        if tail is not None:
            full = tail.shape[0] // self.frames_per_strip
            self._n_strips += full
            rest = tail[full * self.frames_per_strip:]
            self._tail = [rest] if rest.shape[0] else []
        self._dirty = False

    def __enter__(self) -> "RawWriter":
        return self

    def __exit__(self, *exc) -> None:
        # Episodes added before an exception are complete; keep them.
        self.flush()
