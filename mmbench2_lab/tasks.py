"""The 210 MMBench2 tasks: metadata, splits and what a simulator needs to run each one.

Source: ``assets/tasks.csv``, assembled from the MMBench2 release (Hansen & Wang, 2026; CC-BY-4.0 dataset,
``src/task_set.py``, ``create_task_embeddings.py`` and ``src/envs/*.py``). Indices 0-199 are the
pretraining ``TASK_SET`` order (which task ids in the released checkpoints follow); 200-209 are the
unseen tasks. Splits: ``pretrain`` (190), ``seen`` (10, also in the pretraining set; the targets of
targeted collection) and ``unseen`` (10, never trained on by the base model).
"""
from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

ACTION_DIM = 16  # every action is zero-padded to this width, with a validity mask

# Per domain: the simulator package, camera and agent-step action repeat the reference uses
# (reference spec section 8). Per-task exceptions follow in _TASK_OVERRIDES.
_DOMAIN_DEFAULTS = {
    "dmcontrol": dict(simulator="dm_control", camera="0", action_repeat=2),
    "dmcontrol-ext": dict(simulator="dm_control-custom", camera="0", action_repeat=2),
    "metaworld": dict(simulator="metaworld", camera="corner2", action_repeat=2),
    "maniskill": dict(simulator="mani_skill", camera="sensor", action_repeat=2),
    "mujoco": dict(simulator="gymnasium-mujoco", camera="default", action_repeat=2),
    "box2d": dict(simulator="box2d", camera="default", action_repeat=2),
    "robodesk": dict(simulator="robodesk", camera="desk-overhead", action_repeat=1),
    "ogbench": dict(simulator="ogbench", camera="default", action_repeat=2),
    "pygame": dict(simulator="miniarcade", camera="native", action_repeat=1),
    "atari": dict(simulator="ale", camera="native", action_repeat=1),
}
_TASK_OVERRIDES = {
    "quadruped-walk": dict(camera="2"),
    "quadruped-run": dict(camera="2"),
    "mujoco-reacher": dict(action_repeat=1),
    "mujoco-halfcheetah": dict(action_repeat=1),
    "og-ant": dict(action_repeat=1),  # OGBench's online locomotion envs: no repeat (mazes: 2 or 4)
    "og-antball": dict(action_repeat=1),
}
_OG_POINT_REPEAT = 4  # OGBench point mazes: 400 raw steps at repeat 4 = 100 agent steps

SPLITS = ("pretrain", "seen", "unseen")


@dataclass(frozen=True)
class TaskSpec:
    """One MMBench2 task."""
    name: str
    index: int  # task id: position in TASK_SET (0-199), unseen tasks 200-209
    domain: str
    split: str  # pretrain | seen | unseen
    frames: int  # frames in the official dataset
    action_dim: int  # true action dimensionality (<= 16)
    max_episode_steps: int  # agent steps per episode
    embodiment: str
    instruction: str
    simulator: str
    camera: str
    action_repeat: int

    @property
    def in_pretraining(self) -> bool:
        """True for the 200 tasks the base model was trained on (pretrain and seen splits)."""
        return self.split != "unseen"

    @property
    def action_mask(self) -> list[float]:
        """Per-dimension validity mask over the padded 16-d action."""
        return [1.0] * self.action_dim + [0.0] * (ACTION_DIM - self.action_dim)

    @property
    def prompt(self) -> str:
        """The text the release encodes with CLIP for the task embedding."""
        return f"{self.embodiment}. {self.instruction}."


def _runtime_fields(name: str, domain: str) -> dict:
    out = dict(_DOMAIN_DEFAULTS[domain])
    if domain == "ogbench" and name.startswith("og-point"):
        out["action_repeat"] = _OG_POINT_REPEAT
    out.update(_TASK_OVERRIDES.get(name, {}))
    return out


@lru_cache(maxsize=1)
def _registry() -> dict[str, TaskSpec]:
    text = resources.files("mmbench2_lab.assets").joinpath("tasks.csv").read_text()
    specs = {}
    for row in csv.DictReader(text.splitlines()):
        specs[row["task"]] = TaskSpec(
            name=row["task"], index=int(row["index"]), domain=row["domain"], split=row["split"],
            frames=int(row["frames"]), action_dim=int(row["action_dim"]),
            max_episode_steps=int(row["max_episode_steps"]), embodiment=row["embodiment"],
            instruction=row["instruction"], **_runtime_fields(row["task"], row["domain"]))
    return specs


class UnknownTaskError(KeyError):
    """A task name that is not one of the 210 MMBench2 tasks."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return self.args[0]


def get_task(name: str) -> TaskSpec:
    """Look up a task by name; unknown names raise with the closest matches."""
    reg = _registry()
    if name in reg:
        return reg[name]
    close = difflib.get_close_matches(name, reg, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else " Run `mmbench2-lab tasks` to list them."
    raise UnknownTaskError(f"unknown task {name!r}.{hint}")


def all_tasks() -> list[TaskSpec]:
    """All 210 tasks in task-id order."""
    return sorted(_registry().values(), key=lambda t: t.index)


def domains() -> list[str]:
    """The 10 domains in task-id order."""
    seen = []
    for t in all_tasks():
        if t.domain not in seen:
            seen.append(t.domain)
    return seen


def tasks(domain: str | None = None, split: str | None = None) -> list[TaskSpec]:
    """Tasks filtered by domain and/or split (pretrain, seen, unseen)."""
    if domain is not None and domain not in domains():
        close = difflib.get_close_matches(domain, domains(), n=3)
        raise ValueError(f"unknown domain {domain!r}; domains are {', '.join(domains())}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    return [t for t in all_tasks() if (domain is None or t.domain == domain)
            and (split is None or t.split == split)]
