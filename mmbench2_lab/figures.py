"""The paper's three failure modes made visible: the small computations behind each picture, and the picture.

- Perceptual (u_r): a real frame next to its tokenizer round trip Dec(Enc(x)). Frames unlike the training
  data come back blurred or wrong, and their latent is far from the tokenizer's manifold (high u_r).
  ``real_round_trip`` -> ``round_trip_figure``.
- Action marginalisation (u_f): one context rolled out under several action sequences with the same noise.
  A model that ignores its actions draws (nearly) the same future for all of them.
  ``action_sequences`` (+ ``recorded_actions``) + ``action_sweep`` -> ``action_sweep_figure``.
- Scene divergence (u_s): over an open-loop rollout the predictors climb past the paper's thresholds
  while the per-frame ΔPSNR over the repeat-last-frame floor falls below 0 dB.
  ``rollout_trace`` -> ``calibration.per_frame_trace_figure`` + ``gain_figure`` + ``plots.frame_grid``;
  one step's pixel maps: ``step_maps`` -> ``maps_figure``.

Windows are ``DynamicsWindows`` items: {"obs": (T+1, C, H, W) uint8, "act": (T, 16), "act_mask": (T, 16)}.
Figures are ``plotly.graph_objects.Figure``; frame grids come from ``mmbench2_lab.plots``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from mmbench2_lab.evaluation import psnr, rollout_gain, rollout_predictors, to_unit, window_actions
from mmbench2_lab.hallucination import PAPER_THRESHOLDS
from mmbench2_lab.plots import frame_grid, grid_image, png_data_uri
from mmbench2_lab.predictors import PREDICTORS, StepPrediction, predict_next, round_trip_residual
from mmbench2_lab.sampler import rollout
from mmbench2_lab.tasks import ACTION_DIM, get_task


def task_window(windows, task: str, position: float = 0.5) -> int:
    """Index of a window of ``task`` in ``windows``, ``position`` of the way through its windows (0..1)."""
    blocks = [b for b in windows.blocks if b.task == task]
    if not blocks:
        raise ValueError(f"no window of task {task!r}; the windows hold {', '.join(windows.tasks)}")
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"position must be in [0, 1], got {position}")
    indices = [i for b in blocks for i in range(b.first, b.first + b.count)]
    return indices[round(position * (len(indices) - 1))]


def _check_window(window: Mapping[str, torch.Tensor], frames_needed: int) -> None:
    missing = [k for k in ("obs", "act", "act_mask") if k not in window]
    if missing:
        raise ValueError(f"window lacks {missing}; pass an item of DynamicsWindows (obs, act, act_mask)")
    if window["obs"].dim() != 4 or window["obs"].shape[0] < frames_needed:
        raise ValueError(f"window obs must be (T+1 >= {frames_needed}, C, H, W), got {tuple(window['obs'].shape)}; "
                         f"build DynamicsWindows with seq_len >= {frames_needed - 1}")


# ---------------------------------------------------------------------------------------------------------
# Perceptual failure: real frames through the tokenizer


@dataclass
class RoundTrip:
    """Real frames through the tokenizer, each encoded alone (T = 1)."""
    frames: torch.Tensor  # (B, C, H, W) the real frames in [0, 1]
    recon: torch.Tensor  # (B, C, H, W) Dec(Enc(frame)) in [0, 1]
    u_r: torch.Tensor  # (B,) round-trip residual of the frame's latent, RMS(z - Enc(Dec(z)))
    psnr: torch.Tensor  # (B,) PSNR(recon, frame) in dB


@torch.no_grad()
def real_round_trip(world_model, frames: torch.Tensor) -> RoundTrip:
    """Encode and decode real frames (B, C, H, W) (uint8 or [0, 1] float); score the latents with u_r."""
    if frames.dim() != 4:
        raise ValueError(f"expected frames (B, C, H, W), got {tuple(frames.shape)}; index one frame per row")
    x = to_unit(frames).to(next(world_model.parameters()).device)
    z = world_model.encode(x[:, None])  # (B, 1, S, D)
    recon = world_model.decode(z)[:, 0]
    mse = ((recon - x) ** 2).flatten(1).mean(-1)
    return RoundTrip(frames=x, recon=recon, u_r=round_trip_residual(world_model.tokenizer, z[:, 0]), psnr=psnr(mse))


def round_trip_figure(rt: RoundTrip, labels: Optional[list[str]] = None):
    """One column per frame: the real frame over its round trip and |difference| (scaled to its maximum),
    labelled with u_r and the round trip's PSNR."""
    labels = labels or [f"frame {i}" for i in range(len(rt.frames))]
    if len(labels) != len(rt.frames):
        raise ValueError(f"{len(labels)} labels for {len(rt.frames)} frames")
    diff = (rt.frames - rt.recon).abs()
    diff = diff / diff.flatten(1).max(-1).values.clamp_min(1e-8)[:, None, None, None]
    columns = [f"{label}<br>u_r {float(u):.3f}, {float(p):.1f} dB" for label, u, p in zip(labels, rt.u_r, rt.psnr)]
    return frame_grid({"real frame": rt.frames, "round trip": rt.recon, "|difference|": diff},
                      column_labels=columns, title="Perceptual failure: frames the tokenizer cannot represent (u_r)")


# ---------------------------------------------------------------------------------------------------------
# Action marginalisation: one context, several action sequences


def action_sequences(task: str, horizon: int, recorded: Optional[torch.Tensor] = None,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Contrasting action sequences for ``task``, each (horizon, 16) over its true action dims.

    ``zero`` (no-op), ``all +1`` and ``all -1`` (push every actuator one way), ``random`` (U[-1, 1]) and,
    if given, ``recorded`` (the actions that really followed the context).
    """
    dims = get_task(task).action_dim
    out = {} if recorded is None else {"recorded": recorded}
    out["zero"] = torch.zeros(horizon, ACTION_DIM)
    for sign, name in ((1.0, "all +1"), (-1.0, "all -1")):
        out[name] = torch.zeros(horizon, ACTION_DIM)
        out[name][:, :dims] = sign
    out["random"] = torch.zeros(horizon, ACTION_DIM)
    out["random"][:, :dims] = torch.rand(horizon, dims, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return out


def recorded_actions(window: Mapping[str, torch.Tensor], ctx: int, horizon: int) -> torch.Tensor:
    """The (horizon, 16) actions that led to frames ctx..ctx+horizon-1 of ``window`` (led-to convention)."""
    _check_window(window, ctx + horizon)
    return window_actions(window["act"][None], window["act_mask"][None], ctx + horizon)[0][0, ctx:]


@dataclass
class ActionSweep:
    """Rollouts of one context under several action sequences, with the same noise for each."""
    frames: dict  # name -> (horizon, C, H, W) decoded frames in [0, 1]
    truth: torch.Tensor  # (horizon, C, H, W) what really happened (under the recorded actions)
    spread: torch.Tensor  # (horizon,) mean over pixels of the variance across the sequences' frames


@torch.no_grad()
def action_sweep(world_model, window: Mapping[str, torch.Tensor], sequences: Mapping[str, torch.Tensor], *,
                 ctx: int, seed: int = 0) -> ActionSweep:
    """Roll the first ``ctx`` frames of ``window`` forward under each action sequence (horizon, 16).

    ``sequences[name][j]`` is the action that leads to rollout frame j (the dynamics' led-to convention).
    Every rollout draws the same noise (a generator seeded with ``seed``), so differences between their
    frames come from the actions alone; ``spread`` near 0 means the model ignores its actions.
    """
    if not sequences:
        raise ValueError("no action sequences; pass e.g. action_sequences(task, horizon)")
    horizons = {name: tuple(a.shape) for name, a in sequences.items()}
    horizon = next(iter(horizons.values()))[0]
    if any(len(s) != 2 or s != (horizon, ACTION_DIM) for s in horizons.values()):
        raise ValueError(f"every action sequence must be (horizon, {ACTION_DIM}) of one horizon, got {horizons}")
    _check_window(window, ctx + horizon)
    device = next(world_model.parameters()).device
    obs = to_unit(window["obs"][:ctx + horizon]).to(device)
    led, mask = window_actions(window["act"][None].to(device), window["act_mask"][None].to(device), ctx + horizon)
    context = world_model.encode(obs[None, :ctx])
    frames = {}
    for name, seq in sequences.items():
        actions = led.clone()
        actions[0, ctx:] = seq.to(device).clamp(-1, 1) * mask[0, ctx:]
        g = torch.Generator(device=device).manual_seed(seed)
        frames[name] = rollout(world_model, context, actions, horizon, act_mask=mask, generator=g).frames[0, 0]
    spread = torch.stack(list(frames.values())).var(dim=0, unbiased=False).flatten(1).mean(-1)
    return ActionSweep(frames=frames, truth=obs[ctx:], spread=spread)


def action_sweep_figure(sweep: ActionSweep):
    """Rows: the true future, then one rollout per action sequence; columns: rollout steps."""
    rows = {"truth": sweep.truth, **sweep.frames}
    steps = [f"t+{j + 1}<br>spread {float(s):.1e}" for j, s in enumerate(sweep.spread)]
    return frame_grid(rows, column_labels=steps, title="Action marginalisation: one context, different actions, "
                                                       "same noise (spread: pixel variance across the rollouts)")


# ---------------------------------------------------------------------------------------------------------
# Scene divergence: predictors and ΔPSNR frame by frame


@dataclass
class RolloutTrace:
    """One open-loop rollout with its per-frame predictors and per-frame ΔPSNR."""
    traces: dict  # name -> (horizon,) for u_r, u_f, u_s, motion and the *_norm values
    gain_db: torch.Tensor  # (horizon,) PSNR(pred) - PSNR(floor) frame by frame (MSE averaged over seeds)
    sequence_gain_db: float  # the rollout's ΔPSNR over the whole horizon, as in a calibration table
    pred: torch.Tensor  # (horizon, C, H, W) seed 0's decoded frames
    truth: torch.Tensor  # (horizon, C, H, W)
    floor: torch.Tensor  # (C, H, W) the last context frame, repeated by the floor

    def normalised(self) -> dict[str, np.ndarray]:
        """{"u_r": (horizon,), "u_f": ..., "u_s": ...} normalised values, for ``per_frame_trace_figure``."""
        return {k: self.traces[f"{k}_norm"].numpy() for k in PREDICTORS}


@torch.no_grad()
def rollout_trace(world_model, window: Mapping[str, torch.Tensor], *, ctx: int, horizon: int, n_seeds: int = 2,
                  seed: int = 0) -> RolloutTrace:
    """Roll ``window`` out open-loop from its first ``ctx`` frames with the recorded actions and score every
    frame as ``calibration_table`` does (u_s needs ``n_seeds`` >= 2)."""
    _check_window(window, ctx + horizon)
    device = next(world_model.parameters()).device
    obs, act, mask = (window[k][None].to(device) for k in ("obs", "act", "act_mask"))
    g = torch.Generator(device=device).manual_seed(seed)
    ro = rollout_gain(world_model, obs, act, mask, ctx=ctx, horizon=horizon, n_seeds=n_seeds, generator=g)
    values = rollout_predictors(world_model, ro)
    floor = to_unit(obs[0, ctx - 1])
    mse_pred = ((ro.pred[0] - ro.truth[0][None]) ** 2).flatten(2).mean(-1).mean(0)  # (horizon,) over seeds
    mse_floor = ((floor[None] - ro.truth[0]) ** 2).flatten(1).mean(-1)
    return RolloutTrace(traces={k: v[0].cpu() for k, v in values.items()},
                        gain_db=(psnr(mse_pred) - psnr(mse_floor)).float().cpu(),
                        sequence_gain_db=float(ro.gain_db[0]), pred=ro.pred[0, 0].cpu(), truth=ro.truth[0].cpu(),
                        floor=floor.cpu())


def gain_figure(gain_db, fps: float = 15.0):
    """Per-frame ΔPSNR (horizon,) over the repeat-last-frame floor; below the 0 dB line is a hallucination."""
    import plotly.graph_objects as go

    gain = np.asarray(gain_db, dtype=float)
    t = np.arange(1, len(gain) + 1) / fps
    below = gain < 0
    fig = go.Figure([go.Scatter(x=t, y=gain, mode="lines+markers", name="ΔPSNR", line=dict(color="#7c3aed")),
                     go.Scatter(x=t[below], y=gain[below], mode="markers", name="ΔPSNR < 0",
                                marker=dict(color="#dc2626", size=7))])
    fig.add_hline(y=0.0, line_dash="dash", line_color="gray", annotation_text="scene-divergence threshold 0 dB")
    fig.update_layout(title="Per-frame rollout ΔPSNR over the repeat-last-frame floor", height=300,
                      xaxis_title="time after the context (s)", yaxis_title="ΔPSNR (dB)", showlegend=False)
    return fig


@torch.no_grad()
def step_maps(world_model, window: Mapping[str, torch.Tensor], *, ctx: int, n_seeds: int = 2,
              seed: int = 0) -> StepPrediction:
    """Predict frame ``ctx`` of ``window`` from the frames before it, with pixel maps of every predictor."""
    _check_window(window, ctx + 1)
    device = next(world_model.parameters()).device
    context = world_model.encode(to_unit(window["obs"][None, :ctx]).to(device))
    actions, mask = window_actions(window["act"][None].to(device), window["act_mask"][None].to(device), ctx + 1)
    return predict_next(world_model, context, actions, mask, n_seeds=n_seeds, maps=True,
                        generator=torch.Generator(device=device).manual_seed(seed))


def maps_figure(step: StepPrediction, truth: Optional[torch.Tensor] = None, index: int = 0,
                thresholds: Mapping[str, float] = PAPER_THRESHOLDS):
    """The predicted frame (and the true one) next to the u_r, u_f, u_s pixel maps of batch row ``index``.

    Map titles give the normalised value and the paper's threshold: where in the picture the model is unsure.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not step.maps:
        raise ValueError("the prediction has no pixel maps; call predict_next(..., maps=True) or step_maps")
    images = [("predicted frame", step.frame[index])] + ([("true frame", to_unit(truth))] if truth is not None else [])
    titles = [name for name, _ in images] + [
        f"{k} map<br>{k}_norm {float(step.values[f'{k}_norm'][index]):.2f} (threshold {thresholds[k]:g})"
        for k in PREDICTORS]
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.03)
    for col, (name, img) in enumerate(images, start=1):
        fig.add_trace(go.Image(source=png_data_uri(grid_image({name: img[None]}))), row=1, col=col)
    for col, k in enumerate(PREDICTORS, start=len(images) + 1):
        fig.add_trace(go.Heatmap(z=step.maps[k][index].cpu().numpy(), colorscale="Magma", showscale=False),
                      row=1, col=col)
    fig.update_xaxes(visible=False)
    for col in range(1, len(titles) + 1):  # square pixels, image orientation (row 0 at the top)
        fig.update_yaxes(visible=False, autorange="reversed", scaleanchor=f"x{col if col > 1 else ''}", row=1, col=col)
    fig.update_layout(title="Where the model is unsure: pixel maps of one predicted step", height=330,
                      width=260 * len(titles))
    return fig
