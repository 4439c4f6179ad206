"""Reward and behaviour-cloning heads over the dynamics' agent tokens h_t, and their targets.

Both heads pool the n_agent agent tokens (a learned query by default), run the gated MLP ``projector``
and predict L future steps at once (multi-token prediction). Rewards are two-hot distributions over
bins in symlog space; BC predicts tanh-squashed action means. Key names match the reference
(``pool_query``, ``pool_kv``, ``projector.*``, ``out.*``, ``centers_log``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbench2_lab.model.layers import MLP


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log(1 + |x|)."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(y: torch.Tensor) -> torch.Tensor:
    """sign(y) * (exp(|y|) - 1), the inverse of symlog."""
    return torch.sign(y) * torch.expm1(y.abs())


def twohot(y: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Symlog-space targets (...,) -> (..., K) two-hot weights on the increasing bin centres (K,).

    Targets outside the range are clamped to the end bins; inside, the weight is split linearly
    between the two neighbouring centres.
    """
    K = centers.numel()
    y = y.clamp(centers[0], centers[-1]).unsqueeze(-1)
    hi_idx = torch.searchsorted(centers, y).clamp(1, K - 1)
    lo, hi = centers[hi_idx - 1].to(y.dtype), centers[hi_idx].to(y.dtype)
    w_hi = (y - lo) / (hi - lo).clamp_min(1e-8)
    out = torch.zeros(*y.shape[:-1], K, dtype=y.dtype, device=y.device)
    out.scatter_(-1, hi_idx, w_hi)
    out.scatter_(-1, hi_idx - 1, 1.0 - w_hi)
    return out


class _AgentHead(nn.Module):
    """Pool agent tokens (B, T, n_agent, D) -> (B, T, D), then the projector MLP."""

    def __init__(self, d_model: int, mlp_ratio: float, dropout: float, pool_agent: str):
        super().__init__()
        if pool_agent not in ("attn", "mean", "first"):
            raise ValueError(f"pool_agent must be attn, mean or first, got {pool_agent!r}")
        self.pool_agent = pool_agent
        if pool_agent == "attn":
            self.pool_query = nn.Parameter(torch.randn(d_model) * 0.02)
            self.pool_kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.projector = MLP(d_model, mlp_ratio, dropout)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, T, n_agent, D) or (B, T, D) -> (B, T, D)."""
        if h.dim() == 4:
            if self.pool_agent == "first":
                h = h[:, :, 0]
            elif self.pool_agent == "mean":
                h = h.mean(dim=2)
            else:
                k, v = self.pool_kv(h).chunk(2, dim=-1)
                scores = (k * self.pool_query.to(k.dtype)).sum(-1) / math.sqrt(h.shape[-1])  # (B, T, n_agent)
                h = (scores.softmax(dim=-1).unsqueeze(-1) * v).sum(dim=2)
        return self.projector(h)


class RewardHead(_AgentHead):
    """h_t -> reward logits (B, T, L, num_bins); head l at slot t predicts the reward of entering t + l."""

    def __init__(self, d_model: int, L: int = 8, num_bins: int = 255, mlp_ratio: float = 2.0,
                 dropout: float = 0.0, log_low: float = -10.0, log_high: float = 10.0,
                 pool_agent: str = "attn"):
        super().__init__(d_model, mlp_ratio, dropout, pool_agent)
        self.L, self.num_bins = L, num_bins
        self.out = nn.Linear(d_model, L * num_bins)
        centers = torch.linspace(log_low, log_high, num_bins)
        self.register_buffer("centers_log", centers, persistent=True)
        with torch.no_grad():  # start every step's distribution on the bin nearest zero reward
            bias = torch.full((L, num_bins), -5.0)
            bias[:, int(centers.abs().argmin())] = 5.0
            self.out.bias.copy_(bias.view(-1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.features(h)
        return self.out(x).view(*x.shape[:2], self.L, self.num_bins)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., L, K) -> reward (...,) of head l = 0: symexp of the expected symlog value."""
        probs = logits[..., 0, :].float().softmax(dim=-1)
        return symexp((probs * self.centers_log.float()).sum(dim=-1))


class PolicyHead(_AgentHead):
    """h_t -> action means (B, T, L, act_dim) in [-1, 1]; head l at slot t predicts actions[t + 1 + l]."""

    def __init__(self, d_model: int, L: int = 8, act_dim: int = 16, mlp_ratio: float = 2.0,
                 dropout: float = 0.0, pool_agent: str = "attn"):
        super().__init__(d_model, mlp_ratio, dropout, pool_agent)
        self.L, self.act_dim = L, act_dim
        self.out = nn.Linear(d_model, L * act_dim)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.features(h)
        return torch.tanh(self.out(x).view(*x.shape[:2], self.L, self.act_dim))


# -- training targets ---------------------------------------------------------------------------
def _future_index(T: int, L: int, shift: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, L) index t + shift + l clamped into range, and whether it lies inside the window."""
    idx = torch.arange(T, device=device)[:, None] + shift + torch.arange(L, device=device)[None, :]
    return idx.clamp(max=T - 1), idx < T


def reward_loss(head: RewardHead, h: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Two-hot cross-entropy of the reward head on agent states h (B, T, n_agent, D).

    ``rewards`` (B, T) is the dataset convention (rew[t] = reward for the step from frame t); the reward
    of *entering* frame t is rew[t - 1], so targets shift by one and slot t = 0 has none.
    """
    logits = head(h).float()  # (B, T, L, K)
    B, T, L, K = logits.shape
    entering = F.pad(rewards[:, :-1].float(), (1, 0))
    idx, valid = _future_index(T, L, 0, rewards.device)
    valid = valid & (idx > 0)
    with torch.no_grad():
        target = twohot(symlog(entering[:, idx]), head.centers_log)  # (B, T, L, K)
    ce = -(target * logits.log_softmax(dim=-1)).sum(-1)
    m = valid.expand(B, T, L).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def bc_loss(head: PolicyHead, h: torch.Tensor, actions: torch.Tensor, act_mask: torch.Tensor) -> torch.Tensor:
    """Masked MSE of the BC head on detached agent states (BC never updates the dynamics).

    actions, act_mask: (B, T, A) in the led-to convention, so the next action from slot t is
    actions[t + 1]; head l targets actions[t + 1 + l], masked per dimension and where out of the window.
    """
    pred = head(h.detach()).float()  # (B, T, L, A)
    B, T, L, A = pred.shape
    idx, valid = _future_index(T, L, 1, actions.device)
    target = actions[:, idx].float()  # (B, T, L, A)
    mask = act_mask[:, idx].float() * valid[None, :, :, None]
    return ((pred - target).pow(2) * mask).sum() / mask.sum().clamp_min(1.0)


def build_heads(cfg) -> tuple[Optional[RewardHead], Optional[PolicyHead]]:
    """The heads a DynamicsConfig asks for (``reward_head`` / ``bc_head`` flags), else None."""
    reward = (RewardHead(cfg.d_model, cfg.reward_L, cfg.reward_num_bins, cfg.reward_mlp_ratio, cfg.dropout,
                         cfg.reward_log_low, cfg.reward_log_high, cfg.reward_pool_agent)
              if cfg.reward_head else None)
    policy = (PolicyHead(cfg.d_model, cfg.bc_L, cfg.bc_act_dim, cfg.bc_mlp_ratio, cfg.dropout,
                         cfg.bc_pool_agent) if cfg.bc_head else None)
    return reward, policy
