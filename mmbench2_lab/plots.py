"""Figures and small tables for the lab-manual notebooks (plotly).

- Training: ``metric_curves`` (stable metric names from a run folder's ``metrics.jsonl``, one panel per
  metric or ``fnmatch`` pattern such as ``"val/psnr/*"``), ``final_metrics``, ``domain_bars``.
- Frames: ``frame_grid`` (labelled rows of frames as one image), ``reconstruction_grid`` (held-out frames
  over their tokenizer round trip, PSNR per frame), ``rollout_grid`` (truth / prediction / repeat-last-frame
  floor of an open-loop rollout), ``task_frames`` and ``pick_windows`` (what to show).
- Data: ``action_traces`` (what a collection policy does), ``grouped_bars`` (e.g. task-weighting masses),
  ``data_table`` (episodes, frames and bytes on disk per task and storage format).

Frames are accepted as torch or numpy, (T, C, H, W) or (T, H, W, C), uint8 or float in [0, 1].
"""
from __future__ import annotations

import base64
import fnmatch
import math
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # plotly and pandas are imported where a figure or table is made
    import pandas as pd
    import plotly.graph_objects as go

    from mmbench2_lab.evaluation import RolloutEval

FRAME_PX = 80  # displayed height of one frame in a grid, in screen pixels
MAX_WIDTH = 1100  # grids wider than this are scaled down


# -- metrics ---------------------------------------------------------------------------------------------
def _rows(run: str | Path | Sequence[Mapping]) -> list[Mapping]:
    """Metric rows of a run folder (``metrics.jsonl``) or the rows themselves."""
    if isinstance(run, (str, Path)):
        from mmbench2_lab.training.engine import read_metrics
        rows = read_metrics(run)
        if not rows:
            raise FileNotFoundError(f"{Path(run) / 'metrics.jsonl'} is missing or empty: pass the run folder a "
                                    "trainer wrote (its out_dir), after at least log_every steps")
        return rows
    return list(run)


def _series(rows: Sequence[Mapping], name: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[name]) for r in rows if name in r and r[name] is not None and not math.isnan(r[name])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _ema(values: Sequence[float], smooth: float) -> list[float]:
    """Exponential moving average y_t = smooth * y_{t-1} + (1 - smooth) * x_t (smooth = 0: unchanged)."""
    out, y = [], None
    for v in values:
        y = v if y is None else smooth * y + (1.0 - smooth) * v
        out.append(y)
    return out


def metric_curves(run: str | Path | Sequence[Mapping], names: Sequence[str], *, smooth: float = 0.0,
                  title: str | None = None) -> "go.Figure":
    """One panel per entry of ``names`` with the metric against the optimizer step.

    run: a run folder (its ``metrics.jsonl``) or metric rows. An entry may be a pattern (``"val/psnr/*"``)
    drawing every matching metric in its panel, e.g. one curve per domain. ``smooth`` in [0, 1) is an
    exponential moving average for noisy training losses.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    rows = _rows(run)
    known = sorted({k for r in rows for k in r if k not in ("step", "time")})
    panels = []
    for pattern in names:
        matched = [k for k in known if fnmatch.fnmatchcase(k, pattern)]
        if not matched:
            raise KeyError(f"no metric matches {pattern!r}; this run logged {', '.join(known)}")
        panels.append((pattern, matched))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p for p, _ in panels])
    for col, (pattern, matched) in enumerate(panels, start=1):
        for name in matched:
            steps, values = _series(rows, name)
            label = name if len(matched) == 1 else name.removeprefix(pattern.split("*")[0])
            fig.add_trace(go.Scatter(x=steps, y=_ema(values, smooth), mode="lines+markers" if len(steps) < 30
                                     else "lines", name=label, legendgroup=pattern), row=1, col=col)
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_layout(title=title, height=320, width=min(MAX_WIDTH, 360 * len(panels) + 120),
                      margin=dict(l=50, r=20, t=60, b=40))
    return fig


def final_metrics(run: str | Path | Sequence[Mapping], prefix: str = "") -> dict[str, float]:
    """The last logged value of every metric whose name starts with ``prefix`` (e.g. ``"val/"``)."""
    out = {}
    for row in _rows(run):
        out.update({k: v for k, v in row.items() if k.startswith(prefix) and k not in ("step", "time")})
    return out


def domain_bars(run: str | Path | Sequence[Mapping] | Mapping[str, float], prefix: str, *,
                target: float | None = None, title: str | None = None, yaxis: str | None = None) -> "go.Figure":
    """Bars of the final ``<prefix><domain>`` metrics (e.g. ``"val/psnr/"``), with an optional target line."""
    import plotly.graph_objects as go

    values = run if isinstance(run, Mapping) else final_metrics(run, prefix)
    values = {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}
    if not values:
        raise KeyError(f"no metric starts with {prefix!r}; per-domain metrics are logged at evaluation time "
                       "(set eval_every, or let the run finish) and need held-out data (val_dirs)")
    fig = go.Figure(go.Bar(x=list(values), y=list(values.values()), text=[f"{v:.2f}" for v in values.values()],
                           textposition="outside"))
    if target is not None:
        fig.add_hline(y=target, line_dash="dash", annotation_text=f"target {target:g}")
    fig.update_layout(title=title, yaxis_title=yaxis or prefix.rstrip("/"), height=340,
                      width=min(MAX_WIDTH, 120 * len(values) + 250), margin=dict(l=50, r=20, t=60, b=40))
    return fig


def grouped_bars(data: Mapping[str, Mapping[str, float]], *, title: str | None = None,
                 yaxis: str | None = None) -> "go.Figure":
    """One bar group per inner key, one colour per outer key: ``{"uniform": {"task": mass, ...}, ...}``."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Bar(name=series, x=list(values), y=list(values.values())) for series, values in data.items()])
    n = max((len(v) for v in data.values()), default=1)
    fig.update_layout(barmode="group", title=title, yaxis_title=yaxis, height=360,
                      width=min(MAX_WIDTH, 50 * n * max(1, len(data)) + 300),
                      margin=dict(l=50, r=20, t=60, b=40))
    return fig


# -- frames ----------------------------------------------------------------------------------------------
def _to_hwc_uint8(frames, where: str) -> np.ndarray:
    """(T, C, H, W) or (T, H, W, C), uint8 or float in [0, 1] -> (T, H, W, 3) uint8."""
    x = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"{where}: expected frames (T, 3, H, W) or (T, H, W, 3), got shape {x.shape}")
    if x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)
    if x.dtype != np.uint8:
        x = (np.clip(x.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return x


def grid_image(rows: Mapping[str, object], gap: int = 1) -> np.ndarray:
    """Rows of frames -> one (R * (H + gap) - gap, C * (W + gap) - gap, 3) uint8 image, white between
    frames; shorter rows are padded with white."""
    arrays = {name: _to_hwc_uint8(f, f"row {name!r}") for name, f in rows.items()}
    if not arrays:
        raise ValueError("frame grid needs at least one row")
    shapes = {a.shape[1:] for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"all rows need frames of one size, got {sorted(shapes)}")
    (h, w, _), = shapes
    cols = max(len(a) for a in arrays.values())
    img = np.full((len(arrays) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, a in enumerate(arrays.values()):
        for c, frame in enumerate(a):
            img[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = frame
    return img


def png_data_uri(img: np.ndarray) -> str:
    """(H, W, 3) uint8 -> a ``data:image/png;base64,...`` URI (lossless)."""
    from PIL import Image

    buf = BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def frame_grid(rows: Mapping[str, object], *, column_labels: Sequence[str] | None = None,
               title: str | None = None) -> "go.Figure":
    """Labelled rows of frames (e.g. truth / prediction / floor) drawn as one image, frames enlarged."""
    import plotly.graph_objects as go

    gap = 1
    img = grid_image(rows, gap)
    first = _to_hwc_uint8(next(iter(rows.values())), "first row")
    h, w = first.shape[1:3]
    n_rows, n_cols = len(rows), (img.shape[1] + gap) // (w + gap)
    scale = min(FRAME_PX / h, (MAX_WIDTH - 140) / img.shape[1])
    # A PNG source, not a z array: a tenth of the notebook size, and every plotly.js renders it.
    fig = go.Figure(go.Image(source=png_data_uri(img), hoverinfo="skip"))
    fig.update_yaxes(tickvals=[r * (h + gap) + (h - 1) / 2 for r in range(n_rows)], ticktext=list(rows),
                     range=[img.shape[0] - 0.5, -0.5], showgrid=False, zeroline=False)
    labels = list(column_labels) if column_labels is not None else [""] * n_cols
    fig.update_xaxes(tickvals=[c * (w + gap) + (w - 1) / 2 for c in range(len(labels))], ticktext=labels,
                     range=[-0.5, img.shape[1] - 0.5], showgrid=False, zeroline=False, side="top")
    fig.update_layout(title=title, width=int(img.shape[1] * scale) + 140,
                      height=int(img.shape[0] * scale) + (90 if title else 60),
                      margin=dict(l=120, r=20, t=60 if title else 40, b=10))
    return fig


def _squeeze_time(x):
    """(N, 1, C, H, W) windows of one frame -> (N, C, H, W); anything else unchanged."""
    return x[:, 0] if getattr(x, "ndim", 0) == 5 else x


def reconstruction_grid(frames, recon, *, title: str | None = None) -> "go.Figure":
    """Held-out frames over their reconstructions, each column labelled with its PSNR in dB.

    frames, recon: (N, C, H, W) (or (N, 1, C, H, W) windows of one frame) in [0, 1] or uint8.
    """
    from mmbench2_lab.evaluation import psnr

    a = _to_hwc_uint8(_squeeze_time(frames), "frames").astype(np.float64) / 255.0
    b = _to_hwc_uint8(_squeeze_time(recon), "reconstructions").astype(np.float64) / 255.0
    if a.shape != b.shape:
        raise ValueError(f"frames {a.shape} and reconstructions {b.shape} differ in shape")
    db = psnr(torch.from_numpy(((a - b) ** 2).reshape(len(a), -1).mean(1)))
    return frame_grid({"held-out frame": a, "reconstruction": b}, column_labels=[f"{v:.1f} dB" for v in db.tolist()],
                      title=title or f"tokenizer round trip: mean PSNR {float(db.mean()):.1f} dB")


def rollout_grid(ro: "RolloutEval", obs, ctx: int, *, index: int = 0, seed: int = 0,
                 title: str | None = None) -> "go.Figure":
    """Truth / prediction / floor rows of one open-loop rollout from ``rollout_gain``.

    obs: the windows the rollout was run on, (B, T, C, H, W); the floor repeats frame ``ctx - 1`` (the
    last context frame), as the dPSNR metric does. The title carries this window's dPSNR.
    """
    horizon = ro.truth.shape[1]
    if not 0 <= index < ro.truth.shape[0]:
        raise IndexError(f"window {index} out of range for {ro.truth.shape[0]} rolled-out windows")
    if obs.shape[1] < ctx + horizon:
        raise ValueError(f"obs has {obs.shape[1]} frames, the rollout needs ctx {ctx} + horizon {horizon}; pass the "
                         "windows the rollout was run on")
    floor = obs[index, ctx - 1:ctx].expand(horizon, *obs.shape[2:])
    gain = float(ro.gain_db[index])
    return frame_grid({"truth": ro.truth[index], "prediction": ro.pred[index, seed], "floor (repeat last)": floor},
                      column_labels=[f"t+{k}" for k in range(1, horizon + 1)],
                      title=title or f"open-loop rollout after {ctx} context frames: dPSNR {gain:+.2f} dB")


def task_frames(directory: str | Path, *, n: int = 8, stride: int = 4,
                tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The first ``n`` frames, every ``stride``-th, of each task in a raw partition or shard root:
    ``{task: (n, 3, H, W) uint8}`` (fewer when a task holds fewer frames)."""
    from mmbench2_lab.data.windows import find_tasks, open_frames

    out = {}
    for task in (find_tasks(directory) if tasks is None else tasks):
        src = open_frames(directory, task)
        out[task] = src.read(0, min(len(src), n * stride))[::stride]
    return out


def pick_windows(dataset, n: int) -> dict[str, torch.Tensor]:
    """``n`` windows spread evenly over a windows dataset (so every task shows up), stacked into a batch."""
    idx = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().long().tolist()
    items = [dataset[i] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# -- data ------------------------------------------------------------------------------------------------
def action_traces(dirs: Mapping[str, str | Path], task: str, *, dim: int = 0, episode: int = 0,
                  title: str | None = None) -> "go.Figure":
    """Action dimension ``dim`` over one episode of ``task``, one line per raw partition (e.g. per policy)."""
    import plotly.graph_objects as go

    from mmbench2_lab.data.raw import read_raw

    fig = go.Figure()
    for label, d in dirs.items():
        raw = read_raw(d, task)
        a = raw.action[raw.episode == episode, dim]
        fig.add_trace(go.Scatter(y=a[1:].tolist(), mode="lines", name=label))  # row 0 is NaN (episode start)
    fig.update_layout(title=title or f"{task}: action[{dim}] over episode {episode}", xaxis_title="agent step",
                      yaxis_title="action", yaxis_range=[-1.1, 1.1], height=320, width=800,
                      margin=dict(l=50, r=20, t=60, b=40))
    return fig


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def data_table(raw_dir: str | Path, shard_dirs: Mapping[str, str | Path] | None = None) -> "pd.DataFrame":
    """Per task of a raw partition: domain, episodes, frames, and kilobytes on disk as raw PNG strips +
    ``<task>.pt`` and in each shard root of ``shard_dirs`` (``{"chunks": dir, "pt": dir}``)."""
    import pandas as pd

    from mmbench2_lab.data.raw import list_raw_tasks, read_raw, strip_paths, task_file
    from mmbench2_lab.tasks import get_task

    raw_dir = Path(raw_dir)
    rows = []
    for task in list_raw_tasks(raw_dir):
        raw = read_raw(raw_dir, task)
        row = {"task": task, "domain": get_task(task).domain, "episodes": raw.num_episodes, "frames": len(raw),
               "raw kB": _bytes([task_file(raw_dir, task), *strip_paths(raw_dir, task)]) / 1e3}
        for name, d in (shard_dirs or {}).items():
            row[f"{name} kB"] = _bytes((Path(d) / task).glob("*")) / 1e3
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")
