"""The paper's hallucination predictors: scalars per predicted frame, computed from the world model alone.

- u_r, tokenizer round-trip residual ("perceptual"): how far a predicted latent is from what the tokenizer
  produces for the frame it decodes to, i.e. how far off the tokenizer's manifold it lies.
- u_f, flow instability ("action-marginalised"): how much the clean prediction x1_hat still moves in the
  late Euler steps.
- u_s, inter-seed denoising variance ("scene-diverging"): disagreement between predictions from
  different noise seeds.
- m, motion: the size of the predicted step; the normalised predictors are u / max(m, 1e-3).

All latents are packed: (..., n_spatial, d_spatial); RMS is over those two axes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mmbench2_lab.model.layers import pack_latents, patchify, unpack_latents
from mmbench2_lab.model.tokenizer import Tokenizer

MOTION_EPS = 1e-3


def _rms(x: torch.Tensor) -> torch.Tensor:
    """RMS over the last two axes (n_spatial, d_spatial)."""
    return x.float().pow(2).mean(dim=(-2, -1)).sqrt()


def motion(z: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
    """m = RMS(z_hat - z_prev): (B, S, D), (B, S, D) -> (B,). z_prev is the last context latent."""
    return _rms(z - z_prev)


def round_trip(tokenizer: Tokenizer, z: torch.Tensor) -> torch.Tensor:
    """pack(Enc(patchify(clamp01(Dec(unpack(z)))))) for each frame alone (T = 1): (B, S, D) -> (B, S, D)."""
    c = tokenizer.cfg
    pf = z.shape[-1] // c.d_bottleneck
    if z.dim() != 3 or pf * c.d_bottleneck != z.shape[-1] or pf * z.shape[-2] != c.n_latents:
        raise ValueError(f"expected packed latents (B, n_spatial, d_spatial) for a tokenizer with {c.n_latents} "
                         f"latents of width {c.d_bottleneck}, got {tuple(z.shape)}")
    return reencode(tokenizer, tokenizer.decode(unpack_latents(z[:, None], pf))[:, 0].clamp(0, 1), pf)


def reencode(tokenizer: Tokenizer, frames: torch.Tensor, packing_factor: int) -> torch.Tensor:
    """Encode frames (B, C, H, W) in [0, 1] one by one (T = 1) to packed latents (B, S, D)."""
    return pack_latents(tokenizer.encoder(patchify(frames[:, None], tokenizer.cfg.patch))[0], packing_factor)[:, 0]


@torch.no_grad()
def round_trip_residual(tokenizer: Tokenizer, z_packed: torch.Tensor) -> torch.Tensor:
    """u_r = RMS(z_hat - round_trip(z_hat)): (B, S, D) -> (B,).

    For several seeds the paper scores their mean latent (average over seeds first).
    """
    return _rms(z_packed - round_trip(tokenizer, z_packed))


def flow_deltas(x1_traj: torch.Tensor, *, batch_rms: bool = False) -> torch.Tensor:
    """delta_i = RMS(x1_hat^(i) - x1_hat^(i-1)): (n_exec, B, S, D) -> (n_exec - 1, B), or (n_exec - 1,)
    with ``batch_rms`` (RMS over the whole batch tensor, as the reference's interactive sampler)."""
    diff = (x1_traj[1:] - x1_traj[:-1]).float()
    return diff.pow(2).mean(dim=(1, 2, 3)).sqrt() if batch_rms else _rms(diff)


def flow_instability(x1_traj: torch.Tensor, *, batch_rms: bool = False) -> torch.Tensor:
    """u_f = mean of the tail half deltas[len//2:] of :func:`flow_deltas` over the executed Euler steps.

    x1_traj: (n_exec, B, S, D) -> (B,); 0 with fewer than two steps. Only late-step flux counts: early
    (high-noise) steps are always uncertain. ``batch_rms=True`` reproduces the reference's interactive
    sampler (one scalar for the batch); per-row values equal what it returns for B = 1.
    """
    if x1_traj.shape[0] < 2:
        return x1_traj.new_zeros(() if batch_rms else x1_traj.shape[1])
    deltas = flow_deltas(x1_traj, batch_rms=batch_rms)
    return deltas[len(deltas) // 2:].mean(dim=0)


def seed_variance(preds: torch.Tensor) -> torch.Tensor:
    """u_s = mean over (S, D) of the unbiased variance across N seeds: (B, N, S, D) -> (B,)."""
    if preds.dim() != 4 or preds.shape[1] < 2:
        raise ValueError(f"seed_variance needs predictions (B, N >= 2, S, D), got {tuple(preds.shape)}")
    return preds.float().var(dim=1).mean(dim=(-2, -1))


def normalise(u: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """u^norm = u / max(m, 1e-3): predictors per unit of predicted motion."""
    return u / motion.clamp(min=MOTION_EPS)


# -- all three at once, from one batched sampling pass -------------------------------------------------
PREDICTORS = ("u_r", "u_f", "u_s")


@dataclass
class StepPrediction:
    """The next frame of B rollouts with the three predictors (and, if asked, their pixel maps).

    Seeds are sampled as one batch of B * N rows sharing one context pass; the displayed sample is seed 0. u_f is the mean over
    seeds of each seed's flow instability; u_s the variance across seeds; u_r the round-trip residual of
    the displayed sample (re-using its decoded frame, as the reference demo does); motion m is
    RMS(mean over seeds - z_prev) and every ``*_norm`` is u / max(m, 1e-3) (the paper's site defines the
    normalisation for all three; the released code has it for u_r only).
    """
    z: torch.Tensor  # (B, S, D) displayed sample (seed 0)
    seeds: torch.Tensor  # (B, N, S, D) every seed's sample
    frame: torch.Tensor  # (B, C, H, W) decoded displayed sample in [0, 1]
    values: dict  # name -> (B,) for u_r, u_f, u_s, motion, u_r_norm, u_f_norm, u_s_norm
    maps: dict  # name -> (B, H, W) pixel maps (empty unless requested)
    h: Optional[torch.Tensor]  # (B, 1, n_agent, D) agent states of seed 0, or None


@torch.no_grad()
def predict_next(world_model, context: torch.Tensor, actions: Optional[torch.Tensor],
                 act_mask: Optional[torch.Tensor] = None, *, n_seeds: int = 2, steps: Optional[int] = None,
                 tau_ctx: Optional[float] = None, tau_init: Optional[float] = None,
                 z_prev: Optional[torch.Tensor] = None, lang_emb: Optional[torch.Tensor] = None,
                 kv_cache: Optional[bool] = None, generator: Optional[torch.Generator] = None,
                 maps: bool = False, context_cache=None) -> StepPrediction:
    """Sample the next frame for each of B contexts with ``n_seeds`` seeds and score it.

    context: (B, t, S, D) packed latents; actions: (B, t+1, A) led-to; act_mask: (A,) or (B, t+1, A);
    z_prev: the warm-start anchor and motion reference (default: the last context latent).
    ``maps=True`` adds pixel maps (B, H, W): ``u_r`` |frame - Dec(round trip)|, ``u_s`` the variance of
    the decoded seeds, ``u_f`` |Dec(x1_hat last step) - Dec(x1_hat previous step)| (ours; the reference
    has scalars only). All decodes of a step run as one batch. ``context_cache``: see ``sample_next``.
    """
    from mmbench2_lab.sampler import sample_next

    sc = world_model.config.sampler
    B, t = context.shape[:2]
    N = max(1, int(n_seeds))
    z_prev = context[:, -1] if z_prev is None else z_prev
    s = sample_next(world_model.dynamics, context, actions, act_mask,
                    steps=sc.steps if steps is None else steps, tau_ctx=sc.tau_ctx if tau_ctx is None else tau_ctx,
                    tau_init=sc.tau_init if tau_init is None else tau_init, z_prev=z_prev, lang_emb=lang_emb,
                    kv_cache=sc.kv_cache if kv_cache is None else kv_cache, generator=generator, n_seeds=N,
                    amp=sc.amp, context_cache=context_cache)
    seeds = s.z.reshape(B, N, *s.z.shape[1:])
    z = seeds[:, 0]
    # One decode for everything that needs pixels: displayed sample, other seeds and the late x1_hat.
    to_decode = [z]
    if maps:
        to_decode += [seeds[:, n] for n in range(1, N)]
        if s.x1_traj.shape[0] >= 2:
            to_decode += [s.x1_traj[-1].reshape(B, N, *z.shape[1:])[:, 0], s.x1_traj[-2].reshape(B, N, *z.shape[1:])[:, 0]]
    frames = world_model.decode(torch.cat(to_decode)[:, None])[:, 0]  # (k*B, C, H, W)
    frame = frames[:B]
    # u_r: re-encode the displayed frame (T = 1) and compare in packed latent space.
    recon = reencode(world_model.tokenizer, frame, world_model.packing_factor)
    u_r = _rms(z - recon)
    x1 = s.x1_traj.reshape(s.x1_traj.shape[0], B, N, *z.shape[1:])
    u_f = flow_instability(x1.flatten(1, 2)).reshape(B, N).mean(1)
    u_s = seed_variance(seeds) if N >= 2 else torch.zeros(B, device=z.device)
    m = motion(seeds.mean(1), z_prev)
    values = {"u_r": u_r, "u_f": u_f, "u_s": u_s, "motion": m}
    values.update({f"{k}_norm": normalise(values[k], m) for k in PREDICTORS})
    out_maps = {}
    if maps:
        out_maps["u_r"] = (frame - world_model.decode(recon[:, None])[:, 0]).abs().mean(1)
        seed_frames = torch.stack([frame] + [frames[B * n:B * (n + 1)] for n in range(1, N)], dim=1)
        out_maps["u_s"] = seed_frames.var(dim=1).mean(1) if N >= 2 else torch.zeros_like(frame[:, 0])
        if s.x1_traj.shape[0] >= 2:
            late, prev = frames[B * N:B * (N + 1)], frames[B * (N + 1):B * (N + 2)]
            out_maps["u_f"] = (late - prev).abs().mean(1)
        else:
            out_maps["u_f"] = torch.zeros_like(frame[:, 0])
    h = None if s.h is None else s.h.reshape(B, N, *s.h.shape[1:])[:, 0]
    return StepPrediction(z=z, seeds=seeds, frame=frame, values=values, maps=out_maps, h=h)
