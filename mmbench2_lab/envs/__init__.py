"""Live simulators for the MMBench2 tasks behind one ``make_env`` (gymnasium 1.x).

    env = make_env("walker-walk", size=64, seed=0)
    frame, info = env.reset()                      # frame (64, 64, 3) uint8; info["state"], ["score"], ...
    frame, reward, terminated, truncated, info = env.step(env.action_space.sample())  # 16-d action

Each domain lives in its own module (``dmcontrol``, ``gym_mujoco``, ``box2d``, ``metaworld``, ``ogbench``,
``atari``, ``robodesk``) exposing ``TASKS`` (task name -> simulator id), ``NOT_YET`` (tasks of the domain
we do not run yet -> what they need), ``return_range(name)`` and ``make(spec) -> gymnasium.Env``: the
simulator at agent-step granularity (``ActionRepeat`` applied) whose observation is the state vector,
whose ``render()`` is the reference 224x224 frame, and whose info may carry ``success``.
Simulators are imported on first ``make`` only, so listing tasks stays instant. A later domain slots in
as one more entry of ``_DOMAINS``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache

import gymnasium
import numpy as np

from mmbench2_lab.envs.wrappers import MMBench2Env, PadAction
from mmbench2_lab.tasks import TaskSpec, get_task

__all__ = ["make_env", "is_runnable", "runnable_domains", "UnsupportedTaskError"]


class UnsupportedTaskError(NotImplementedError):
    """A real MMBench2 task whose simulator mmbench2-lab does not run yet."""


@dataclass(frozen=True)
class _Domain:
    module: str  # mmbench2_lab.envs.<module>
    simulator: str  # in words, for messages
    extra: str  # the pyproject extra that installs it
    requires: tuple[str, ...]  # importable modules the simulator needs
    mujoco: bool  # renders through MuJoCo's OpenGL (needs MUJOCO_GL headless)


_DOMAINS = {
    "dmcontrol": _Domain("dmcontrol", "dm_control", "dmc", ("dm_control", "mujoco"), True),
    "mujoco": _Domain("gym_mujoco", "gymnasium's MuJoCo environments", "mujoco", ("mujoco", "imageio"), True),
    "box2d": _Domain("box2d", "gymnasium's Box2D environments", "box2d", ("Box2D", "pygame"), False),
    "metaworld": _Domain("metaworld", "Meta-World", "metaworld", ("metaworld", "mujoco"), True),
    "ogbench": _Domain("ogbench", "OGBench", "ogbench", ("ogbench", "mujoco", "imageio"), True),
    "atari": _Domain("atari", "the Arcade Learning Environment (ale-py)", "atari", ("ale_py",), False),
    "robodesk": _Domain("robodesk", "RoboDesk", "robodesk", ("robodesk", "dm_control", "mujoco"), True),
}
# Domains of the 210 tasks that no factory covers yet: what they need.
_NOT_YET = {
    "dmcontrol-ext": "dm_control with MMBench2's custom task XMLs",
    "maniskill": "ManiSkill (mani_skill)",
    "pygame": "MMBench2's MiniArcade pygame games",
}


def make_env(task: str, *, size: int = 224, seed: int | None = None, render: bool = True) -> gymnasium.Env:
    """Build a live MMBench2 task: RGB frames in, 16-d padded actions out, fixed-length episodes.

    Args:
        task: an MMBench2 task name (``mmbench2-lab tasks`` lists them).
        size: frame side; the reference frame is 224x224, bilinearly resized when ``size`` differs.
        seed: seeds the first ``reset()`` (and ``action_space.sample``); later resets continue the stream.
        render: False skips rendering; the observation is then the float32 state vector.
    Returns:
        a ``gymnasium.Env`` with observation (size, size, 3) uint8, action space Box(-1, 1, (16,)),
        episodes truncated at ``task_spec.max_episode_steps`` agent steps, and info keys ``score``,
        ``success``, ``action_mask``, ``state`` and ``task``. ``env.task_spec`` is the TaskSpec;
        ``env.unwrapped`` is the simulator.
    """
    spec = get_task(task)
    module = _factory(spec)
    env = module.make(spec)
    env = gymnasium.wrappers.RescaleAction(env, np.float32(-1.0), np.float32(1.0))
    env = PadAction(env, spec.action_dim)
    env = gymnasium.wrappers.TimeLimit(env, spec.max_episode_steps)
    return MMBench2Env(env, spec, size=size, render=render, return_range=module.return_range(spec.name),
                       seed=seed)


def is_runnable(task: str) -> bool:
    """True iff a factory covers ``task`` and its simulator's packages are installed here.

    Quick (no simulator import): packages are looked up with ``importlib.util.find_spec``, once per domain.
    """
    spec = get_task(task)
    domain = _DOMAINS.get(spec.domain)
    if domain is None or not _installed(spec.domain):
        return False
    return spec.name in _domain_module(domain.module).TASKS


def runnable_domains() -> list[str]:
    """The domains whose simulator is installed here (each runs some or all of its tasks)."""
    return [name for name in _DOMAINS if _installed(name)]


def _factory(spec: TaskSpec):
    """The domain module that builds ``spec``, ready to use; raises when the task cannot run here."""
    if spec.domain in _NOT_YET:
        raise _unsupported(spec.name, _NOT_YET[spec.domain])
    domain = _DOMAINS[spec.domain]
    module = _domain_module(domain.module)
    if spec.name in module.NOT_YET:
        raise _unsupported(spec.name, module.NOT_YET[spec.name])
    if spec.name not in module.TASKS:
        raise KeyError(f"task {spec.name!r} is in neither {module.__name__}.TASKS nor NOT_YET: add it to one")
    if not _installed(spec.domain):
        missing = [m for m in domain.requires if importlib.util.find_spec(m) is None]
        raise ImportError(f"task {spec.name!r} needs {domain.simulator}, but {', '.join(missing)} is not "
                          f"installed here: pip install 'mmbench2-lab[{domain.extra}]'")
    if domain.mujoco:
        _configure_mujoco_gl()
    return module


def _unsupported(name: str, needs: str) -> UnsupportedTaskError:
    return UnsupportedTaskError(f"task {name!r} needs {needs}, which mmbench2-lab does not run yet. "
                                "`mmbench2-lab tasks --runnable` lists the tasks that run here.")


def _domain_module(module: str):
    return importlib.import_module(f"mmbench2_lab.envs.{module}")


@cache
def _installed(domain: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in _DOMAINS[domain].requires)


@cache
def _configure_mujoco_gl() -> None:
    """Pick MuJoCo's headless OpenGL backend before its first import: EGL, else OSMesa.

    Only when ``MUJOCO_GL`` is unset and there is no display (Linux). EGL is probed in a subprocess,
    because a failed EGL attempt would pin PyOpenGL to EGL in this process.
    """
    if "MUJOCO_GL" in os.environ or os.environ.get("DISPLAY") or not sys.platform.startswith("linux"):
        return
    probe = "from mujoco.egl import GLContext; c = GLContext(8, 8); c.make_current(); c.free()"
    try:
        ok = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "MUJOCO_GL": "egl"},
                            capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    os.environ["MUJOCO_GL"] = "egl" if ok else "osmesa"
