"""How good is a world model on held-out windows: reconstruction, rollout dPSNR, action attribution.

- ``psnr``: 10 log10(1 / MSE) on [0, 1] pixels.
- ``rollout_gain``: open-loop rollout from ground-truth context with ground-truth actions; the gain is
  PSNR(pred, gt) - PSNR(floor, gt) over the horizon, where the floor repeats the last context frame
  (the paper's "scene-divergence threshold" is gain = 0). Reference ``run_dynamics_eval``: 8 + 16 frames,
  one figure per batch from the MSE pooled over its sequences (``RolloutEval.pooled_gain_db``); the
  calibration tables keep one gain per sequence.
- ``action_attribution``: teacher-forced one-step latent MSE (K = 1) with the real actions, actions
  permuted across sequences, permuted in time, and zeroed; the ratios intervention / real say how much
  the model listens to actions (about 1 = "action marginalisation"). Noise is shared across conditions.

Windows follow the dataset convention of ``DynamicsWindows``: obs (B, T+1, C, H, W) uint8, act (B, T, 16)
where act[:, t] is taken at obs[:, t].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmbench2_lab.calibration import CONTEXT_RESIDUAL_COLUMN, MOTION_BASELINE_COLUMN
from mmbench2_lab.flow_matching import led_to_actions
from mmbench2_lab.predictors import PREDICTORS, flow_instability, motion, normalise, round_trip_residual
from mmbench2_lab.sampler import rollout, sample_next


def psnr(mse: torch.Tensor | float) -> torch.Tensor:
    """PSNR in dB of a mean squared error on [0, 1] pixels."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def to_unit(obs: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float in [0, 1] (float input passes through)."""
    return obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.float()


def window_actions(act: torch.Tensor, act_mask: torch.Tensor, n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Led-to actions for the first ``n_frames`` frames of a window: actions[:, j] led to frame j (j >= 1);
    frame 0 gets the zero action and mask."""
    pad = n_frames - act.shape[1]
    if pad > 0:
        act = torch.cat([act, act.new_zeros(act.shape[0], pad, act.shape[2])], dim=1)
        act_mask = torch.cat([act_mask, act_mask.new_zeros(act.shape[0], pad, act.shape[2])], dim=1)
    return led_to_actions(act[:, :n_frames], act_mask[:, :n_frames])


@dataclass
class RolloutEval:
    mse_pred: torch.Tensor  # (B,) over the horizon, averaged over seeds
    mse_floor: torch.Tensor  # (B,) of the repeat-last-frame floor
    pred: torch.Tensor  # (B, N, horizon, C, H, W) decoded predictions in [0, 1]
    truth: torch.Tensor  # (B, horizon, C, H, W)
    latents: torch.Tensor  # (B, N, horizon, S, D) sampled latents
    x1_traj: torch.Tensor  # (B, N, horizon, n_exec, S, D) clean predictions per Euler step
    context: torch.Tensor  # (B, ctx, S, D) encoded context
    shared_context: bool = False  # seeds branch from one history per step (latents[:, 0] is followed)

    @property
    def gain_db(self) -> torch.Tensor:
        """(B,) PSNR(pred) - PSNR(floor) over the horizon, one per sequence."""
        return psnr(self.mse_pred) - psnr(self.mse_floor)

    def pooled_gain_db(self, select: torch.Tensor | list[int] | None = None) -> float:
        """dPSNR of the MSE pooled over (the ``select``-ed) sequences, as the reference's training eval
        logs ``psnr_gain_over_floor_db``: fast-moving sequences weigh by their larger errors, where the
        mean of per-sequence gains weighs a near-static scene's few-pixel error like any other."""
        idx = slice(None) if select is None else select
        return float(psnr(self.mse_pred[idx].mean()) - psnr(self.mse_floor[idx].mean()))


@torch.no_grad()
def rollout_gain(world_model, obs: torch.Tensor, act: torch.Tensor, act_mask: torch.Tensor, *, ctx: int = 8,
                 horizon: int = 16, n_seeds: int = 1, steps: int | None = None, tau_ctx: float | None = None,
                 generator: torch.Generator | None = None, shared_context: bool = False,
                 seed_context_noise: bool = False) -> RolloutEval:
    """Open-loop rollout dPSNR over the repeat-last-frame floor; the gain is averaged over seeds' MSE.

    Seeds are independent rollouts, or with ``shared_context`` N samples per step from one followed
    history (see :func:`~mmbench2_lab.sampler.rollout`), as the reference scores its predictors.

    obs: (B, >= ctx+horizon, C, H, W); act, act_mask: (B, >= ctx+horizon-1, 16) dataset convention.
    The context is encoded jointly (causal), as the trainer sees windows.
    """
    n = ctx + horizon
    if obs.shape[1] < n:
        raise ValueError(f"windows have {obs.shape[1]} frames; ctx {ctx} + horizon {horizon} needs {n}")
    frames = to_unit(obs[:, :n])
    actions, mask = window_actions(act, act_mask, n)
    context = world_model.encode(frames[:, :ctx])
    ro = rollout(world_model, context, actions, horizon, n_seeds=n_seeds, act_mask=mask, steps=steps,
                 tau_ctx=tau_ctx, generator=generator, shared_context=shared_context,
                 seed_context_noise=seed_context_noise)
    truth = frames[:, ctx:]
    mse_pred = ((ro.frames - truth[:, None]) ** 2).flatten(2).mean(-1).mean(1)  # (B,) mean over seeds
    mse_floor = ((frames[:, ctx - 1:ctx] - truth) ** 2).flatten(1).mean(-1)
    return RolloutEval(mse_pred=mse_pred, mse_floor=mse_floor, pred=ro.frames, truth=truth,
                       latents=ro.latents, x1_traj=ro.x1_traj, context=context, shared_context=shared_context)


@torch.no_grad()
def action_attribution(world_model, obs: torch.Tensor, act: torch.Tensor, act_mask: torch.Tensor, *,
                       tau_ctx: float = 0.1, seed: int = 12345, positions: int | None = None
                       ) -> dict[str, torch.Tensor]:
    """Teacher-forced one-step (K = 1) latent MSE per sequence under four action conditions.

    Every frame t = 1..T-1 is predicted from frames < t (the reference); ``positions`` limits that to that
    many evenly spaced t, for cheap evaluations during training.

    Returns per-sequence (B,) tensors ``mse_real``, ``mse_shuffle``, ``mse_timeshuffle``, ``mse_zero`` and
    the pooled ratios ``action_shuffle_ratio``, ``action_timeshuffle_ratio``, ``action_zero_ratio``
    (intervention MSE / real MSE, over the pool). Needs B >= 2 for the cross-sequence shuffle.
    """
    B, n = obs.shape[0], obs.shape[1] - 1
    if B < 2:
        raise ValueError("action_attribution needs at least 2 sequences to shuffle actions across")
    z = world_model.encode(to_unit(obs[:, :n]))
    actions, mask = window_actions(act, act_mask, n)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B, generator=g)
    if (perm == torch.arange(B)).all():
        perm = perm.roll(1)
    tperm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n - 1, generator=g)])
    conditions = {"real": actions, "shuffle": actions[perm], "timeshuffle": actions[:, tperm],
                  "zero": torch.zeros_like(actions)}
    masks = {"real": mask, "shuffle": mask[perm], "timeshuffle": mask[:, tperm], "zero": mask}
    targets = range(1, n) if positions is None else sorted(set(
        torch.linspace(1, n - 1, min(positions, n - 1)).round().long().tolist()))
    out = {}
    for name, a in conditions.items():
        gen = torch.Generator(device=z.device).manual_seed(seed)  # the same noise in every condition
        err = []
        for t in targets:
            s = sample_next(world_model.dynamics, z[:, :t], a[:, :t + 1], masks[name][:, :t + 1], steps=1,
                            tau_ctx=tau_ctx, generator=gen)
            err.append(((s.z - z[:, t]) ** 2).flatten(1).mean(-1))
        out[f"mse_{name}"] = torch.stack(err, 1).mean(1)
    real = out["mse_real"].mean()
    for name in ("shuffle", "timeshuffle", "zero"):
        key = "action_shuffle_ratio" if name == "shuffle" else f"action_{name}_ratio"
        out[key] = out[f"mse_{name}"].mean() / real.clamp_min(1e-12)
    return out


def rollout_predictors(world_model, ro: RolloutEval, motion_ref: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
    """Per-frame predictors of a multi-seed rollout: each (B, horizon).

    As the reference scores a prediction (``URNormScorer``, ``CrossSeedScorer``): u_r on the mean over
    seeds, motion m = RMS(mean_t - z_prev), u_s the variance across seeds, u_f the mean over seeds of each
    step's flow instability; ``*_norm`` = u / max(m, 1e-3). z_prev is the history the step was sampled
    from: the followed seed's previous latent for a ``shared_context`` rollout (the reference's setting:
    u_s is one-step uncertainty), else the previous seed mean (u_s then also grows as independent rollouts
    diverge). The first step's z_prev is the last context latent. ``motion_ref`` (B, horizon) replaces the
    predicted m, e.g. with :func:`true_motion` (then ``motion`` holds it).
    """
    B, N, H = ro.latents.shape[:3]
    mean = ro.latents.mean(1)  # (B, H, S, D)
    followed = ro.latents[:, 0] if ro.shared_context else mean
    prev = torch.cat([ro.context[:, -1:], followed[:, :-1]], dim=1)
    m = motion(mean, prev) if motion_ref is None else motion_ref
    u_s = ro.latents.var(1).mean((-2, -1)) if N >= 2 else torch.zeros(B, H, device=mean.device)
    x1 = ro.x1_traj.permute(3, 0, 1, 2, 4, 5).flatten(1, 3)  # (n_exec, B*N*H, S, D)
    u_f = flow_instability(x1).reshape(B, N, H).mean(1)
    u_r = round_trip_residual(world_model.tokenizer, mean.flatten(0, 1)).reshape(B, H)
    out = {"u_r": u_r, "u_f": u_f, "u_s": u_s, "motion": m}
    out.update({f"{k}_norm": normalise(out[k], m) for k in PREDICTORS})
    return out


@torch.no_grad()
def true_motion(world_model, obs: torch.Tensor, ctx: int, horizon: int) -> torch.Tensor:
    """m_t = RMS(Enc(x_t) - Enc(x_t-1)) of the real frames over the horizon: (B, >= ctx+horizon, C, H, W) ->
    (B, horizon). The frames are encoded jointly (causal), as the rollout's context was. Evaluation only: a
    live rollout has no real next frame."""
    z = world_model.encode(to_unit(obs[:, :ctx + horizon]))
    return motion(z[:, ctx:], z[:, ctx - 1:-1])


# Which m divides the per-sequence predictors of a calibration table. "predicted" is the released code's
# m = RMS(z_hat - z_prev) (the only one a live rollout has). "truth" measures m on the real frames: the
# paper's table has nan in all three predictors on 201 sequences, every one a near-static clip the floor
# repeats almost exactly (dPSNR -65 to -95 dB): a real-frame m is 0 there and leaves u / m undefined; a
# predicted m is never exactly 0. The reference's evaluation code is not released, so this is inferred.
MOTION_REFERENCES = ("predicted", "truth")


@torch.no_grad()
def calibration_table(world_model, windows, *, n_sequences: int | None = None, ctx: int = 8, horizon: int = 16,
                      n_seeds: int = 2, batch_size: int = 16, attribution_positions: int | None = 8,
                      seed: int = 0, progress: bool = True, return_traces: bool = False,
                      shared_context: bool = True, context_residual: bool = False,
                      seed_context_noise: bool = False, motion_ref: str = "predicted",
                      motion_baseline: bool = False):
    """Per-sequence calibration rows, in the columns of the paper's ``calibration_perseq_base.csv``.

    windows: a ``DynamicsWindows`` of seq_len >= ctx + horizon - 1 (typically held-out episodes).
    For each sequence: open-loop rollout dPSNR over the floor (seed-averaged MSE), the mean over the horizon
    of each normalised predictor, and the action-shuffle ratio (one-step MSE with actions permuted across
    the batch / real). By default each step's seeds branch from one followed history (``shared_context``),
    as the reference's scorers draw them; ``shared_context=False`` rolls every seed out on its own.
    ``seed_context_noise`` gives each seed its own context corruption, as the reference's sampler draws it
    (default: one draw for all seeds and one context pass).
    ``motion_ref`` picks the m of the ``*_norm`` columns (see ``MOTION_REFERENCES``); ``motion_baseline``
    adds ``u_const_norm`` (ours): the mean of 1 / max(m, 1e-3), what a constant u scores once normalised, so
    a predictor's rho can be read against what the normaliser alone gives.
    ``n_sequences`` picks that many evenly spaced windows (default: all). With ``return_traces`` also
    returns the per-frame (B, horizon) predictor values of every sequence. ``context_residual`` adds
    ``u_r_context`` (ours, not the paper's): the round-trip residual of the last real context latent, which
    rises on scenes the tokenizer cannot draw even when the model confidently repaints them into familiar,
    on-manifold predictions that the paper's u_r does not flag.
    """
    if motion_ref not in MOTION_REFERENCES:
        raise ValueError(f"motion_ref {motion_ref!r}: expected one of {', '.join(MOTION_REFERENCES)}")
    n_total = len(windows)
    idx = (list(range(n_total)) if n_sequences is None or n_sequences >= n_total else
           torch.linspace(0, n_total - 1, n_sequences).round().long().unique().tolist())
    device = next(world_model.parameters()).device
    rows, traces, per_task = [], [], {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(idx), desc="calibration", unit="seq")
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        if len(chunk) < 2:  # the shuffle needs a partner: borrow the previous window
            chunk = idx[max(0, start - 1):start + 1]
            keep = chunk[-1:]
        else:
            keep = chunk
        items = [windows[i] for i in chunk]
        obs, act, mask = (torch.stack([it[k] for it in items]).to(device) for k in ("obs", "act", "act_mask"))
        g = torch.Generator(device=device).manual_seed(seed + start)
        ro = rollout_gain(world_model, obs, act, mask, ctx=ctx, horizon=horizon, n_seeds=n_seeds, generator=g,
                          shared_context=shared_context, seed_context_noise=seed_context_noise)
        m_ref = true_motion(world_model, obs, ctx, horizon) if motion_ref == "truth" else None
        pred = rollout_predictors(world_model, ro, motion_ref=m_ref)
        if context_residual:
            u_context = round_trip_residual(world_model.tokenizer, ro.context[:, -1])
        if motion_baseline:
            u_const = normalise(torch.ones_like(pred["motion"]), pred["motion"]).mean(1)
        attr = action_attribution(world_model, obs[:, :ctx + horizon], act[:, :ctx + horizon - 1],
                                  mask[:, :ctx + horizon - 1], positions=attribution_positions, seed=seed)
        ratio = attr["mse_shuffle"] / attr["mse_real"].clamp_min(1e-12)
        for j, i in enumerate(chunk):
            if i not in keep:
                continue
            task, _ = windows.locate(i)
            rows.append({"task": task, "seq_idx": per_task.setdefault(task, 0),
                         "action_shuffle_ratio": float(ratio[j]),
                         **{k: float(pred[k][j].mean()) for k in ("u_r_norm", "u_f_norm", "u_s_norm")},
                         "rollout_psnr_gain_db": float(ro.gain_db[j])})
            if context_residual:
                rows[-1][CONTEXT_RESIDUAL_COLUMN] = float(u_context[j])
            if motion_baseline:
                rows[-1][MOTION_BASELINE_COLUMN] = float(u_const[j])
            per_task[task] += 1
            if return_traces:
                traces.append({"task": task, **{k: v[j].tolist() for k, v in pred.items()}})
        if bar is not None:
            bar.update(len(keep))
    if bar is not None:
        bar.close()
    return (rows, traces) if return_traces else rows
