"""The causal video tokenizer: an MAE-style encoder to a tanh bottleneck and a decoder back to patches.

Per frame, the encoder reads [n_latents learned latent tokens | Np patch tokens] and keeps the latents'
outputs, projected to d_bottleneck and squashed by tanh. The decoder reads [up-projected latents | Np
learned patch queries] and emits sigmoid patch values. Both are causal in time only through the latent
tokens' time attention, so a clip can be encoded jointly (training windows) or frame by frame (T = 1,
interactive use) and frame t depends on frames <= t either way.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mmbench2_lab.config import TokenizerConfig
from mmbench2_lab.model.layers import BlockCausalTransformer, patchify, unpatchify


def encoder_space_mask(n_latents: int, n_patches: int) -> torch.Tensor:
    """(S, S) bool, True = may attend; order [latents | patches]. Latents see everything, patches see
    only patches."""
    S = n_latents + n_patches
    allow = torch.ones(S, S, dtype=torch.bool)
    allow[n_latents:, :n_latents] = False
    return allow


def decoder_space_mask(n_latents: int, n_patches: int) -> torch.Tensor:
    """(S, S) bool, True = may attend; order [latents | patch queries]. Latents see only latents, patch
    queries see everything."""
    S = n_latents + n_patches
    allow = torch.ones(S, S, dtype=torch.bool)
    allow[:n_latents, n_latents:] = False
    return allow


class MAEReplacer(nn.Module):
    """Masked-autoencoder corruption: per frame draw p ~ U(p_min, p_max), replace each patch embedding
    by ``mask_token`` with probability p. Only when asked (training); p_max = 0 is the identity."""

    def __init__(self, d_model: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(d_model) * 0.02)

    def forward(self, x: torch.Tensor, p_min: float = 0.0, p_max: float = 0.0,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, Np, D) -> (x with masked patches replaced, mask (B, T, Np) bool, True = masked)."""
        B, T, Np, _ = x.shape
        if p_max <= 0.0:
            return x, torch.zeros(B, T, Np, dtype=torch.bool, device=x.device)
        p = torch.rand(B, T, 1, generator=generator, device=x.device) * (p_max - p_min) + p_min
        masked = torch.rand(B, T, Np, generator=generator, device=x.device) >= 1.0 - p
        return torch.where(masked[..., None], self.mask_token.to(x.dtype), x), masked


class Encoder(nn.Module):
    """Patches (B, T, Np, Dp) -> latents z (B, T, n_latents, d_bottleneck) in (-1, 1)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_proj = nn.Linear(cfg.patch_dim, cfg.d_model)
        self.bottleneck_proj = nn.Linear(cfg.d_model, cfg.d_bottleneck)
        # Start tanh in its linear range: with the default init the unnormalised residual stream (RMS ~1-2)
        # saturates it, its gradient vanishes and the encoder never learns (z constant, mean-image decoder).
        nn.init.normal_(self.bottleneck_proj.weight, std=0.02)
        nn.init.zeros_(self.bottleneck_proj.bias)
        self.mae = MAEReplacer(cfg.d_model)
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_model) * 0.02)
        self.transformer = BlockCausalTransformer(
            cfg.d_model, cfg.n_heads, cfg.depth, encoder_space_mask(cfg.n_latents, cfg.n_patches),
            time_every=cfg.time_every, n_time_tokens=cfg.n_latents if cfg.latents_only_time else None,
            mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)

    def forward(self, patches: torch.Tensor, mae_p_max: float = 0.0, mae_p_min: float = 0.0,
                generator: Optional[torch.Generator] = None, mae_mask: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """patches: (B, T, Np, Dp) -> (z (B, T, n_latents, d_bottleneck), mae_mask (B, T, Np) bool).

        MAE masking runs only when ``mae_p_max > 0`` (training); mae_mask marks the replaced patches.
        A given ``mae_mask`` (B, T, Np) bool is applied as it is (the trainer draws masks for the global batch).
        """
        B, T, Np, Dp = patches.shape
        if (Np, Dp) != (self.cfg.n_patches, self.cfg.patch_dim):
            raise ValueError(f"encoder expects (B, T, {self.cfg.n_patches}, {self.cfg.patch_dim}) patches, "
                             f"got {tuple(patches.shape)}")
        x = self.patch_proj(patches)
        if mae_mask is None:
            x, mae_mask = self.mae(x, mae_p_min, mae_p_max, generator)
        else:
            x = torch.where(mae_mask[..., None], self.mae.mask_token.to(x.dtype), x)
        lat = self.latents.expand(B, T, -1, -1)
        x = self.transformer(torch.cat([lat, x], dim=2))
        return torch.tanh(self.bottleneck_proj(x[:, :, :self.cfg.n_latents])), mae_mask


class Decoder(nn.Module):
    """Latents (B, T, n_latents, d_bottleneck) -> patch values (B, T, Np, Dp) in (0, 1)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.up_proj = nn.Linear(cfg.d_bottleneck, cfg.d_model)
        self.patch_queries = nn.Parameter(torch.randn(cfg.n_patches, cfg.d_model) * 0.02)
        self.patch_head = nn.Linear(cfg.d_model, cfg.patch_dim)
        self.transformer = BlockCausalTransformer(
            cfg.d_model, cfg.n_heads, cfg.depth, decoder_space_mask(cfg.n_latents, cfg.n_patches),
            time_every=cfg.time_every, n_time_tokens=cfg.n_latents if cfg.latents_only_time else None,
            mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, T, L, Db = z.shape
        if (L, Db) != (self.cfg.n_latents, self.cfg.d_bottleneck):
            raise ValueError(f"decoder expects (B, T, {self.cfg.n_latents}, {self.cfg.d_bottleneck}) latents, "
                             f"got {tuple(z.shape)}")
        queries = self.patch_queries.expand(B, T, -1, -1)
        x = self.transformer(torch.cat([self.up_proj(z), queries], dim=2))
        return torch.sigmoid(self.patch_head(x[:, :, L:]))


class Tokenizer(nn.Module):
    """Frames <-> latents. State-dict keys ``encoder.*`` / ``decoder.*`` match the reference tokenizer."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check_frames(self, frames: torch.Tensor) -> None:
        c = self.cfg
        if frames.dim() != 5 or tuple(frames.shape[2:]) != (c.channels, c.height, c.width):
            raise ValueError(f"expected frames (B, T, {c.channels}, {c.height}, {c.width}) in [0, 1], "
                             f"got {tuple(frames.shape)}")

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, T, C, H, W) float in [0, 1] -> z (B, T, n_latents, d_bottleneck), causal in T."""
        self._check_frames(frames)
        return self.encoder(patchify(frames, self.cfg.patch))[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, T, n_latents, d_bottleneck) -> frames (B, T, C, H, W) in (0, 1)."""
        c = self.cfg
        return unpatchify(self.decoder(z), c.height, c.width, c.channels, c.patch)
