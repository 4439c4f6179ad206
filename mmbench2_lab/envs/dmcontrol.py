"""DeepMind Control Suite tasks (dm_control), as the reference runs them.

Actions repeat twice (500 agent steps = the suite's 1000 control steps); the frame is
``physics.render(224, 224, camera)`` with camera 0 (quadruped: 2, from ``TaskSpec.camera``); the state is
the suite's observation dict flattened in order; the score is the episode return / 1000.
MMBench2's two unseen ``*-var1`` tasks are stock suite tasks (same physics, control and reward) drawn with
a dark flat skybox, a muted purple floor and purple anchor decorations.
"""
from __future__ import annotations

import types
import xml.etree.ElementTree as ET

import gymnasium
import numpy as np

from mmbench2_lab.envs.wrappers import REFERENCE_SIZE, ActionRepeat
from mmbench2_lab.tasks import TaskSpec

# MMBench2 task name -> (dm_control domain, task)
TASKS = {
    "walker-stand": ("walker", "stand"),
    "walker-walk": ("walker", "walk"),
    "walker-run": ("walker", "run"),
    "cheetah-run": ("cheetah", "run"),
    "reacher-easy": ("reacher", "easy"),
    "reacher-hard": ("reacher", "hard"),
    "acrobot-swingup": ("acrobot", "swingup"),
    "pendulum-swingup": ("pendulum", "swingup"),
    "cartpole-balance": ("cartpole", "balance"),
    "cartpole-balance-sparse": ("cartpole", "balance_sparse"),
    "cartpole-swingup": ("cartpole", "swingup"),
    "cartpole-swingup-sparse": ("cartpole", "swingup_sparse"),
    "cup-catch": ("ball_in_cup", "catch"),
    "finger-spin": ("finger", "spin"),
    "finger-turn-easy": ("finger", "turn_easy"),
    "finger-turn-hard": ("finger", "turn_hard"),
    "fish-swim": ("fish", "swim"),
    "hopper-stand": ("hopper", "stand"),
    "hopper-hop": ("hopper", "hop"),
    "quadruped-walk": ("quadruped", "walk"),
    "quadruped-run": ("quadruped", "run"),
    "cup-catch-var1": ("ball_in_cup", "catch"),
    "finger-turn-easy-var1": ("finger", "turn_easy"),
}
NOT_YET: dict[str, str] = {}
# The var1 look (colours from the MMBench2 release): asset element (tag, name) -> attributes replaced.
VAR1_LOOK = {
    "./common/skybox.xml": {("texture", "skybox"): {"builtin": "flat", "rgb1": ".2 .2 .2", "rgb2": ".2 .2 .2",
                                                    "mark": "none"}},
    "./common/materials.xml": {("texture", "grid"): {"rgb1": ".32 .27 .40", "rgb2": ".42 .36 .52",
                                                     "markrgb": ".42 .36 .52"},
                               ("material", "decoration"): {"rgba": ".42 .34 .54 1"}},
}


def return_range(name: str) -> tuple[float, float]:
    """Suite rewards are in [0, 1] per control step: 1000 steps give a return in [0, 1000]."""
    return (0.0, 1000.0)


def make(spec: TaskSpec) -> gymnasium.Env:
    domain, task = TASKS[spec.name]
    env = DMControlEnv(domain, task, camera_id=int(spec.camera), var1_look=spec.name.endswith("-var1"))
    return ActionRepeat(env, spec.action_repeat)


class DMControlEnv(gymnasium.Env):
    """A dm_control suite task as a gymnasium env (one control step per ``step``).

    The suite's own time limit is lifted: episode length is the caller's ``TimeLimit``. ``physics`` and
    ``dm_env`` reach the simulator.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, domain: str, task: str, camera_id: int, var1_look: bool = False):
        from dm_control import suite

        _restore_in1d(suite.quadruped)
        self.dm_env = suite.load(domain, task, task_kwargs={"time_limit": float("inf")},
                                 visualize_reward=False)
        if var1_look:
            xml, assets = getattr(suite, domain).get_model_and_assets()
            self.physics.reload_from_xml_string(xml, var1_assets(assets))
        self.camera_id = camera_id
        self.render_mode = "rgb_array"
        act = self.dm_env.action_spec()
        self.action_space = gymnasium.spaces.Box(
            np.broadcast_to(act.minimum, act.shape).astype(np.float32),
            np.broadcast_to(act.maximum, act.shape).astype(np.float32), dtype=np.float32)
        dim = sum(int(np.prod(v.shape)) for v in self.dm_env.observation_spec().values())
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (dim,), np.float32)

    @property
    def physics(self):
        return self.dm_env.physics

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:  # the suite task draws its initial state from its own RandomState
            self.dm_env.task._random = np.random.RandomState(seed)
        return self._state(self.dm_env.reset().observation), {}

    def step(self, action):
        ts = self.dm_env.step(np.asarray(action, dtype=np.float64))
        return self._state(ts.observation), float(ts.reward or 0.0), False, False, {}

    def render(self) -> np.ndarray:
        forget_current_gl_context()
        return self.physics.render(REFERENCE_SIZE, REFERENCE_SIZE, camera_id=self.camera_id)

    def close(self):
        self.dm_env.close()

    @staticmethod
    def _state(observation) -> np.ndarray:
        return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in observation.values()])


def var1_assets(assets: dict[str, bytes]) -> dict[str, bytes]:
    """The suite's shared assets with the skybox and materials recoloured to the var1 look."""
    recoloured = dict(assets)
    for path, changes in VAR1_LOOK.items():
        root = ET.fromstring(assets[path])
        for (tag, name), attributes in changes.items():
            element = root.find(f"./asset/{tag}[@name='{name}']")
            if element is None:
                raise KeyError(f"{path} has no <{tag} name={name!r}>: dm_control's assets changed")
            element.attrib.update(attributes)
        recoloured[path] = ET.tostring(root)
    return recoloured


def forget_current_gl_context() -> None:
    """Make dm_control's next render call eglMakeCurrent again.

    dm_control remembers which of its contexts is current and skips making it current again; other
    MuJoCo renderers in the process (gymnasium's, ``mujoco.Renderer``) switch contexts behind its back,
    after which it would draw into the wrong context.
    """
    from dm_control._render import base

    base._CURRENT_CONTEXT_FOR_THREAD.clear()
    base._CURRENT_THREAD_FOR_CONTEXT.clear()


class _NumpyWithIn1d(types.ModuleType):
    """numpy as seen by one module, plus ``in1d`` (removed in numpy 2.4) as an alias of ``isin``."""

    in1d = staticmethod(np.isin)

    def __getattr__(self, name):
        return getattr(np, name)


def _restore_in1d(module) -> None:
    """dm_control 1.0.28's quadruped calls ``np.in1d``; give that module (only) the old name back."""
    if not hasattr(np, "in1d") and module.np is np:
        module.np = _NumpyWithIn1d("numpy")
