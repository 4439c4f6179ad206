"""Shortcut flow-matching loss for the dynamics (x-prediction, diffusion forcing, bootstrap).

Every (b, t) cell gets its own signal level tau (0 = noise, 1 = clean) on the grid of its step size
d = 2^-e, and the corrupted input z~ = (1 - tau) eps + tau z1. The first B - B_self rows ("empirical")
use the finest step and regress x1_hat onto z1, weighted by w(tau) = 0.9 tau + 0.1. The last B_self rows
("self-consistency") draw coarser steps; once ``step >= bootstrap_start`` their velocity at step d must
match the mean velocity of two half steps d/2 taken by the model itself (shortcut models, Frans et al.).
Optional reward and BC head losses are added, each divided by a running RMS (EmaRms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mmbench2_lab.model.dynamics import Dynamics
from mmbench2_lab.model.heads import PolicyHead, RewardHead, bc_loss, reward_loss
from mmbench2_lab.training.engine import EmaRms


def led_to_actions(act: torch.Tensor, act_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset actions (act[:, t] taken AT frame t) -> the dynamics' led-to convention.

    act, act_mask: (B, T, A) -> actions (B, T, A) with actions[:, t] = clamp(act[:, t-1], -1, 1) *
    mask[:, t-1] and actions[:, 0] = 0, and the mask shifted the same way (mask[:, 0] = 0).
    """
    act = act.clamp(-1, 1) * act_mask
    actions, mask = torch.zeros_like(act), torch.zeros_like(act_mask)
    actions[:, 1:], mask[:, 1:] = act[:, :-1], act_mask[:, :-1]
    return actions, mask


@dataclass
class LossDraws:
    """The loss's random draws, in the order they are made (inject them to replay a reference call)."""
    step_idx_self: torch.Tensor  # (B_self, T) long in [0, emax): step index of the self-consistency rows
    u: torch.Tensor  # (B, T) float in [0, 1): picks the grid point j = floor(u 2^e), tau = j / 2^e
    z0: torch.Tensor  # (B, T, S, D) noise eps


def draw(z1: torch.Tensor, b_self: int, k_max: int, generator: Optional[torch.Generator] = None) -> LossDraws:
    """Fresh draws for :func:`dynamics_pretrain_loss` from ``generator`` (or the global RNG)."""
    B, T = z1.shape[:2]
    emax = k_max.bit_length() - 1
    step_idx_self = (torch.randint(0, max(1, emax), (b_self, T), generator=generator, device=z1.device)
                     if b_self > 0 else torch.zeros(0, T, dtype=torch.long, device=z1.device))
    u = torch.rand((B, T), generator=generator, device=z1.device)
    z0 = torch.randn(z1.shape, generator=generator, device=z1.device, dtype=z1.dtype)
    return LossDraws(step_idx_self, u, z0)


def dynamics_pretrain_loss(dynamics: Dynamics, z1: torch.Tensor, actions: Optional[torch.Tensor],
                           act_mask: Optional[torch.Tensor], *, b_self: int, step: int, bootstrap_start: int,
                           lang_emb: Optional[torch.Tensor] = None, reward_head: Optional[RewardHead] = None,
                           rewards: Optional[torch.Tensor] = None, reward_weight: float = 0.0,
                           policy_head: Optional[PolicyHead] = None, bc_weight: float = 0.0,
                           rms_flow: Optional[EmaRms] = None, rms_rew: Optional[EmaRms] = None,
                           rms_bc: Optional[EmaRms] = None, draws: Optional[LossDraws] = None,
                           generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
    """The dynamics training loss on clean packed latents z1 (B, T, S, D).

    actions, act_mask: (B, T, A) led-to (see :func:`led_to_actions`); rewards: (B, T) dataset rewards.
    The last ``b_self`` rows are the self-consistency rows (0 <= b_self < B). Returns (loss, aux) with
    aux keys flow_mse, flow_per_sample, bootstrap_mse, loss_emp, loss_self, sigma_mean, sigma_std,
    loss_rew, loss_bc, loss_flow, rms_flow, rms_rew, rms_bc.
    """
    B, T = z1.shape[:2]
    if not 0 <= b_self < B:
        raise ValueError(f"b_self must be in [0, B) = [0, {B}), got {b_self}")
    k_max, emax = dynamics.cfg.k_max, dynamics.cfg.emax
    b_emp = B - b_self
    draws = draw(z1, b_self, k_max, generator) if draws is None else draws

    step_idx = torch.cat([torch.full((b_emp, T), emax, dtype=torch.long, device=z1.device),
                          draws.step_idx_self.to(z1.device)], dim=0)  # (B, T)
    n_grid = 1 << step_idx  # 2^e grid points
    j = torch.floor(draws.u * n_grid.float()).long()
    tau = j.float() / n_grid.float()  # (B, T)
    signal_idx = j * (k_max // n_grid)
    z_tilde = (1.0 - tau)[..., None, None] * draws.z0 + tau[..., None, None] * z1
    weight = 0.9 * tau + 0.1

    x1_hat, h = dynamics(actions, step_idx, signal_idx, z_tilde, act_mask=act_mask, lang_emb=lang_emb)
    flow_per = (x1_hat[:b_emp].float() - z1[:b_emp].float()).pow(2).mean(dim=(2, 3))  # (B_emp, T)
    loss_emp = (flow_per * weight[:b_emp]).mean()

    def one_minus(x):  # (B_self, T) -> 1 - x, kept away from 0, broadcastable over (S, D)
        return (1.0 - x).clamp_min(1e-6)[..., None, None]

    zero = z1.new_zeros((), dtype=torch.float32)
    loss_self, boot_mse = zero, zero
    if b_self > 0 and step >= bootstrap_start:
        sl = slice(b_emp, B)
        tau_s, zt = tau[sl], z_tilde[sl].float()
        d_half = 0.5 / (1 << step_idx[sl]).float()
        sig_plus = (signal_idx[sl] + (k_max * d_half).long()).clamp(0, k_max)
        a_s = None if actions is None else actions[sl]
        m_s = act_mask if act_mask is None or act_mask.dim() == 1 else act_mask[sl]
        l_s = None if lang_emb is None else lang_emb[sl]
        with torch.no_grad():  # two half steps with the model itself give the target velocity
            x1_a, _ = dynamics(a_s, step_idx[sl] + 1, signal_idx[sl], z_tilde[sl], act_mask=m_s, lang_emb=l_s)
            v_a = (x1_a.float() - zt) / one_minus(tau_s)
            z_mid = zt + v_a * d_half[..., None, None]
            x1_b, _ = dynamics(a_s, step_idx[sl] + 1, sig_plus, z_mid.to(z_tilde.dtype), act_mask=m_s, lang_emb=l_s)
            v_b = (x1_b.float() - z_mid) / one_minus(tau_s + d_half)
        v_hat = (x1_hat[sl].float() - zt) / one_minus(tau_s)
        boot = (1.0 - tau_s).pow(2) * (v_hat - (v_a + v_b) / 2.0).pow(2).mean(dim=(2, 3))  # (B_self, T)
        loss_self, boot_mse = (boot * weight[sl]).mean(), boot.mean()
    loss_flow = (loss_emp * b_emp + loss_self * b_self) / B

    loss_rew, loss_bc = zero, zero
    if reward_head is not None and rewards is not None and reward_weight > 0.0:
        if h is None:
            raise ValueError("reward loss needs agent tokens: build the dynamics with n_agent >= 1")
        loss_rew = reward_loss(reward_head, h, rewards)
    if policy_head is not None and bc_weight > 0.0 and actions is not None and act_mask is not None:
        if h is None:
            raise ValueError("BC loss needs agent tokens: build the dynamics with n_agent >= 1")
        loss_bc = bc_loss(policy_head, h, actions, act_mask)

    def normed(loss, rms, only_positive):
        if rms is None or (only_positive and float(loss.detach()) <= 0.0):
            return loss
        rms.update(loss)
        return rms.normalize(loss)
    loss = (normed(loss_flow, rms_flow, False) + reward_weight * normed(loss_rew, rms_rew, True)
            + bc_weight * normed(loss_bc, rms_bc, True))
    aux = {"flow_mse": flow_per.mean().detach(), "flow_per_sample": flow_per.mean(dim=1).detach(),
           "bootstrap_mse": boot_mse.detach(), "loss_emp": loss_emp.detach(), "loss_self": loss_self.detach(),
           "sigma_mean": tau.mean().detach(), "sigma_std": tau.std().detach(), "loss_rew": loss_rew.detach(),
           "loss_bc": loss_bc.detach(), "loss_flow": loss_flow.detach(),
           **{f"rms_{k}": (r.rms if r is not None else 1.0)
              for k, r in (("flow", rms_flow), ("rew", rms_rew), ("bc", rms_bc))}}
    return loss, aux
