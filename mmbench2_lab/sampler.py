"""Shortcut Euler sampling of the next latent frame, and autoregressive rollouts.

One new frame: start from noise (optionally warm-started towards the previous latent), then for Euler
step i = 0..K-1 query the dynamics at signal level tau_i = i/K with step index log2 K, and move
``z <- z + (x1_hat - z) / max(1e-4, 1 - tau_i) / K``; the last step lands on x1_hat. Context frames are
slightly corrupted, ``(1 - tau_ctx) ctx + tau_ctx eps``, for robustness to autoregressive errors. With the
KV cache the context is run once (prefill) and each Euler step runs only the new frame (T = 1).

Noise is drawn in the reference order (initial z, then the context corruption) from ``generator`` or the
global RNG, so a seeded call reproduces the reference samplers; ``noise=`` injects recorded draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mmbench2_lab.model.dynamics import Dynamics
from mmbench2_lab.training.engine import autocast_context


@dataclass
class Sample:
    """One sampled frame per batch row."""
    z: torch.Tensor  # (B, n_spatial, d_spatial) the new packed latent
    x1_traj: torch.Tensor  # (n_exec, B, n_spatial, d_spatial) clean prediction x1_hat at each executed step
    z_traj: torch.Tensor  # (n_exec, B, n_spatial, d_spatial) z after each executed step
    h: Optional[torch.Tensor]  # (B, 1, n_agent, D) agent states of the new frame at the last step, or None
    executed_steps: list  # Euler step indices i that ran (warm start skips the first ones)


def context_signal_index(tau_ctx: float, k_max: int) -> int:
    """Signal index given to corrupted context frames: min(round((1 - tau_ctx) k_max), k_max).

    Python rounding, as in the reference: tau_ctx = 0.01 with k_max = 64 gives 63, with k_max = 8 gives 8
    (the context is still corrupted).
    """
    return min(int(round((1.0 - tau_ctx) * k_max)), k_max)


def shortcut_schedule(steps: int, k_max: int) -> dict:
    """The K-step shortcut Euler grid: K, step index e = log2 K, dt = 1/K, tau_i = i/K and signal index
    tau_idx_i = i * k_max / K for i = 0..K-1."""
    K = int(steps)
    if K < 1 or K & (K - 1) or K > k_max:
        raise ValueError(f"steps must be a power of two <= k_max={k_max}, got {steps}")
    return {"K": K, "e": K.bit_length() - 1, "dt": 1.0 / K, "tau": [i / K for i in range(K)],
            "tau_idx": [i * (k_max // K) for i in range(K)]}


def expand_seeds(x: Optional[torch.Tensor], n_seeds: int) -> Optional[torch.Tensor]:
    """(B, ...) -> (B * n_seeds, ...), row b * n_seeds + n, to sample n_seeds noise seeds per row."""
    return None if x is None else x.repeat_interleave(n_seeds, dim=0)


def corrupt_context(context: torch.Tensor, eps: Optional[torch.Tensor], tau_ctx: float, k_max: int
                    ) -> tuple[torch.Tensor, int]:
    """(1 - tau_ctx) context + tau_ctx eps and its signal index; with eps None the clean context at k_max."""
    if eps is None:
        return context, k_max
    return (1.0 - tau_ctx) * context + tau_ctx * eps.to(context), context_signal_index(tau_ctx, k_max)


def encode_context(dynamics: Dynamics, past: torch.Tensor, actions: Optional[torch.Tensor],
                   act_mask: Optional[torch.Tensor], signal: int, *, lang_emb: Optional[torch.Tensor] = None,
                   kv_cache: Optional[list] = None, amp: str = "none") -> list:
    """Run (already corrupted) context frames (B, t, S, D) as clean-step tokens at ``signal``, after the
    frames in ``kv_cache`` if given; returns the per-layer keys and values of all of them."""
    B, t = past.shape[:2]
    full = lambda v: torch.full((B, t), v, dtype=torch.long, device=past.device)  # noqa: E731
    with autocast_context(amp, past.device):
        return dynamics(actions, full(dynamics.cfg.emax), full(signal), past, act_mask=act_mask,
                        lang_emb=lang_emb, kv_cache=kv_cache, return_kv_cache=True)[2]


class ContextCache:
    """The keys and values of a rolling context, kept across the steps of an interactive rollout.

    ``sample_next`` alone re-corrupts and re-runs the whole context at every step (as the reference demo
    does). Here each frame is corrupted at ``tau_ctx`` and run once, when it joins the context, so a step
    costs the new frame's Euler passes plus one single-frame pass. The reference's RoPE is not a true
    rotation, so cached keys cannot be shifted down when the oldest frame leaves; instead, once the
    context holds ``window`` frames the next append rebuilds it from the newest ``window // 2 + 1``
    (one prefill every window/2 steps). The model thus always sees a context of window/2 .. window frames
    at positions 0..t-1, as in training. ``act_mask`` is (A,) or None; batch rows are independent rollouts.
    """

    def __init__(self, dynamics: Dynamics, window: int, *, tau_ctx: float = 0.0,
                 act_mask: Optional[torch.Tensor] = None, lang_emb: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, amp: str = "none"):
        if window < 2:
            raise ValueError(f"a context cache needs window >= 2, got {window}")
        self.dynamics, self.window, self.tau_ctx = dynamics, int(window), float(tau_ctx)
        self.act_mask, self.lang_emb, self.generator, self.amp = act_mask, lang_emb, generator, amp
        self.kv: Optional[list] = None
        self.latents: Optional[torch.Tensor] = None  # (B, t, S, D) the frames behind the cache
        self.actions: Optional[torch.Tensor] = None  # (B, t, A) the actions that led to them

    @property
    def length(self) -> int:
        return 0 if self.latents is None else self.latents.shape[1]

    def _corrupt(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        eps = (torch.randn(z.shape, generator=self.generator, device=z.device, dtype=z.dtype)
               if self.tau_ctx > 0.0 else None)
        return corrupt_context(z, eps, self.tau_ctx, self.dynamics.cfg.k_max)

    @torch.no_grad()
    def reset(self, latents: torch.Tensor, actions: torch.Tensor) -> None:
        """Start from context frames (B, t, S, D) and their led-to actions (B, t, A): one prefill."""
        latents, actions = latents[:, -self.window:], actions[:, -self.window:]
        past, signal = self._corrupt(latents)
        self.kv = encode_context(self.dynamics, past, actions, self.act_mask, signal, lang_emb=self.lang_emb,
                                 amp=self.amp)
        self.latents, self.actions = latents, actions

    @torch.no_grad()
    def append(self, z: torch.Tensor, action: torch.Tensor) -> None:
        """Add the frame z (B, S, D) that ``action`` (B, A) led to."""
        latents = torch.cat([self.latents, z[:, None]], dim=1)
        actions = torch.cat([self.actions, action[:, None].to(self.actions)], dim=1)
        if self.length >= self.window:
            self.reset(latents[:, -(self.window // 2 + 1):], actions[:, -(self.window // 2 + 1):])
            return
        past, signal = self._corrupt(z[:, None])
        self.kv = encode_context(self.dynamics, past, action[:, None].to(self.actions), self.act_mask, signal,
                                 lang_emb=self.lang_emb, kv_cache=self.kv, amp=self.amp)
        self.latents, self.actions = latents, actions


@torch.no_grad()
def sample_next(dynamics: Dynamics, context: torch.Tensor, actions: Optional[torch.Tensor],
                act_mask: Optional[torch.Tensor] = None, *, steps: int = 4, tau_ctx: float = 0.1,
                tau_init: float = 0.0, z_prev: Optional[torch.Tensor] = None,
                lang_emb: Optional[torch.Tensor] = None, kv_cache: bool = True,
                noise: Optional[tuple] = None, generator: Optional[torch.Generator] = None,
                n_seeds: int = 1, amp: str = "none", context_cache: Optional["ContextCache"] = None,
                seed_context_noise: bool = False) -> Sample:
    """Sample the frame after ``context`` for every batch row.

    ``n_seeds`` > 1 samples that many seeds per row (output rows b * n_seeds + n) that share one context
    corruption and, with the KV cache, one context prefill: the seeds differ only in the new frame's
    noise. ``seed_context_noise`` draws the context corruption per seed instead, as the reference does (it
    expands the context rows before sampling): each seed then also sees its own corrupted past, at the cost
    of one context pass per seed. All other tensors are given per row (B, ...). ``amp`` autocasts the
    dynamics on GPU (fp16 / bf16); its outputs are cast back to the latents' dtype.

    context: (B, t, n_spatial, d_spatial) packed latents (t may be 0); actions: (B, t+1, A) led-to, so
    actions[:, t] produces the new frame, or None; act_mask: (B, t+1, A) or (A,); steps: K Euler steps
    (a power of two <= k_max); z_prev: (B, n_spatial, d_spatial) warm-start anchor used when tau_init > 0;
    lang_emb: (B, lang_dim); noise: (noise_z (B, [1,] n_spatial, d_spatial), noise_ctx (B, t, n_spatial,
    d_spatial) or None) to replay recorded draws instead of sampling; context_cache: the keys and values of
    ``context`` kept across steps (:class:`ContextCache`), so the context is not run (nor re-corrupted) again.
    """
    cfg = dynamics.cfg
    if context.dim() != 4 or tuple(context.shape[2:]) != (cfg.n_spatial, cfg.d_spatial):
        raise ValueError(f"context must be (B, t, {cfg.n_spatial}, {cfg.d_spatial}), got {tuple(context.shape)}")
    B, t = context.shape[:2]
    if actions is not None and tuple(actions.shape[:2]) != (B, t + 1):
        raise ValueError(f"actions must be (B, t+1, A) = ({B}, {t + 1}, A) for a context of {t} frames, "
                         f"got {tuple(actions.shape)}")
    N = max(1, int(n_seeds))
    if seed_context_noise and (context_cache is not None or noise is not None):
        raise ValueError("seed_context_noise draws a corrupted context per seed, but a context_cache holds one "
                         "already corrupted and replayed noise is one draw: pass neither with it (to replay "
                         "per-seed draws, expand the rows and use n_seeds=1)")
    if seed_context_noise and N > 1 and tau_ctx > 0.0 and t > 0:
        context, actions, lang_emb, z_prev = (expand_seeds(x, N) for x in (context, actions, lang_emb, z_prev))
        act_mask = act_mask if act_mask is None or act_mask.dim() == 1 else expand_seeds(act_mask, N)
        B, N = B * N, 1  # rows b * N + n, as the shared-context seeds
    sched = shortcut_schedule(steps, cfg.k_max)
    e, dt, emax = sched["e"], sched["dt"], cfg.emax
    if context_cache is not None and (context_cache.length != t or not kv_cache):
        raise ValueError(f"context_cache holds {context_cache.length} frames for a context of {t}; pass its "
                         "own latents (context_cache.latents) as the context, with kv_cache on")
    corrupt = tau_ctx > 0.0 and t > 0 and context_cache is None
    shape = (B * N, 1, cfg.n_spatial, cfg.d_spatial)

    if noise is None:
        z = torch.randn(shape, generator=generator, device=context.device, dtype=context.dtype)
        eps_ctx = (torch.randn(context.shape, generator=generator, device=context.device, dtype=context.dtype)
                   if corrupt else None)
    else:
        z, eps_ctx = noise[0].reshape(shape).to(context), noise[1]
        if corrupt and (eps_ctx is None or eps_ctx.shape != context.shape):
            raise ValueError(f"noise[1] must be the context noise {tuple(context.shape)} when tau_ctx > 0")
    if z_prev is not None and tau_init > 0.0:
        z = (1.0 - tau_init) * z + tau_init * expand_seeds(z_prev, N).reshape(shape)
    past, ctx_sig = corrupt_context(context, eps_ctx if corrupt else None, tau_ctx, cfg.k_max)
    ctx_actions, ctx_mask, ctx_lang = actions, act_mask, lang_emb  # per context row, for the prefill
    if N > 1:
        actions, lang_emb = expand_seeds(actions, N), expand_seeds(lang_emb, N)
        act_mask = act_mask if act_mask is None or act_mask.dim() == 1 else expand_seeds(act_mask, N)

    def frames(x, sl):  # slice per-frame (B, T, A) tensors; None and (A,) masks pass as they are
        return x if x is None or x.dim() == 1 else x[:, sl]

    def idx(n, value, rows=B * N):  # (rows, n) step or signal indices
        return torch.full((rows, n), value, dtype=torch.long, device=context.device)

    def run(*args, **kw):  # the dynamics under autocast, x1_hat back in the latents' dtype
        with autocast_context(amp, context.device):
            out = dynamics(*args, **kw)
        return (out[0].to(context.dtype), *out[1:])

    cache = None
    if kv_cache and t > 0:
        cache = context_cache.kv if context_cache is not None else encode_context(
            dynamics, past, frames(ctx_actions, slice(0, t)), frames(ctx_mask, slice(0, t)), ctx_sig,
            lang_emb=ctx_lang, amp=amp)
        if N > 1:  # cache rows are b * S + token; seeds of row b share its context keys and values
            cache = [None if c is None else tuple(
                x.reshape(B, -1, *x.shape[1:]).repeat_interleave(N, dim=0).flatten(0, 1) for x in c)
                for c in cache]
        new_actions, new_mask = frames(actions, slice(t, t + 1)), frames(act_mask, slice(t, t + 1))
    past = expand_seeds(past, N) if N > 1 else past
    step_idx = torch.cat([idx(t, emax), idx(1, e)], dim=1)

    x1s, zs, executed, h = [], [], [], None
    for i, (tau_i, sig_i) in enumerate(zip(sched["tau"], sched["tau_idx"])):
        if tau_i + dt <= tau_init:  # warm start: this noise level is already below z's
            continue
        if cache is not None:
            x1, h_all = run(new_actions, idx(1, e), idx(1, sig_i), z, act_mask=new_mask,
                                 lang_emb=lang_emb, kv_cache=cache)
        else:
            signal_idx = torch.cat([idx(t, ctx_sig), idx(1, sig_i)], dim=1)
            x1, h_all = run(actions, step_idx, signal_idx, torch.cat([past, z], dim=1), act_mask=act_mask,
                                 lang_emb=lang_emb)
            x1 = x1[:, -1:]
        z = z + (x1 - z) / max(1e-4, 1.0 - tau_i) * dt
        x1s.append(x1[:, 0])
        zs.append(z[:, 0])
        executed.append(i)
        h = None if h_all is None else h_all[:, -1:]
    return Sample(z=z[:, 0], x1_traj=torch.stack(x1s), z_traj=torch.stack(zs), h=h, executed_steps=executed)


@dataclass
class Rollout:
    """An autoregressive rollout of ``horizon`` frames for n_seeds noise seeds per batch row."""
    latents: torch.Tensor  # (B, N, horizon, n_spatial, d_spatial) sampled packed latents
    x1_traj: torch.Tensor  # (B, N, horizon, n_exec, n_spatial, d_spatial) x1_hat per executed Euler step
    frames: Optional[torch.Tensor]  # (B, N, horizon, C, H, W) decoded frames in [0, 1], or None


@torch.no_grad()
def rollout(world_model, context_latents: torch.Tensor, actions: Optional[torch.Tensor], horizon: int, *,
            n_seeds: int = 1, act_mask: Optional[torch.Tensor] = None, lang_emb: Optional[torch.Tensor] = None,
            steps: Optional[int] = None, tau_ctx: Optional[float] = None, tau_init: Optional[float] = None,
            ctx_window: Optional[int] = None, kv_cache: Optional[bool] = None,
            generator: Optional[torch.Generator] = None, decode: bool = True,
            shared_context: bool = False, seed_context_noise: bool = False) -> Rollout:
    """Roll the dynamics forward ``horizon`` frames, each conditioned on the last ``ctx_window`` latents.

    context_latents: (B, t0, n_spatial, d_spatial), t0 >= 1; actions: (B, t0 + horizon, A) led-to
    (actions[:, j] led to frame j) or None; act_mask: (A,) or (B, t0 + horizon, A). Sampler options
    default to ``world_model.config.sampler``; the warm start (tau_init > 0) anchors on the previous
    latent. Each seed is an independent rollout, unless ``shared_context``: then at every step the N seeds
    sample from one shared history (one context pass), which continues with seed 0's sample, so the seeds'
    spread is the one-step uncertainty the reference's scorers measure (u_s), not the divergence of
    independent rollouts. latents[:, 0] is then the followed trajectory. ``seed_context_noise``: see
    :func:`sample_next`.
    """
    sc = world_model.config.sampler
    steps = sc.steps if steps is None else steps
    tau_ctx = sc.tau_ctx if tau_ctx is None else tau_ctx
    tau_init = sc.tau_init if tau_init is None else tau_init
    ctx_window = sc.ctx_window if ctx_window is None else ctx_window
    kv_cache = sc.kv_cache if kv_cache is None else kv_cache
    B, t0 = context_latents.shape[:2]
    if t0 < 1:
        raise ValueError("rollout needs at least one context latent")
    if actions is not None and actions.shape[1] < t0 + horizon:
        raise ValueError(f"actions cover {actions.shape[1]} frames; a rollout of {horizon} after {t0} context "
                         f"frames needs {t0 + horizon}")
    N = n_seeds
    per_step = N if shared_context else 1  # seeds sampled from each history row at every step
    rows = N // per_step  # history rows per batch row
    hist = torch.cat([expand_seeds(context_latents, rows),
                      context_latents.new_zeros(B * rows, horizon, *context_latents.shape[2:])], dim=1)
    acts, mask, lang = expand_seeds(actions, rows), act_mask, expand_seeds(lang_emb, rows)
    if mask is not None and mask.dim() == 3:
        mask = expand_seeds(mask, rows)
    samples, trajs = [], []
    for t in range(t0, t0 + horizon):
        s = max(0, t - ctx_window)
        out = sample_next(world_model.dynamics, hist[:, s:t], None if acts is None else acts[:, s:t + 1],
                          mask if mask is None or mask.dim() == 1 else mask[:, s:t + 1], steps=steps,
                          tau_ctx=tau_ctx, tau_init=tau_init, z_prev=hist[:, t - 1], lang_emb=lang,
                          kv_cache=kv_cache, generator=generator, amp=sc.amp, n_seeds=per_step,
                          seed_context_noise=seed_context_noise)
        hist[:, t] = out.z[::per_step]  # rows b * N + n: each history row follows its first seed
        samples.append(out.z)
        trajs.append(out.x1_traj)
    latents = torch.stack(samples, dim=1)  # (B*N, horizon, S, D)
    # Frames are decoded one at a time (T = 1), as the interactive demo and u_r see them.
    frames = world_model.decode(latents.reshape(-1, 1, *latents.shape[2:])) if decode else None

    def split(x):  # (B*N, ...) -> (B, N, horizon, ...)
        return x.reshape(B, N, horizon, *x.shape[2:])
    x1_traj = torch.stack(trajs, dim=1).permute(2, 1, 0, 3, 4)  # (B*N, horizon, n_exec, S, D)
    return Rollout(latents=split(latents), x1_traj=split(x1_traj),
                   frames=None if frames is None else split(frames.reshape(B * N, horizon, *frames.shape[2:])))
