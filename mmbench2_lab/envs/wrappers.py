"""The gymnasium wrappers every MMBench2 task shares, innermost first.

A domain module builds its simulator as a gymnasium env whose observation is the state vector, whose
``render()`` returns the reference 224x224 frame (``ReferenceFrame``) and whose ``info`` may carry
``success``, and repeats actions (``ActionRepeat``). ``make_env`` then stacks, inside out:
``RescaleAction`` (gymnasium) -> ``PadAction`` -> ``TimeLimit`` (gymnasium) -> ``MMBench2Env``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import gymnasium
import numpy as np
from PIL import Image

from mmbench2_lab.tasks import ACTION_DIM, TaskSpec

REFERENCE_SIZE = 224  # the reference renders every frame at 224x224, then resizes


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize an RGB frame (H, W, 3) uint8 to (size, size, 3); a no-op when already that size."""
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB frame of shape (H, W, 3), got {frame.shape}")
    if frame.shape[:2] == (size, size):
        return np.ascontiguousarray(frame, dtype=np.uint8)
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


class ReferenceFrame(gymnasium.Wrapper):
    """Turns the simulator's native ``render()`` into the reference 224x224 frame via ``transform``.

    The default transform bilinearly resizes (the reference's "native render, downsized if larger").

    It also keeps gymnasium's MuJoCo renderer from blanking other envs' frames in the same process (or
    its own): that renderer makes its OpenGL context current only when creating it, so we make it current
    before every frame; and on close it destroys the context but leaves its MuJoCo render context to be
    freed whenever Python collects it, which then deletes GL objects (frame buffers) in whatever context is
    current, another env's. We free that render context inside its own GL context on close or collection.
    """

    def __init__(self, env: gymnasium.Env, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        super().__init__(env)
        self._transform = transform or (lambda frame: resize_frame(frame, REFERENCE_SIZE))

    def render(self) -> np.ndarray:
        viewer = self._mujoco_viewer()
        if viewer is not None:
            viewer.make_context_current()
        return self._transform(self.env.render())

    def close(self):
        self._free_mujoco_render_context()
        super().close()

    def __del__(self):
        self._free_mujoco_render_context()

    def _mujoco_viewer(self):
        """gymnasium's offscreen MuJoCo viewer, once the simulator has rendered; else None."""
        return getattr(getattr(self.env.unwrapped, "mujoco_renderer", None), "viewer", None)

    def _free_mujoco_render_context(self):
        viewer = self._mujoco_viewer()
        if viewer is None or not getattr(getattr(viewer, "con", None), "offFBO", 0):
            return  # never rendered, or already freed
        try:
            viewer.make_context_current()
        except Exception:  # its GL context or display is gone (e.g. at exit): nothing to free safely
            return
        viewer.con.free()


class OwnGlobalRNG(gymnasium.Wrapper):
    """Gives a simulator that draws from numpy's *global* RNG (OGBench, RoboDesk) a stream of its own.

    ``reset(seed=s)`` seeds that stream, so such simulators become reproducible, and their draws neither
    consume nor disturb the caller's ``np.random`` state.
    """

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        self._state = np.random.RandomState().get_state()  # fresh entropy until seeded

    @contextmanager
    def _own_stream(self):
        caller = np.random.get_state()
        np.random.set_state(self._state)
        try:
            yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(caller)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._state = np.random.RandomState(seed).get_state()
        with self._own_stream():
            return self.env.reset(seed=seed, options=options)

    def step(self, action):
        with self._own_stream():
            return self.env.step(action)


class ActionRepeat(gymnasium.Wrapper):
    """Runs each agent action for ``repeat`` simulator steps and sums the rewards.

    MMBench2 episodes have a fixed length, so simulator terminations (a fall, a crash, a reached goal) are
    ignored and the simulation runs on, as in the reference; only a simulator-side truncation stops the
    repeat early. ``info`` is the last simulator step's.
    """

    def __init__(self, env: gymnasium.Env, repeat: int):
        if repeat < 1:
            raise ValueError(f"action repeat must be >= 1, got {repeat}")
        super().__init__(env)
        self.repeat = repeat

    def step(self, action):
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, _terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if truncated:
                break
        return obs, total, False, truncated, info


class PadAction(gymnasium.ActionWrapper):
    """Accepts the 16-d zero-padded MMBench2 action and passes the first ``action_dim`` entries on.

    Actions are clipped to [-1, 1]; the padding dimensions are ignored. A wrong shape or a NaN/inf raises
    ``ValueError`` naming the expected shape.
    """

    def __init__(self, env: gymnasium.Env, action_dim: int):
        inner = env.action_space
        if inner.shape != (action_dim,):
            raise ValueError(f"simulator action space {inner.shape} does not match the task's action_dim "
                             f"{action_dim}: fix the task table")
        super().__init__(env)
        self.action_dim = action_dim
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    def action(self, action) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (ACTION_DIM,):
            raise ValueError(f"expected an action of shape ({ACTION_DIM},) (the task's {self.action_dim} dims, "
                             f"zero-padded), got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action has NaN or inf entries: {a.tolist()}")
        return np.clip(a[:self.action_dim], -1.0, 1.0).astype(self.env.action_space.dtype)


class MMBench2Env(gymnasium.Wrapper):
    """The face every MMBench2 task shows: RGB observations and the reference's per-step info.

    Observation: the reference frame resized to (size, size, 3) uint8, or, with ``render=False``, the
    float32 state vector (no rendering at all, for fast state-only rollouts).
    ``info``: ``score`` in [0, 1] (the episode return normalised over ``return_range``, or, when that is
    None, the current step's success, as the reference computes it), ``success`` (bool), ``action_mask``
    (16,) float32, ``state`` (S,) float32 and ``task`` (name).
    """

    def __init__(self, env: gymnasium.Env, spec: TaskSpec, *, size: int, render: bool,
                 return_range: tuple[float, float] | None, seed: int | None):
        super().__init__(env)
        if size < 1:
            raise ValueError(f"frame size must be positive, got {size}")
        state_shape = env.observation_space.shape
        if state_shape is None or len(state_shape) != 1:
            raise ValueError(f"simulator state for {spec.name} must be a vector, got shape {state_shape}")
        self.task_spec = spec
        self.size = size
        self.render_frames = render
        self.return_range = return_range
        self.observation_space = (
            gymnasium.spaces.Box(0, 255, (size, size, 3), np.uint8) if render
            else gymnasium.spaces.Box(-np.inf, np.inf, state_shape, np.float32))
        self._mask = np.asarray(spec.action_mask, dtype=np.float32)
        self._pending_seed = seed
        self._return = 0.0
        if seed is not None:
            self.action_space.seed(seed)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed, self._pending_seed = self._pending_seed, None
        state, info = self.env.reset(seed=seed, options=options)
        self._return = 0.0
        state = np.asarray(state, dtype=np.float32).ravel()
        return self._observe(state), self._info(state, info)

    def step(self, action):
        state, reward, terminated, truncated, info = self.env.step(action)
        self._return += float(reward)
        state = np.asarray(state, dtype=np.float32).ravel()
        return self._observe(state), float(reward), bool(terminated), bool(truncated), self._info(state, info)

    def render(self) -> np.ndarray:
        """The current frame at the requested size, (size, size, 3) uint8."""
        return resize_frame(self.env.render(), self.size)

    def _observe(self, state: np.ndarray) -> np.ndarray:
        return self.render() if self.render_frames else state

    def _info(self, state: np.ndarray, sim_info: dict) -> dict:
        success = bool(sim_info.get("success", False))
        if self.return_range is None:
            score = float(success)
        else:
            lo, hi = self.return_range
            score = float(np.clip((self._return - lo) / (hi - lo), 0.0, 1.0))
        return {"score": score, "success": success, "action_mask": self._mask.copy(), "state": state,
                "task": self.task_spec.name}
