"""Notebook figures: what each plot draws is exactly the data it was given (metrics, frames, rollouts)."""
from __future__ import annotations

import base64
import math
from io import BytesIO

import numpy as np
import pytest
import torch

from mmbench2_lab import plots
from mmbench2_lab.config import preset
from mmbench2_lab.data.raw import read_raw
from mmbench2_lab.data.shards import preprocess
from mmbench2_lab.data.windows import DynamicsWindows, open_frames
from mmbench2_lab.training.engine import MetricsLog

def image_of(fig) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of a frame grid figure's PNG source."""
    from PIL import Image
    (trace,) = fig.data
    head, data = trace.source.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(BytesIO(base64.b64decode(data))).convert("RGB"))


MICRO = {"tokenizer.height": 16, "tokenizer.width": 16, "tokenizer.patch": 4, "tokenizer.d_model": 32,
         "tokenizer.n_heads": 2, "tokenizer.depth": 1, "tokenizer.n_latents": 4, "tokenizer.d_bottleneck": 8,
         "dynamics.d_model": 32, "dynamics.n_heads": 2, "dynamics.depth": 2, "dynamics.k_max": 8}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder whose metrics.jsonl the trainers' own MetricsLog wrote."""
    log = MetricsLog(tmp_path)
    for step in (10, 20, 30):
        log.log(step, {"train/loss": 1.0 / step, "train/mse": 0.1})
    log.log(20, {"val/psnr": 18.0, "val/psnr/atari": 16.0, "val/psnr/box2d": 20.0})
    log.log(30, {"val/psnr": 21.0, "val/psnr/atari": 19.0, "val/psnr/box2d": 23.0})
    return tmp_path


def test_metric_curves_draw_each_logged_value_against_its_step(run_dir):
    fig = plots.metric_curves(run_dir, ["train/loss", "val/psnr/*"])
    loss, *domains = fig.data
    assert list(loss.x) == [10, 20, 30] and list(loss.y) == pytest.approx([0.1, 0.05, 1 / 30])
    assert {d.name: list(d.y) for d in domains} == {"atari": [16.0, 19.0], "box2d": [20.0, 23.0]}
    assert [a.text for a in fig.layout.annotations] == ["train/loss", "val/psnr/*"]


def test_metric_curves_smooth_with_an_exponential_moving_average(run_dir):
    (trace,) = plots.metric_curves(run_dir, ["train/loss"], smooth=0.5).data
    x = [0.1, 0.05, 1 / 30]
    assert list(trace.y) == pytest.approx([x[0], 0.5 * x[0] + 0.5 * x[1], 0.5 * (0.5 * x[0] + 0.5 * x[1]) + 0.5 * x[2]])


def test_metric_curves_name_the_logged_metrics_when_one_is_missing(run_dir):
    with pytest.raises(KeyError, match="train/flow_mse.*train/loss"):
        plots.metric_curves(run_dir, ["train/flow_mse"])


def test_metric_curves_of_a_folder_without_metrics_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.metric_curves(tmp_path, ["train/loss"])


def test_final_metrics_are_the_last_logged_values(run_dir):
    assert plots.final_metrics(run_dir, "val/") == {"val/psnr": 21.0, "val/psnr/atari": 19.0, "val/psnr/box2d": 23.0}


def test_domain_bars_show_the_final_per_domain_values(run_dir):
    (bar,) = plots.domain_bars(run_dir, "val/psnr/", target=25).data
    assert list(bar.x) == ["atari", "box2d"] and list(bar.y) == [19.0, 23.0]
    with pytest.raises(KeyError, match="val/dpsnr/"):
        plots.domain_bars(run_dir, "val/dpsnr/")


def test_grouped_bars_have_one_series_per_outer_key():
    fig = plots.grouped_bars({"uniform": {"a": 0.5, "b": 0.5}, "valid_starts": {"a": 0.9, "b": 0.1}})
    assert [(t.name, list(t.x), list(t.y)) for t in fig.data] == [
        ("uniform", ["a", "b"], [0.5, 0.5]), ("valid_starts", ["a", "b"], [0.9, 0.1])]


def test_frame_grid_places_each_frame_in_its_row_and_column():
    gen = torch.Generator().manual_seed(0)
    chw = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=gen)  # (T, C, H, W) uint8
    hwc = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)  # (T, H, W, C) float, shorter row
    fig = plots.frame_grid({"a": chw, "b": hwc}, column_labels=["t0", "t1", "t2"])
    img = image_of(fig)
    assert img.shape == (2 * 8 + 1, 3 * 8 + 2, 3)
    for c in range(3):
        assert np.array_equal(img[0:8, c * 9:c * 9 + 8], chw[c].permute(1, 2, 0).numpy())
    for c in range(2):
        assert np.array_equal(img[9:17, c * 9:c * 9 + 8], (hwc[c] * 255).round().astype(np.uint8))
    assert (img[9:17, 18:26] == 255).all()  # the short row is padded with white
    assert list(fig.layout.yaxis.ticktext) == ["a", "b"] and list(fig.layout.xaxis.ticktext) == ["t0", "t1", "t2"]


def test_frame_grid_rejects_rows_of_different_frame_sizes():
    with pytest.raises(ValueError, match="one size"):
        plots.frame_grid({"a": np.zeros((1, 8, 8, 3)), "b": np.zeros((1, 16, 16, 3))})
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        plots.frame_grid({"a": np.zeros((1, 8, 8))})


def test_reconstruction_grid_labels_each_frame_with_its_psnr():
    frames = torch.full((2, 1, 3, 8, 8), 100, dtype=torch.uint8)  # windows of one frame, as TokenizerWindows
    recon = frames.clone()
    recon[0] += 51  # off by 0.2 everywhere: MSE 0.04
    recon[1, :, :, :4] += 51  # half the pixels: MSE 0.02
    fig = plots.reconstruction_grid(frames, recon)
    expected = [10 * math.log10(1 / 0.04), 10 * math.log10(1 / 0.02)]
    assert list(fig.layout.xaxis.ticktext) == [f"{v:.1f} dB" for v in expected]
    assert f"{sum(expected) / 2:.1f} dB" in fig.layout.title.text


def test_rollout_grid_rows_are_truth_prediction_and_the_repeated_last_context_frame(sim_data):
    from mmbench2_lab.evaluation import rollout_gain
    from mmbench2_lab.model.world_model import WorldModel

    torch.manual_seed(0)
    model = WorldModel(preset("tiny", MICRO)).eval()
    ctx, horizon = 3, 4
    batch = plots.pick_windows(DynamicsWindows(sim_data, ctx + horizon - 1), 2)
    ro = rollout_gain(model, batch["obs"], batch["act"], batch["act_mask"], ctx=ctx, horizon=horizon,
                      generator=torch.Generator().manual_seed(0))
    fig = plots.rollout_grid(ro, batch["obs"], ctx, index=1)
    img = image_of(fig)
    cell = lambda r, c: img[r * 17:r * 17 + 16, c * 17:c * 17 + 16]  # noqa: E731
    for c in range(horizon):
        assert np.array_equal(cell(0, c), batch["obs"][1, ctx + c].permute(1, 2, 0).numpy())
        pred = (ro.pred[1, 0, c].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(cell(1, c), pred)
        assert np.array_equal(cell(2, c), batch["obs"][1, ctx - 1].permute(1, 2, 0).numpy())
    assert list(fig.layout.yaxis.ticktext) == ["truth", "prediction", "floor (repeat last)"]
    assert f"{float(ro.gain_db[1]):+.2f} dB" in fig.layout.title.text


def test_pick_windows_spreads_the_batch_over_every_task(sim_data):
    windows = DynamicsWindows(sim_data, 8)
    batch = plots.pick_windows(windows, 4)
    assert batch["obs"].shape == (4, 9, 3, 16, 16)
    assert {int(i) for i in batch["task_idx"]} == {
        int(windows[i]["task_idx"]) for i in (0, len(windows) - 1)}


def test_task_frames_take_every_stride_th_frame_of_each_task(sim_data):
    frames = plots.task_frames(sim_data, n=5, stride=3)
    assert sorted(frames) == ["cheetah-run", "pendulum-swingup"]
    for task, f in frames.items():
        assert torch.equal(f, open_frames(sim_data, task).read(0, 15)[::3])


def test_action_traces_plot_the_recorded_actions_of_one_episode(sim_data):
    (trace,) = plots.action_traces({"random": sim_data}, "cheetah-run", dim=2, episode=1).data
    raw = read_raw(sim_data, "cheetah-run")
    assert list(trace.y) == pytest.approx(raw.action[raw.episode == 1, 2][1:].tolist())


def test_data_table_counts_frames_and_bytes_per_format(sim_data, tmp_path):
    preprocess(sim_data, tmp_path / "chunks", codec="webp", progress=False)
    preprocess(sim_data, tmp_path / "pt", codec="raw", progress=False)
    table = plots.data_table(sim_data, {"chunks": tmp_path / "chunks", "pt": tmp_path / "pt"})
    assert list(table.index) == ["cheetah-run", "pendulum-swingup"]
    for task, row in table.iterrows():
        assert row["frames"] == len(read_raw(sim_data, task)) and row["episodes"] == 3
        assert row["domain"] == "dmcontrol"
        assert 0 < row["chunks kB"] < row["pt kB"]  # lossless WebP beats raw tensors
        pt_bytes = sum(p.stat().st_size for p in (tmp_path / "pt" / task).iterdir())
        assert row["pt kB"] == pt_bytes / 1e3
