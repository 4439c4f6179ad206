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
    frames = tokenizer.decode(unpack_latents(z[:, None], pf)).clamp(0, 1)
    return pack_latents(tokenizer.encoder(patchify(frames, c.patch))[0], pf)[:, 0]


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
