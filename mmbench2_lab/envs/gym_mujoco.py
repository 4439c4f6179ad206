"""gymnasium's MuJoCo locomotion tasks (the ``-v4`` versions the reference used).

Ant, Hopper and Walker2d run with ``terminate_when_unhealthy=False``; per simulator step their reward is
``max(0, r)`` while healthy and -1 when not, and InvertedPendulum earns nothing once the pole has fallen
(the episode runs on). The frame is the native 480x480 render resized to 224. The score is the return
normalised over a fixed per-task range.
"""
from __future__ import annotations

import warnings

import gymnasium

from mmbench2_lab.envs.wrappers import ActionRepeat, ReferenceFrame
from mmbench2_lab.tasks import TaskSpec

# MMBench2 task name -> gymnasium id
TASKS = {
    "mujoco-ant": "Ant-v4",
    "mujoco-halfcheetah": "HalfCheetah-v4",
    "mujoco-hopper": "Hopper-v4",
    "mujoco-inverted-pendulum": "InvertedPendulum-v4",
    "mujoco-reacher": "Reacher-v4",
    "mujoco-walker": "Walker2d-v4",
}
NOT_YET: dict[str, str] = {}

_KEEP_RUNNING_UNHEALTHY = {"mujoco-ant", "mujoco-hopper", "mujoco-walker"}
_HEALTH_SHAPED = {"mujoco-hopper", "mujoco-walker"}
_RETURN_RANGE = {
    "mujoco-ant": (0.0, 5000.0),
    "mujoco-hopper": (0.0, 5000.0),
    "mujoco-walker": (0.0, 5000.0),
    "mujoco-halfcheetah": (0.0, 15000.0),
    "mujoco-inverted-pendulum": (0.0, 1000.0),
    "mujoco-reacher": (-50.0, 0.0),
}


def return_range(name: str) -> tuple[float, float]:
    return _RETURN_RANGE[name]


def make(spec: TaskSpec) -> gymnasium.Env:
    kwargs = {"terminate_when_unhealthy": False} if spec.name in _KEEP_RUNNING_UNHEALTHY else {}
    with warnings.catch_warnings():  # v4 is deliberate (the reference's version): silence "out of date"
        warnings.simplefilter("ignore", DeprecationWarning)
        sim = gymnasium.make(TASKS[spec.name], render_mode="rgb_array", **kwargs).unwrapped
    env = ReferenceFrame(sim)
    if spec.name in _HEALTH_SHAPED:
        env = HealthyReward(env)
    elif spec.name == "mujoco-inverted-pendulum":
        env = NoRewardAfterFall(env)
    return ActionRepeat(env, spec.action_repeat)


class HealthyReward(gymnasium.Wrapper):
    """Hopper/Walker2d reward per simulator step: ``max(0, r)`` while healthy, -1 otherwise."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        reward = max(0.0, float(reward)) if self.env.unwrapped.is_healthy else -1.0
        return obs, reward, terminated, truncated, info


class NoRewardAfterFall(gymnasium.Wrapper):
    """InvertedPendulum: once the pole has fallen (the simulator terminates), rewards are 0 until reset."""

    def reset(self, **kwargs):
        self._fallen = False
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._fallen = self._fallen or terminated
        return obs, 0.0 if self._fallen else reward, terminated, truncated, info
