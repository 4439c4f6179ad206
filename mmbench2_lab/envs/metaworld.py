"""Meta-World manipulation tasks (Sawyer arm), as the reference runs them, on Meta-World 3.x.

The reference used ``<name>-v2-goal-observable`` from a Meta-World 2 fork; we use the same tasks'
``-v3-goal-observable`` versions. Object and goal positions are re-randomised at every reset, and each
reset ends with one zero-action step, as in the reference. The frame comes from the ``corner2`` camera
moved to (0.75, 0.075, 0.7), flipped vertically (Meta-World renders it upside down) and resized from
480 to 224. The score is the current step's success.
"""
from __future__ import annotations

import gymnasium
import numpy as np

from mmbench2_lab.envs.wrappers import REFERENCE_SIZE, ActionRepeat, ReferenceFrame, resize_frame
from mmbench2_lab.tasks import TaskSpec

_NAMES = [
    "assembly", "basketball", "button-press-topdown", "button-press-topdown-wall", "button-press",
    "button-press-wall", "coffee-button", "coffee-pull", "coffee-push", "dial-turn", "disassemble",
    "door-open", "door-close", "drawer-close", "drawer-open", "faucet-open", "faucet-close", "hammer",
    "handle-press-side", "handle-press", "handle-pull-side", "handle-pull", "lever-pull", "peg-insert-side",
    "peg-unplug-side", "pick-out-of-hole", "pick-place", "pick-place-wall", "plate-slide",
    "plate-slide-side", "plate-slide-back", "plate-slide-back-side", "push-back", "push", "push-wall",
    "reach", "reach-wall", "soccer", "stick-push", "stick-pull", "sweep-into", "sweep", "window-open",
    "window-close", "bin-picking", "box-close", "door-lock", "door-unlock", "hand-insert",
]
# MMBench2 task name -> Meta-World env id
TASKS = {f"mw-{name}": f"{name}-v3-goal-observable" for name in _NAMES}
NOT_YET: dict[str, str] = {}

_CAMERA = "corner2"
_CAMERA_POS = (0.75, 0.075, 0.7)


def return_range(name: str) -> None:
    """Meta-World's score is success, not a normalised return."""
    return None


def make(spec: TaskSpec) -> gymnasium.Env:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    # A construction seed keeps Meta-World's constructor off the caller's np.random stream.
    seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
    sim = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[TASKS[spec.name]](seed=seed, render_mode="rgb_array")
    env = ReferenceFrame(MetaWorldTask(sim),
                         lambda frame: resize_frame(np.ascontiguousarray(frame[::-1]), REFERENCE_SIZE))
    return ActionRepeat(env, spec.action_repeat)


class MetaWorldTask(gymnasium.Wrapper):
    """A goal-observable Meta-World env with the reference's camera, per-reset randomisation and warm-up step."""

    def __init__(self, sim: gymnasium.Env):
        super().__init__(sim)
        camera = sim.model.camera(_CAMERA).id
        sim.model.cam_pos[camera] = _CAMERA_POS
        sim.mujoco_renderer.camera_id = camera
        sim._freeze_rand_vec = False  # new object/goal positions at every reset ...
        sim.seeded_rand_vec = True  # ... drawn from the env's own seeded RNG
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, sim.observation_space.shape, np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.env.unwrapped.seed(seed)  # Meta-World ignores reset(seed=...)
        self.env.reset()
        obs, _, _, _, info = self.env.step(np.zeros(self.env.action_space.shape, np.float32))
        return obs.astype(np.float32), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs.astype(np.float32), reward, terminated, truncated, info
