"""RoboDesk tasks (Franka arm at a desk; robodesk 1.0.0 on dm_control), as the reference runs them.

Each agent step is RoboDesk's own action repeat of 10 (dense reward summed); each reset ends with one
zero-action step. The frame is rendered at 224 from a free camera at distance 1.4, azimuth 90, elevation
-60, looking at (0, 0.535, 1.1) (RoboDesk's own camera sits at distance 1.8 and crops). The state is the
robot and object positions and velocities (73-d); the score is the task's success.

robodesk 1.0.0 subclasses the old ``gym`` package and resizes with ``PIL.Image.ANTIALIAS`` (gone in
Pillow 10). We import it with ``gymnasium`` standing in for ``gym`` and never call its resizing render.
"""
from __future__ import annotations

import sys

import gymnasium
import numpy as np

from mmbench2_lab.envs.dmcontrol import forget_current_gl_context
from mmbench2_lab.envs.wrappers import REFERENCE_SIZE, ActionRepeat, OwnGlobalRNG
from mmbench2_lab.tasks import TaskSpec

# MMBench2 task name -> RoboDesk task
TASKS = {
    "rd-push-red": "push_red",
    "rd-push-green": "push_green",
    "rd-push-blue": "push_blue",
    "rd-open-slide": "open_slide",
    "rd-open-drawer": "open_drawer",
    "rd-flat-block-in-bin": "flat_block_in_bin",
}
NOT_YET: dict[str, str] = {}

_INNER_REPEAT = 10  # RoboDesk's action_repeat per agent step
_STATE_KEYS = ("end_effector", "qpos_objects", "qpos_robot", "qvel_objects", "qvel_robot")  # sorted, as gym's Dict
_CAMERA = dict(distance=1.4, azimuth=90.0, elevation=-60.0, lookat=(0.0, 0.535, 1.1))


def return_range(name: str) -> None:
    """RoboDesk's score is success, not a normalised return."""
    return None


def make(spec: TaskSpec) -> gymnasium.Env:
    return ActionRepeat(OwnGlobalRNG(RoboDeskEnv(TASKS[spec.name])), spec.action_repeat)


def _import_robodesk():
    """Import robodesk with gymnasium standing in for the old ``gym`` package it subclasses."""
    saved = sys.modules.get("gym")
    sys.modules["gym"] = gymnasium
    try:
        import robodesk
    finally:
        if saved is None:
            del sys.modules["gym"]
        else:
            sys.modules["gym"] = saved
    return robodesk


class RoboDeskEnv(gymnasium.Env):
    """A RoboDesk task as a gymnasium env; ``desk`` is the RoboDesk instance, ``physics`` its dm_control physics.

    RoboDesk draws its initial object and arm positions from numpy's global RNG (wrap in ``OwnGlobalRNG``).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str):
        robodesk = _import_robodesk()
        self.desk = robodesk.RoboDesk(task=task, reward="dense", action_repeat=_INNER_REPEAT, episode_length=0,
                                      image_size=1)
        self.desk.render = lambda *args, **kwargs: None  # its observation image: we render our own frame
        self.task = task
        self.render_mode = "rgb_array"
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (self.desk.action_dim,), np.float32)
        dim = self._state(self.desk._get_obs()).size
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (dim,), np.float32)

    @property
    def physics(self):
        return self.desk.physics

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.desk.reset()
        obs, _, _, _ = self.desk.step(np.zeros(self.desk.action_dim))
        return self._state(obs), {"success": self._success()}

    def step(self, action):
        obs, reward, _, _ = self.desk.step(np.asarray(action, np.float64))
        return self._state(obs), float(reward), False, False, {"success": self._success()}

    def render(self) -> np.ndarray:
        from dm_control import mujoco

        forget_current_gl_context()
        camera = mujoco.Camera(self.physics, height=REFERENCE_SIZE, width=REFERENCE_SIZE, camera_id=-1)
        view = camera._render_camera  # dm_control exposes no setter for a free camera's pose
        view.distance, view.azimuth, view.elevation = _CAMERA["distance"], _CAMERA["azimuth"], _CAMERA["elevation"]
        view.lookat[:] = _CAMERA["lookat"]
        frame = camera.render()
        camera._scene.free()
        return frame

    def _state(self, obs: dict) -> np.ndarray:
        return np.concatenate([np.asarray(obs[k], np.float32).ravel() for k in _STATE_KEYS])

    def _success(self) -> bool:
        return bool(self.desk.reward_functions[self.task]("success"))
