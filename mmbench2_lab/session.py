"""An interactive rollout: steer a world model with keys or actions, one predicted frame per step.

One :class:`RolloutSession` is one user's episode. It starts from a live simulator reset (the frame
resized to the model's size) or from given frames, then every ``step`` samples the next latent with
:func:`~mmbench2_lab.predictors.predict_next` (all three predictors in one batched pass, the decoded
frame re-used for u_r) and turns the normalised values into a hallucination state with a
:class:`~mmbench2_lab.hallucination.HallucinationMonitor`. The widget and the Gradio app are thin clients.

The reference demo's settings (reference spec section 9): K = 8 shortcut steps, tau_ctx 0.01, warm start
tau_init 0.125 from the previous latent, the last 24 latents as context, actions EMA-smoothed
``a <- 0.817 a + 0.183 a_raw``, keys ArrowRight/Left -> dim 0, ArrowUp/Down -> dim 1, d/a -> dim 2,
w/s -> dim 3 (opposing keys cancel). Beyond the reference: side-by-side mode steps the real simulator with
the same actions, guarded mode re-anchors the model on the real frame whenever the state is
"hallucinating", every result carries ``scene_u_r``, the round-trip residual of the last real frame the
rollout was anchored on (high on scenes the tokenizer cannot draw, which u_r of the predictions can miss),
and the context's keys and values are kept across steps (``sampler.ContextCache``) instead of re-running
the whole window every step.

Threads: sessions are independent; inference is serialised by one lock per model (:func:`model_lock`),
and every simulator call runs on one dedicated thread, because MuJoCo's EGL contexts are bound to the
thread that made them.
"""
from __future__ import annotations

import functools
import gc
import itertools
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from mmbench2_lab.hallucination import HallucinationMonitor
from mmbench2_lab.predictors import PREDICTORS, predict_next, round_trip_residual
from mmbench2_lab.sampler import ContextCache
from mmbench2_lab.tasks import ACTION_DIM, TaskSpec, get_task

# Key pairs (positive, negative) per action dimension, as the reference demo binds them.
KEY_BINDINGS = (("ArrowRight", "ArrowLeft"), ("ArrowUp", "ArrowDown"), ("d", "a"), ("w", "s"))
ACTION_KEYS = frozenset(k for pair in KEY_BINDINGS for k in pair) | frozenset(
    k.upper() for pair in KEY_BINDINGS for k in pair if len(k) == 1)
SMOOTHING = 0.817  # EMA weight of the previous action (the reference's --action_smooth_beta)
STATE_COLOURS = {"calibrating": (100, 116, 139), "stable": (156, 163, 175),  # slate, grey
                 "drifting": (245, 158, 11), "hallucinating": (220, 38, 38)}  # amber, red


class TaskNotRunnableError(ValueError):
    """A real MMBench2 task whose simulator does not run on this machine."""


# -- keys, smoothing, pictures ------------------------------------------------------------------
def action_from_keys(keys: Iterable[str], action_dim: int = ACTION_DIM) -> np.ndarray:
    """Held keys -> raw action (16,) in {-1, 0, 1}: each key pair drives one dimension, opposing keys
    cancel, dimensions at or beyond ``action_dim`` stay 0. Unknown key names raise ValueError."""
    keys = set(keys)
    unknown = sorted(k for k in keys if k not in ACTION_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown}; steering keys are "
                         f"{', '.join(k for pair in KEY_BINDINGS for k in pair)} (letters in either case)")
    a = np.zeros(ACTION_DIM, dtype=np.float32)
    for dim, (pos, neg) in enumerate(KEY_BINDINGS[:max(0, action_dim)]):
        a[dim] = float(bool(keys & {pos, pos.upper()})) - float(bool(keys & {neg, neg.upper()}))
    return a


def smooth_action(previous: np.ndarray, raw: np.ndarray, beta: float = SMOOTHING) -> np.ndarray:
    """EMA of the actions fed to the model: a <- beta a + (1 - beta) a_raw (beta 0: no smoothing)."""
    return (beta * np.asarray(previous, np.float32) + (1.0 - beta) * np.asarray(raw, np.float32)).astype(np.float32)


def overlay(frame: np.ndarray, heat: Optional[np.ndarray] = None, state: Optional[str] = None, *,
            alpha: float = 0.6, scale: int = 1, border: Optional[int] = None) -> np.ndarray:
    """A frame for display: ``heat`` (H, W) tinted red onto ``frame`` (H, W, 3) uint8 (scaled by its
    maximum, so the brightest pixel is the most unsure), enlarged ``scale`` times (nearest), with a
    border ring in the colour of ``state`` (grey stable, amber drifting, red hallucinating)."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"overlay needs an RGB uint8 frame (H, W, 3), got {frame.dtype} {frame.shape}")
    out = frame.astype(np.float32)
    if heat is not None:
        heat = np.asarray(heat, dtype=np.float32)
        if heat.shape != frame.shape[:2]:
            raise ValueError(f"heat map {heat.shape} does not match the frame {frame.shape[:2]}")
        w = alpha * np.clip(heat / max(float(heat.max()), 1e-12), 0.0, 1.0)[..., None]
        out = out * (1.0 - w) + np.array([255.0, 0.0, 0.0]) * w
    out = np.clip(out, 0, 255).round().astype(np.uint8)
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    if state is not None:
        if state not in STATE_COLOURS:
            raise ValueError(f"unknown state {state!r}; states are {', '.join(STATE_COLOURS)}")
        b = border if border is not None else max(2, out.shape[0] // 32)
        out[:b], out[-b:], out[:, :b], out[:, -b:] = (STATE_COLOURS[state],) * 4
    return out


def save_video(frames: list[np.ndarray], path: str | os.PathLike, fps: float = 10.0) -> Path:
    """Write frames (H, W, 3) uint8 to ``path`` atomically: mp4 (H.264 via imageio-ffmpeg) or GIF
    (Pillow). An .mp4 path falls back to a .gif beside it when imageio-ffmpeg is not installed.
    Returns the path written."""
    if not frames:
        raise ValueError("nothing to write: no frames were recorded (record=True, then step)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4":
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio writes mp4 with)
        except ImportError:
            path = path.with_suffix(".gif")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix.lower() == ".mp4":
        imageio.mimwrite(tmp, frames, fps=max(1.0, float(fps)), codec="libx264", quality=8, macro_block_size=1,
                         format="FFMPEG")
    elif path.suffix.lower() == ".gif":
        from PIL import Image
        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(round(1000.0 / max(1.0, float(fps)))), loop=0)
    else:
        raise ValueError(f"cannot write {path.suffix!r} videos; use a .mp4 or .gif path")
    os.replace(tmp, path)
    return path


# -- threads: one inference lock per model; simulators live on one thread -------------------------
_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_SIM_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmbench2-simulator")
_SIMULATORS: dict[int, object] = {}  # handle -> env; read and written on the simulator thread only
_HANDLES = itertools.count()


def model_lock(world_model) -> threading.Lock:
    """The lock that serialises inference on ``world_model`` across every session using it."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(world_model, threading.Lock())


def on_simulator_thread(fn, *args, **kwargs):
    """Run ``fn`` on the one simulator thread and return its result (exceptions re-raise here)."""
    if threading.current_thread().name.startswith("mmbench2-simulator"):
        return fn(*args, **kwargs)
    return _SIM_THREAD.submit(fn, *args, **kwargs).result()


# A session holds a handle, never the env itself, so that the env is also closed and collected on the
# simulator thread (freeing a MuJoCo render context from another thread fails).
def _sim_open(task: str, size: int, seed: int) -> tuple[int, np.ndarray]:
    from mmbench2_lab.envs import make_env
    env = make_env(task, size=size, seed=seed)
    first = env.reset()[0]
    handle = next(_HANDLES)
    _SIMULATORS[handle] = env
    return handle, first


def _sim_reset(handle: int) -> np.ndarray:
    return _SIMULATORS[handle].reset()[0]


def _sim_step(handle: int, action: np.ndarray) -> tuple[np.ndarray, float]:
    """Step the simulator; a finished episode starts over. -> (frame, reward)."""
    frame, reward, terminated, truncated, _ = _SIMULATORS[handle].step(action)
    if terminated or truncated:
        frame = _SIMULATORS[handle].reset()[0]
    return frame, float(reward)


def _sim_close(handle: int) -> None:
    env = _SIMULATORS.pop(handle, None)
    if env is not None:
        env.close()
        del env
        gc.collect()


# -- the session ------------------------------------------------------------------------------
def _exclusive(method):
    """Run a session method under the session's own lock."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._busy:
            return method(self, *args, **kwargs)
    return locked


@dataclass
class StepResult:
    """What one step shows: the predicted frame, the real one (side-by-side), predictors and state."""
    step: int  # frames predicted since the episode started (0: the starting frame)
    frame: np.ndarray  # (H, W, 3) uint8 the model's frame
    real_frame: Optional[np.ndarray]  # (H, W, 3) uint8 the simulator's frame, side-by-side / guarded only
    action: np.ndarray  # (16,) the smoothed, masked action that produced this frame
    values: dict  # u_r, u_f, u_s, motion, u_r_norm, u_f_norm, u_s_norm (floats; empty at step 0)
    maps: dict  # u_r, u_f, u_s -> (H, W) float32 pixel maps, when the session computes maps
    state: str  # calibrating | stable | drifting | hallucinating
    states: dict  # per predictor
    reward: Optional[float] = None  # the reward head's prediction for entering this frame
    real_reward: Optional[float] = None  # the simulator's reward (side-by-side)
    reanchored: bool = False  # guarded mode replaced this frame's latent by the real frame's
    paused: bool = False
    scene_u_r: Optional[float] = None  # ours: u_r of the last real frame the rollout was anchored on

    def summary(self) -> str:
        """The normalised predictors and the scene's round trip in one line,
        e.g. "u_r_norm 1.02 · u_f_norm 0.31 · u_s_norm 0.08 · scene u_r 0.027"."""
        parts = [f"{k}_norm {self.values[f'{k}_norm']:.2f}" for k in PREDICTORS if f"{k}_norm" in self.values]
        if self.scene_u_r is not None:
            parts.append(f"scene u_r {self.scene_u_r:.3f}")
        return " · ".join(parts)

    def record(self, task: str, episode: int) -> dict:
        """This step as a JSON-ready dict (no pixels)."""
        return {"task": task, "episode": episode, "step": self.step, "state": self.state,
                "action": [round(float(a), 6) for a in self.action], **self.values,
                **{f"state_{k}": v for k, v in self.states.items()}, "reward": self.reward,
                "real_reward": self.real_reward, "reanchored": self.reanchored, "scene_u_r": self.scene_u_r}


@dataclass
class _Episode:
    """The rolling context: latents (S, D) and the actions that led to them, index-aligned."""
    latents: list = field(default_factory=list)
    actions: list = field(default_factory=list)  # actions[k] led to latents[k]; actions[0] = 0


class RolloutSession:
    """One steerable world-model rollout (see the module docstring).

    Args:
        world_model: a :class:`~mmbench2_lab.model.world_model.WorldModel` (``load_pretrained``).
        task: an MMBench2 task; the episode starts from its simulator's reset. Optional with ``frames``.
        frames: starting frames (T, H, W, 3) uint8 or (T, 3, H, W) in [0, 1] instead of a reset; the last
            ``ctx_window`` become the context (with zero actions).
        seed: seeds the simulator's first reset and the sampling noise.
        side_by_side: also step the real simulator with the same actions (StepResult.real_frame).
        guarded: re-anchor on the real simulator's encoded frame whenever the state is hallucinating
            (implies side_by_side).
        monitor: "thresholds" (the paper's), "zscore" (the reference demo's) or a HallucinationMonitor.
        maps: compute the u_r / u_f / u_s pixel maps every step (for overlays).
        record: keep each displayed frame for :meth:`save_recording`.
        smoothing: EMA weight beta of the previous action (0 disables smoothing).
        steps, tau_ctx, tau_init, n_seeds, ctx_window, kv_cache: sampling; default to the reference demo
            (K = 8 capped at the model's k_max, 0.01, 0.125, 2 seeds, the model's ctx_window, its kv_cache).
        cache_context: keep the context's keys and values across steps (``sampler.ContextCache``): each
            frame is corrupted and run once, when it joins the context, which then spans ctx_window/2 to
            ctx_window frames. Several times cheaper per step; False re-runs the whole window every step
            with fresh corruption, as the reference demo does.
    """

    def __init__(self, world_model, task: Optional[str] = None, *, frames=None, seed: int = 0,
                 side_by_side: bool = False, guarded: bool = False, monitor="thresholds", maps: bool = False,
                 record: bool = False, smoothing: float = SMOOTHING, steps: Optional[int] = None,
                 tau_ctx: float = 0.01, tau_init: float = 0.125, n_seeds: int = 2,
                 ctx_window: Optional[int] = None, kv_cache: Optional[bool] = None, cache_context: bool = True):
        cfg = world_model.config
        if cfg.tokenizer.height != cfg.tokenizer.width:
            raise ValueError(f"interactive sessions need square frames; the model's are "
                             f"{cfg.tokenizer.height}x{cfg.tokenizer.width}")
        if task is None and frames is None:
            raise ValueError("give a task (start from its simulator) or frames (start from them)")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.model = world_model
        self.size = cfg.tokenizer.height
        self.seed = int(seed)
        self.maps = bool(maps)
        self.recording = bool(record)
        self.smoothing = float(smoothing)
        self.sampling = dict(steps=min(8, cfg.dynamics.k_max) if steps is None else int(steps),
                             tau_ctx=float(tau_ctx), tau_init=float(tau_init), n_seeds=int(n_seeds),
                             kv_cache=cfg.sampler.kv_cache if kv_cache is None else bool(kv_cache))
        self.ctx_window = int(cfg.sampler.ctx_window if ctx_window is None else ctx_window)
        if self.ctx_window < 1:
            raise ValueError(f"ctx_window must be >= 1, got {self.ctx_window}")
        self.cache_context = bool(cache_context) and self.sampling["kv_cache"] and self.ctx_window >= 2
        self._context_cache: Optional[ContextCache] = None
        self.monitor = monitor if isinstance(monitor, HallucinationMonitor) else HallucinationMonitor(mode=monitor)
        self.side_by_side = bool(side_by_side or guarded)
        self.guarded = bool(guarded)
        self.paused = False
        self.reanchors = 0  # guarded re-anchors since the session began
        self.episode = 0
        self.records: list[dict] = []  # per-step records of the current episode
        self.recorded_frames: list[np.ndarray] = []  # this episode's displayed frames, while recording
        self._device = next(world_model.parameters()).device
        self._generator = torch.Generator(device=self._device).manual_seed(self.seed)
        self._lock = model_lock(world_model)
        self._busy = threading.RLock()  # one call at a time per session (a UI may fire events concurrently)
        self._handle: Optional[int] = None  # the simulator (see _sim_open), when started from a task
        self._closer: Optional[weakref.finalize] = None  # closes it, once, also if close() is never called
        self._spec: Optional[TaskSpec] = None
        self._start_frames = None
        self.last: Optional[StepResult] = None
        if frames is not None:
            if self.side_by_side:
                raise ValueError("side-by-side and guarded modes step the real simulator, which cannot start "
                                 "from given frames; start from a task instead")
            self._spec = None if task is None else get_task(task)
            self._start_frames = self._as_frames(frames)
            self._begin(self._start_frames)
        else:
            self._spec, first = self._open(task)
            self._begin(first[None])

    # -- properties -----------------------------------------------------------------------------
    @property
    def task(self) -> Optional[str]:
        return None if self._spec is None else self._spec.name

    @property
    def action_dim(self) -> int:
        """Valid action dimensions: the task's, or all 16 for frames without a task."""
        return ACTION_DIM if self._spec is None else self._spec.action_dim

    @property
    def action_mask(self) -> np.ndarray:
        """(16,) float32: 1 for the task's valid dimensions, 0 for the padding."""
        return (np.arange(ACTION_DIM) < self.action_dim).astype(np.float32)

    @property
    def context(self) -> torch.Tensor:
        """The rolling context the next step is predicted from: packed latents (t, S, D), t <= ctx_window."""
        return torch.stack(self._ep.latents)

    @property
    def history_len(self) -> int:
        """Latents in the rolling context (at most ctx_window)."""
        return len(self._ep.latents)

    @property
    def step_count(self) -> int:
        return 0 if self.last is None else self.last.step

    def traces(self, last: Optional[int] = None) -> dict[str, list[float]]:
        """This episode's normalised predictors per step, {"u_r": [...], "u_f": [...], "u_s": [...]} (the
        ``last`` steps only), ready for ``calibration.per_frame_trace_figure``."""
        rows = self.records[-last:] if last else self.records
        return {k: [r[f"{k}_norm"] for r in rows] for k in PREDICTORS}

    # -- control --------------------------------------------------------------------------------
    @_exclusive
    def step(self, action=None, *, keys: Optional[Iterable[str]] = None) -> StepResult:
        """Predict the next frame under ``action`` (16 values, or the task's action_dim) or the held
        ``keys``; neither means no input (the smoothed action decays towards 0). Paused: no step, the
        current frame again. Dimensions beyond the task's action_dim are ignored; values are clipped to
        [-1, 1]."""
        if action is not None and keys is not None:
            raise ValueError("give either action or keys, not both")
        raw = action_from_keys(keys, self.action_dim) if keys is not None else self._check_action(action)
        if self.paused:
            self.last = replace(self.last, paused=True)
            return self.last
        a = smooth_action(self._a_smooth, raw * self.action_mask, self.smoothing)
        self._a_smooth = a
        real_frame = real_reward = None
        if self.side_by_side:
            real_frame, real_reward = on_simulator_thread(_sim_step, self._handle, a)
        ep, cc = self._ep, self._context_cache
        a_t = torch.as_tensor(a, device=self._device)[None]
        if cc is not None:
            context, actions = cc.latents, torch.cat([cc.actions, a_t[:, None]], dim=1)
        else:
            context = self.context[None]
            actions = torch.as_tensor(np.stack(ep.actions + [a]), device=self._device)[None]  # (1, t+1, 16)
        with self._lock, torch.no_grad():
            p = predict_next(self.model, context, actions, torch.as_tensor(self.action_mask, device=self._device),
                             maps=self.maps, generator=self._generator, context_cache=cc, **self.sampling)
            reward = None
            if self.model.reward_head is not None and p.h is not None:
                reward = float(self.model.reward_head.decode(self.model.reward_head(p.h))[0, 0])
        values = {k: float(v[0]) for k, v in p.values.items()}
        state, states = self.monitor.update(values)
        z, reanchored = p.z[0], False
        if self.guarded and state == "hallucinating":  # continue from the real frame instead
            with self._lock, torch.no_grad():
                z = self._encode(real_frame[None])[-1]
                self._scene_u_r = self._round_trip(z)
            reanchored = True
            self.reanchors += 1
        if cc is not None:
            with self._lock, torch.no_grad():
                cc.append(z[None], a_t)
        ep.latents.append(z)
        ep.actions.append(a)
        del ep.latents[:-self.ctx_window], ep.actions[:-self.ctx_window]
        result = StepResult(step=self.step_count + 1, frame=_to_uint8(p.frame[0]), real_frame=real_frame,
                            action=a, values=values,
                            maps={k: v[0].float().cpu().numpy() for k, v in p.maps.items()},
                            state=state, states=states, reward=reward, real_reward=real_reward,
                            reanchored=reanchored, scene_u_r=self._scene_u_r)
        return self._show(result)

    @_exclusive
    def pause(self) -> None:
        """Hold the rollout: steps return the current frame (flagged paused) until resume()."""
        self.paused = True
        self.last = replace(self.last, paused=True)

    @_exclusive
    def resume(self) -> None:
        self.paused = False
        self.last = replace(self.last, paused=False)

    def toggle_pause(self) -> bool:
        """Pause or resume; True when now paused."""
        self.resume() if self.paused else self.pause()
        return self.paused

    @_exclusive
    def reset(self) -> StepResult:
        """A new episode of the same task (a fresh simulator reset, or the given frames again)."""
        if self._handle is None:
            return self._begin(self._start_frames)
        return self._begin(on_simulator_thread(_sim_reset, self._handle)[None])

    @_exclusive
    def switch_task(self, task: str) -> StepResult:
        """Start a new episode of another task; unknown or non-runnable names raise and change nothing."""
        spec, first = self._open(task)  # closes the old simulator only once the new one runs
        self._spec, self._start_frames = spec, None
        return self._begin(first[None])

    @_exclusive
    def set_mode(self, *, side_by_side: Optional[bool] = None, guarded: Optional[bool] = None) -> StepResult:
        """Turn side-by-side / guarded mode on or off. Turning the real simulator on starts a new episode,
        so that it and the model begin from the same frame."""
        want_guarded = self.guarded if guarded is None else bool(guarded)
        want_sbs = (self.side_by_side if side_by_side is None else bool(side_by_side)) or want_guarded
        if want_sbs and self._handle is None:
            raise ValueError("side-by-side and guarded modes need a task's simulator; this session started "
                             "from frames: switch_task(name) first")
        starts_following = want_sbs and not self.side_by_side
        self.side_by_side, self.guarded = want_sbs, want_guarded
        return self.reset() if starts_following else self.last

    def save_recording(self, path: str | os.PathLike, fps: float = 10.0) -> Path:
        """Write this episode's displayed frames (model | real side by side) as a video (see save_video)."""
        return save_video(self.recorded_frames, path, fps)

    @_exclusive
    def close(self) -> None:
        """Close the simulator (idempotent)."""
        closer, self._closer, self._handle = self._closer, None, None
        if closer is not None and closer.alive:
            closer().result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _open(self, task: str):
        """Look ``task`` up, build its simulator at the model's frame size and reset it, or raise a clear
        error; the session then runs it (the old one closed). -> (spec, first frame (H, W, 3) uint8)."""
        from mmbench2_lab.envs import is_runnable
        spec = get_task(task)  # unknown names raise with the closest matches
        if not is_runnable(spec.name):
            raise TaskNotRunnableError(
                f"task {spec.name!r} ({spec.domain}) cannot run here: its simulator is not supported or not "
                "installed. `mmbench2-lab tasks --runnable` lists the tasks that do.")
        handle, first = on_simulator_thread(_sim_open, spec.name, self.size, self.seed)
        self.close()
        self._handle = handle
        self._closer = weakref.finalize(self, _SIM_THREAD.submit, _sim_close, handle)
        self._closer.atexit = False
        return spec, first

    def _begin(self, frames: np.ndarray) -> StepResult:
        """Start an episode from frames (T, H, W, 3) uint8: a simulator reset's (T = 1) or the given ones."""
        real = frames[-1] if self._handle is not None and self.side_by_side else None
        with self._lock, torch.no_grad():
            latents = self._encode(frames[-self.ctx_window:])
            shown = self.model.decode(latents[-1:][None])[0, 0]
            self._scene_u_r = self._round_trip(latents[-1])
        self._ep = _Episode(latents=list(latents), actions=[np.zeros(ACTION_DIM, np.float32)] * len(latents))
        if self.cache_context:
            cc = ContextCache(self.model.dynamics, self.ctx_window, tau_ctx=self.sampling["tau_ctx"],
                              act_mask=torch.as_tensor(self.action_mask, device=self._device),
                              generator=self._generator, amp=self.model.config.sampler.amp)
            with self._lock, torch.no_grad():
                cc.reset(latents[None], torch.zeros(1, len(latents), ACTION_DIM, device=self._device))
            self._context_cache = cc
        self._a_smooth = np.zeros(ACTION_DIM, np.float32)
        self.monitor.reset()
        self.paused = False
        self.episode += 1
        self.records, self.recorded_frames = [], []
        state = "calibrating" if self.monitor.mode == "zscore" else "stable"
        return self._show(StepResult(step=0, frame=_to_uint8(shown), real_frame=real,
                                     action=self._a_smooth.copy(), values={}, maps={}, state=state, states={},
                                     scene_u_r=self._scene_u_r),
                          record=False)

    def _show(self, result: StepResult, record: bool = True) -> StepResult:
        self.last = result
        if record:
            self.records.append(result.record(self.task, self.episode))
        if self.recording:
            picture = overlay(result.frame, state=result.state)
            if result.real_frame is not None:
                picture = np.concatenate([picture, result.real_frame], axis=1)
            self.recorded_frames.append(picture)
        return result

    def _round_trip(self, z: torch.Tensor) -> float:
        """u_r of one real frame's latent (S, D): how far the scene sits from what the tokenizer can draw."""
        return float(round_trip_residual(self.model.tokenizer, z[None])[0])

    def _encode(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> packed latents (T, S, D), encoded as one causal clip."""
        x = torch.as_tensor(np.array(frames), device=self._device).permute(0, 3, 1, 2).float() / 255.0
        return self.model.encode(x[None])[0]

    def _check_action(self, action) -> np.ndarray:
        """An action of 16 values or of the task's action_dim -> (16,) float32 clipped to [-1, 1]."""
        if action is None:
            return np.zeros(ACTION_DIM, np.float32)
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.size not in (ACTION_DIM, self.action_dim):
            raise ValueError(f"an action has {ACTION_DIM} values (the padded width) or {self.action_dim} "
                             f"(this task's action_dim), got {a.size}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action has NaN or inf entries: {a.tolist()}")
        return np.clip(np.pad(a, (0, ACTION_DIM - a.size)), -1.0, 1.0)

    def _as_frames(self, frames) -> np.ndarray:
        """Starting frames -> (T, size, size, 3) uint8."""
        from mmbench2_lab.envs.wrappers import resize_frame
        x = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
            raise ValueError(f"frames must be (T, H, W, 3) uint8 or (T, 3, H, W) in [0, 1], got shape {x.shape}")
        if x.shape[-1] != 3:
            x = x.transpose(0, 2, 3, 1)
        if x.dtype != np.uint8:
            x = (np.clip(x.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return np.stack([resize_frame(f, self.size) for f in x])


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (frame.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
