"""Collect episodes from live simulators into the MMBench2 raw layout (``data/raw.py``).

The cheap policies of the reference ``collect_data.py`` (``zero`` = no-op, ``random`` = U[-1, 1] over the
task's true action dims), a smooth random walk (``brownian``) and, for a few tasks, a hand-written
controller (``scripted``). Each episode runs from ``reset(seed=episode_seed(seed, task, e))`` until the
task's time limit (or ``max_steps``), so collection is reproducible and ``resume`` continues an interrupted
run exactly where the last flushed episode ended.

Frame k of an episode is stored with the action that led to it and the reward of that step; frame 0 gets
NaN (the dataset convention, see ``raw.RawWriter``).
"""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from typing import Sequence

import numpy as np

from mmbench2_lab.data.raw import RawWriter, atomic_write
from mmbench2_lab.tasks import ACTION_DIM, TaskSpec, get_task


# -- policies ---------------------------------------------------------------------------------------------
class Policy:
    """Maps (frame, info) to a 16-d action; entries past the task's action dim are 0."""

    def __init__(self, spec: TaskSpec, rng: np.random.Generator):
        self.spec, self.rng = spec, rng

    def reset(self) -> None:
        """Called at the start of every episode."""

    def __call__(self, frame: np.ndarray, info: dict) -> np.ndarray:
        raise NotImplementedError

    def _pad(self, a: np.ndarray) -> np.ndarray:
        out = np.zeros(ACTION_DIM, dtype=np.float32)
        out[:self.spec.action_dim] = np.clip(a, -1.0, 1.0)
        return out


class ZeroPolicy(Policy):
    """The no-op policy: all-zero actions."""

    def __call__(self, frame, info):
        return np.zeros(ACTION_DIM, dtype=np.float32)


class RandomPolicy(Policy):
    """Independent U[-1, 1] actions over the true action dims."""

    def __call__(self, frame, info):
        return self._pad(self.rng.uniform(-1.0, 1.0, self.spec.action_dim))


class BrownianPolicy(Policy):
    """A clipped Gaussian random walk, a_t = clip(a_{t-1} + sigma * eps): smooth, correlated motion that
    explores further than i.i.d. noise. Starts each episode from U[-1, 1]."""

    sigma = 0.2

    def reset(self):
        self._a = self.rng.uniform(-1.0, 1.0, self.spec.action_dim)

    def __call__(self, frame, info):
        self._a = np.clip(self._a + self.sigma * self.rng.standard_normal(self.spec.action_dim), -1.0, 1.0)
        return self._pad(self._a)


class PendulumSwingUp(Policy):
    """Energy-pumping swing-up with a PD catch at the top, for ``pendulum-swingup``, plus slight noise.

    State (dm_control): [cos, sin] of the pole angle from upright, angular velocity w. Below the top the
    torque follows sign(w) while the energy E = w^2 / 2 + g (cos - 1) is short of the upright rest value 0
    (g = 25 fitted to this simulator); within cos > 0.9 a PD law holds the pole up. Reaches and holds the
    top in most episodes (return 400-540 of 600 over 300 steps).
    """

    g, kp, kd, noise = 25.0, 6.0, 1.0, 0.05

    def __call__(self, frame, info):
        cos, sin, w = np.asarray(info["state"], dtype=np.float64)[:3]
        if cos > 0.9:
            u = -self.kp * sin - self.kd * w
        else:
            energy = 0.5 * w * w + self.g * (cos - 1.0)
            u = np.sign(w) if energy < 0 else -np.sign(w) * min(1.0, energy)
        return self._pad(np.array([u + self.noise * self.rng.standard_normal()]))


SCRIPTED = {"pendulum-swingup": PendulumSwingUp}
POLICIES = ("zero", "random", "brownian", "scripted")


def make_policy(name: str, task: str, rng: np.random.Generator) -> Policy:
    spec = get_task(task)
    if name == "scripted":
        if task not in SCRIPTED:
            raise ValueError(f"no scripted controller for {task!r}; scripted tasks: {', '.join(SCRIPTED)}. "
                             f"Use --policy random or brownian for other tasks")
        return SCRIPTED[task](spec, rng)
    classes = {"zero": ZeroPolicy, "random": RandomPolicy, "brownian": BrownianPolicy}
    if name not in classes:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return classes[name](spec, rng)


# -- episodes ---------------------------------------------------------------------------------------------
def episode_seed(seed: int, task: str, episode: int) -> int:
    """Seed of one episode's reset and policy noise: distinct per (seed, task, episode)."""
    return (int(seed) * 1_000_003 + get_task(task).index * 100_003 + int(episode)) % 2 ** 31


_ENVS: dict[tuple[str, int], object] = {}  # per process: simulators are slow to build


def run_episode(task: str, episode: int, *, policy: str = "random", size: int = 224, seed: int = 0,
                max_steps: int | None = None) -> dict:
    """One episode: {"frames": (T+1, size, size, 3) uint8, "actions": (T, 16), "rewards": (T,),
    "terminated": (T,), "score": final info["score"], "episode": episode}."""
    from mmbench2_lab.envs import make_env

    if (task, size) not in _ENVS:
        _ENVS[task, size] = make_env(task, size=size)
    env = _ENVS[task, size]
    s = episode_seed(seed, task, episode)
    pi = make_policy(policy, task, np.random.default_rng(s))
    frame, info = env.reset(seed=s)
    pi.reset()
    frames, actions, rewards, terms = [frame], [], [], []
    limit = get_task(task).max_episode_steps if max_steps is None else int(max_steps)
    for _ in range(limit):
        a = pi(frame, info)
        frame, r, terminated, truncated, info = env.step(a)
        frames.append(frame)
        actions.append(a)
        rewards.append(r)
        terms.append(terminated)
        if terminated or truncated:
            break
    return {"frames": np.stack(frames), "actions": np.stack(actions).astype(np.float32),
            "rewards": np.asarray(rewards, dtype=np.float32), "terminated": np.asarray(terms, dtype=bool),
            "score": float(info["score"]), "episode": episode}


def close_envs() -> None:
    """Close this process's cached simulators (left open, dm_control's EGL contexts fail noisily at exit)."""
    while _ENVS:
        _ENVS.popitem()[1].close()


def _job(args: tuple) -> tuple[str, dict]:
    task, episode, kwargs = args
    return task, run_episode(task, episode, **kwargs)


def _stats_path(out: Path, task: str) -> Path:
    return out / f"{task}_collect_stats.json"


def collect(tasks: str | Sequence[str], episodes: int, out: str | Path, *, policy: str = "random",
            size: int = 224, seed: int = 0, max_steps: int | None = None, workers: int = 1,
            resume: bool = False, progress: bool = True) -> dict[str, int]:
    """Collect until each task has ``episodes`` episodes in ``out`` (raw layout); returns episodes added.

    Episodes run in ``workers`` processes and are written in order by this process, flushed one by one,
    so an interrupted run keeps every finished episode and ``resume=True`` continues it. Also writes
    ``<task>_collect_stats.json`` with each episode's length, return and final score.
    """
    from tqdm.auto import tqdm

    from mmbench2_lab.envs import is_runnable, make_env

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    for t in tasks:
        if not is_runnable(t):
            make_env(t, size=size)  # raises saying what the task needs; before any file is created
        if policy == "scripted" and t not in SCRIPTED:
            make_policy(policy, t, np.random.default_rng(0))  # raises naming the scripted tasks
    out = Path(out)
    kwargs = dict(policy=policy, size=size, seed=seed, max_steps=max_steps)
    writers, jobs = {}, []
    for t in tasks:
        w = RawWriter(out, t, append=resume)
        start = w.next_episode_id
        if w.num_episodes != start:
            raise ValueError(f"{out}/{t}.pt has episode ids that are not 0..{w.num_episodes - 1}; it was not "
                             f"written by `mmbench2-lab collect`, so --resume cannot continue it")
        writers[t] = w
        jobs += [(t, e, kwargs) for e in range(start, episodes)]
    added = {t: 0 for t in tasks}
    left = {t: sum(j[0] == t for j in jobs) for t in tasks}
    bar = tqdm(total=len(jobs), desc=f"collect ({policy})", unit="episode", disable=not progress)
    pool = mp.get_context("spawn").Pool(min(workers, len(jobs))) if workers > 1 and len(jobs) > 1 else None
    try:
        for task, ep in (pool.imap(_job, jobs) if pool else map(_job, jobs)):
            w = writers[task]
            w.add_episode(ep["frames"], ep["actions"], ep["rewards"], ep["terminated"])
            w.flush()
            _append_stats(out, task, policy, size, seed, ep)
            added[task] += 1
            left[task] -= 1
            if not left[task]:
                del writers[task]  # jobs are task-major: free its buffered strip frames
            bar.update(1)
    finally:
        bar.close()
        if pool:
            pool.terminate()
        else:
            close_envs()
    return added


def _append_stats(out: Path, task: str, policy: str, size: int, seed: int, ep: dict) -> None:
    path = _stats_path(out, task)
    stats = json.loads(path.read_text()) if path.exists() else {"task": task, "episodes": []}
    stats["episodes"] = [e for e in stats["episodes"] if e["episode"] != ep["episode"]]
    stats["episodes"].append({"episode": ep["episode"], "policy": policy, "size": size, "seed": seed,
                              "steps": int(len(ep["rewards"])), "return": float(ep["rewards"].sum()),
                              "score": ep["score"]})
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(stats, indent=1)))
