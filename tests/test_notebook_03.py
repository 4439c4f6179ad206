"""Notebook 03 (predictor analysis) end to end, and the failure-mode figures it calls (mmbench2_lab.figures).

A micro world model with random weights stands in for the bundled one; the data are real simulator episodes
(the session's ``sim_data``: cheetah-run and pendulum-swingup at 16x16).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmbench2_lab.config import preset
from mmbench2_lab.data.windows import DynamicsWindows
from mmbench2_lab.figures import (action_sequences, action_sweep, action_sweep_figure, maps_figure, real_round_trip,
                                  recorded_actions, round_trip_figure, rollout_trace, step_maps, task_window)
from mmbench2_lab.model.world_model import WorldModel
from mmbench2_lab.predictors import round_trip_residual

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_predictor_analysis.ipynb"
MICRO = {"tokenizer.height": 16, "tokenizer.width": 16, "tokenizer.patch": 4, "tokenizer.d_model": 32,
         "tokenizer.n_heads": 2, "tokenizer.depth": 1, "tokenizer.n_latents": 4, "tokenizer.d_bottleneck": 8,
         "dynamics.d_model": 32, "dynamics.n_heads": 2, "dynamics.depth": 2, "dynamics.k_max": 8}
CTX, HORIZON = 3, 3


def micro_model(listens: bool = True) -> WorldModel:
    """Random micro model. A fresh model's flow head is zero (it predicts the same latent whatever it is
    given); ``listens`` draws that head at random so predictions depend on context and actions."""
    torch.manual_seed(0)
    wm = WorldModel(preset("tiny", MICRO)).eval()
    if listens:
        torch.nn.init.normal_(wm.dynamics.flow_x_head.weight, std=0.3)
    return wm


@pytest.fixture(scope="module")
def wm():
    return micro_model()


@pytest.fixture(scope="module")
def windows(sim_data):
    return DynamicsWindows([sim_data], CTX + HORIZON - 1)


def test_notebook_03_runs_on_a_micro_model_and_real_episodes(sim_data, tmp_path, monkeypatch):
    import nbformat
    import papermill as pm

    micro_model().save_pretrained(tmp_path / "micro")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: one thread per kernel, steady on a busy machine
    out = tmp_path / "03_out.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out), kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                        parameters=dict(model=str(tmp_path / "micro"), data_dir=str(sim_data),
                                        seen_task="cheetah-run", unseen_task="pendulum-swingup", n_sequences=4,
                                        ctx=CTX, horizon=HORIZON, seeds=2, motion_ref="truth"))
    nb = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    # the paper's calibration, computed from its table
    for name, rho in (("u_r_norm", "-0.808"), ("u_f_norm", "-0.785"), ("u_s_norm", "-0.796")):
        assert f"{name}   Spearman rho {rho}" in text
    assert "logistic   held-out tasks: rho" in text
    from mmbench2_lab.calibration import paper_calibration, predictor_agreement
    for (a, b), rho in predictor_agreement(paper_calibration()).items():
        assert f"{a} ~ {b}: Spearman rho {rho:+.3f}" in text
    # our model's table: one line per predictor (the paper's three, our u_r_context and the 1/m baseline)
    # after the paper's three and their three agreements
    assert text.count("Spearman rho") == 11
    assert "u_r_context  Spearman rho" in text and "u_const_norm  Spearman rho" in text
    assert "the paper's model on its sequences in our dPSNR range" in text
    assert "pendulum-swingup: rollout dPSNR" in text
    figures = sum("application/vnd.plotly.v1+json" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                  for o in c.outputs)
    assert figures == 8  # paper, overlay, round trip, action sweep, traces, dPSNR, rollout frames, maps


def test_the_committed_notebook_has_no_outputs_and_a_parameters_cell():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_action_sweep_shows_whether_the_model_listens_to_actions(windows, threads_1):
    window = windows[task_window(windows, "cheetah-run")]
    recorded = recorded_actions(window, CTX, HORIZON)
    torch.testing.assert_close(recorded[:, :6], window["act"][CTX - 1:CTX - 1 + HORIZON, :6].clamp(-1, 1))
    sequences = action_sequences("cheetah-run", HORIZON, recorded=recorded)
    assert list(sequences) == ["recorded", "zero", "all +1", "all -1", "random"]
    assert (sequences["all +1"][:, :6] == 1).all() and (sequences["all +1"][:, 6:] == 0).all()  # cheetah: 6 dims

    deaf = action_sweep(micro_model(listens=False), window, sequences, ctx=CTX)
    assert torch.equal(deaf.spread, torch.zeros(HORIZON))  # a zero flow head ignores everything it is given
    sweep = action_sweep(micro_model(), window, sequences, ctx=CTX)
    assert (sweep.spread > 0).all()
    assert not torch.equal(sweep.frames["zero"], sweep.frames["all +1"])
    assert torch.equal(sweep.truth, window["obs"][CTX:CTX + HORIZON].float() / 255)
    # the same noise for every sequence: identical actions give identical rollouts
    same = action_sweep(micro_model(), window, {"a": sequences["random"], "b": sequences["random"]}, ctx=CTX)
    assert torch.equal(same.frames["a"], same.frames["b"]) and float(same.spread.max()) == 0.0
    assert len(action_sweep_figure(sweep).data) == 1  # one grid image
    with pytest.raises(ValueError, match="horizon"):
        action_sweep(micro_model(), window, {"a": torch.zeros(HORIZON, 16), "b": torch.zeros(HORIZON + 1, 16)}, ctx=CTX)


def test_real_round_trip_encodes_each_frame_alone_and_scores_it_with_u_r(wm, windows, threads_1):
    frames = torch.stack([windows[task_window(windows, t)]["obs"][0] for t in ("cheetah-run", "pendulum-swingup")])
    rt = real_round_trip(wm, frames)
    alone = real_round_trip(wm, frames[1:])
    torch.testing.assert_close(rt.recon[1:], alone.recon)
    torch.testing.assert_close(rt.u_r[1:], alone.u_r)
    z = wm.encode(frames[:, None].float() / 255)[:, 0]
    torch.testing.assert_close(rt.u_r, round_trip_residual(wm.tokenizer, z))
    mse = ((rt.recon - frames.float() / 255) ** 2).flatten(1).mean(-1)
    torch.testing.assert_close(rt.psnr, 10 * torch.log10(1 / mse.double()))
    fig = round_trip_figure(rt, ["cheetah", "pendulum"])
    assert "u_r" in fig.layout.xaxis.ticktext[0]


def test_rollout_trace_per_frame_gain_reduces_to_the_sequence_gain_for_one_frame(wm, windows, threads_1):
    window = windows[task_window(windows, "pendulum-swingup")]
    one = rollout_trace(wm, window, ctx=CTX, horizon=1)
    assert one.gain_db.shape == (1,) and float(one.gain_db[0]) == pytest.approx(one.sequence_gain_db, abs=1e-4)
    tr = rollout_trace(wm, window, ctx=CTX, horizon=HORIZON)
    assert tr.pred.shape == tr.truth.shape == (HORIZON, 3, 16, 16)
    assert set(tr.normalised()) == {"u_r", "u_f", "u_s"} and all(len(v) == HORIZON for v in tr.normalised().values())
    assert torch.equal(tr.floor, window["obs"][CTX - 1].float() / 255)


def test_step_maps_predict_the_frame_after_the_context_with_pixel_maps(wm, windows, threads_1):
    window = windows[task_window(windows, "cheetah-run", position=0.0)]
    step = step_maps(wm, window, ctx=CTX)
    assert step.frame.shape == (1, 3, 16, 16) and set(step.maps) == {"u_r", "u_f", "u_s"}
    assert all(m.shape == (1, 16, 16) for m in step.maps.values())
    fig = maps_figure(step, truth=window["obs"][CTX])
    assert len(fig.data) == 5 and "threshold 0.5" in fig.layout.annotations[3].text


def test_task_window_picks_a_window_of_the_task(windows):
    for task in windows.tasks:
        assert windows.locate(task_window(windows, task, 0.0))[0] == task
        assert windows.locate(task_window(windows, task, 1.0))[0] == task
    with pytest.raises(ValueError, match="no window of task 'walker-run'"):
        task_window(windows, "walker-run")
