"""The dynamics: a block-causal transformer over packed latents that predicts clean latents (x-prediction).

Tokens per frame, in order: [action | shortcut | n_spatial spatial | n_register registers | n_agent
agents]. The shortcut token concatenates embeddings of the signal level tau = signal_idx / k_max
(0 = pure noise, 1 = clean) and of the step size d = 2^-step_idx. Agent tokens read every token but
nothing reads them, so the latent prediction depends only on actions and latents; language enters only
through the agent tokens, for the reward and BC heads.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbench2_lab.config import DynamicsConfig
from mmbench2_lab.model.layers import BlockCausalTransformer


def dynamics_space_mask(n_tokens: int, n_agent: int) -> torch.Tensor:
    """(S, S) bool, True = may attend. Agent tokens (the last n_agent) attend to all tokens; the others
    attend to every non-agent token of their frame."""
    allow = torch.ones(n_tokens, n_tokens, dtype=torch.bool)
    if n_agent:
        allow[:-n_agent, -n_agent:] = False
    return allow


class ActionEncoder(nn.Module):
    """Actions (B, T, A) -> one token (B, T, 1, D): fc2(silu(fc1(clamp(a * mask, -1, 1)))) + base.

    Without actions the token is ``base`` alone.
    """

    def __init__(self, d_model: int, action_dim: int = 16, hidden_mult: float = 2.0):
        super().__init__()
        self.action_dim = action_dim
        self.base = nn.Parameter(torch.randn(d_model) * 0.02)
        self.fc1 = nn.Linear(action_dim, int(d_model * hidden_mult))
        self.fc2 = nn.Linear(int(d_model * hidden_mult), d_model)
        nn.init.normal_(self.fc2.weight, std=1e-3)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, actions: Optional[torch.Tensor], act_mask: Optional[torch.Tensor], B: int,
                T: int) -> torch.Tensor:
        if actions is None:
            return self.base.view(1, 1, 1, -1).expand(B, T, 1, -1)
        if actions.shape != (B, T, self.action_dim):
            raise ValueError(f"actions must be (B, T, {self.action_dim}) = {(B, T, self.action_dim)}, "
                             f"got {tuple(actions.shape)}")
        x = actions if act_mask is None else actions * act_mask
        return (self.fc2(F.silu(self.fc1(x.clamp(-1, 1)))) + self.base)[:, :, None]


class Dynamics(nn.Module):
    """Packed noisy latents + actions + shortcut indices -> x1_hat (predicted clean latents) and h_t."""

    def __init__(self, cfg: DynamicsConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        if D % 2:
            raise ValueError(f"dynamics d_model must be even (shortcut token halves), got {D}")
        self.n_spatial, self.d_spatial = cfg.n_spatial, cfg.d_spatial
        if cfg.n_agent > 0 and cfg.lang_dim > 0:
            self.task_proj = nn.Linear(cfg.lang_dim, cfg.n_agent * D)
            nn.init.normal_(self.task_proj.weight, std=0.02)
            nn.init.zeros_(self.task_proj.bias)
        else:
            self.task_proj = None
        self.spatial_proj = nn.Linear(cfg.d_spatial, D)
        self.register_tokens = nn.Parameter(torch.randn(cfg.n_register, D) * 0.02)
        self.action_encoder = ActionEncoder(D, cfg.action_dim)
        self.step_embed = nn.Embedding(cfg.emax + 1, D // 2)
        self.signal_embed = nn.Embedding(cfg.k_max + 1, D // 2)
        self.n_tokens = 2 + cfg.n_spatial + cfg.n_register + cfg.n_agent
        self.transformer = BlockCausalTransformer(
            D, cfg.n_heads, cfg.depth, dynamics_space_mask(self.n_tokens, cfg.n_agent),
            time_every=cfg.time_every, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
        self.flow_x_head = nn.Linear(D, cfg.d_spatial)
        nn.init.zeros_(self.flow_x_head.weight)
        nn.init.zeros_(self.flow_x_head.bias)

    def tokens(self, actions, step_idx, signal_idx, latents, act_mask=None, lang_emb=None) -> torch.Tensor:
        """The (B, T, S, D) token tensor entering the transformer (arguments as in :meth:`forward`)."""
        cfg = self.cfg
        if latents.dim() != 4 or tuple(latents.shape[2:]) != (cfg.n_spatial, cfg.d_spatial):
            raise ValueError(f"latents must be packed (B, T, {cfg.n_spatial}, {cfg.d_spatial}), "
                             f"got {tuple(latents.shape)}")
        B, T = latents.shape[:2]
        for name, idx in (("step_idx", step_idx), ("signal_idx", signal_idx)):
            if tuple(idx.shape) != (B, T):
                raise ValueError(f"{name} must be (B, T) = {(B, T)}, got {tuple(idx.shape)}")
        if act_mask is not None and act_mask.dim() == 1:
            act_mask = act_mask.view(1, 1, -1)
        shortcut = torch.cat([self.signal_embed(signal_idx.long()), self.step_embed(step_idx.long())], dim=-1)
        toks = [self.action_encoder(actions, act_mask, B, T), shortcut[:, :, None], self.spatial_proj(latents),
                self.register_tokens.expand(B, T, -1, -1)]
        if cfg.n_agent:
            if self.task_proj is not None and lang_emb is not None:
                agent = self.task_proj(lang_emb.to(latents.dtype)).view(B, 1, cfg.n_agent, -1).expand(B, T, -1, -1)
            else:
                agent = latents.new_zeros(B, T, cfg.n_agent, cfg.d_model)
            toks.append(agent)
        return torch.cat(toks, dim=2)

    def forward(self, actions: Optional[torch.Tensor], step_idx: torch.Tensor, signal_idx: torch.Tensor,
                latents: torch.Tensor, act_mask: Optional[torch.Tensor] = None,
                lang_emb: Optional[torch.Tensor] = None, kv_cache: Optional[list] = None,
                return_kv_cache: bool = False):
        """Predict clean latents for every frame.

        actions: (B, T, A) led-to convention (actions[:, t] led to frame t) or None; act_mask: (B, T, A)
        or (A,) per-dimension validity; step_idx, signal_idx: (B, T) long; latents: (B, T, n_spatial,
        d_spatial) noisy packed latents; lang_emb: (B, lang_dim) feeds the agent tokens.
        With ``kv_cache`` (from ``return_kv_cache``) these T frames follow the cached frames in time.
        Returns x1_hat (B, T, n_spatial, d_spatial), h (B, T, n_agent, D) or None[, cache].
        """
        x = self.tokens(actions, step_idx, signal_idx, latents, act_mask, lang_emb)
        out = self.transformer(x, kv_cache=kv_cache, return_kv_cache=return_kv_cache)
        x, cache = out if return_kv_cache else (out, None)
        x1_hat = self.flow_x_head(x[:, :, 2:2 + self.cfg.n_spatial])
        h = x[:, :, self.n_tokens - self.cfg.n_agent:] if self.cfg.n_agent else None
        return (x1_hat, h, cache) if return_kv_cache else (x1_hat, h)

