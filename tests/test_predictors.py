"""The three predictors computed together, the hallucination state, and a model's calibration table."""
from __future__ import annotations

import math

import pytest
import torch

from mmbench2_lab.config import preset
from mmbench2_lab.hallucination import PAPER_THRESHOLDS, HallucinationMonitor, robust_z
from mmbench2_lab.model.world_model import WorldModel
from mmbench2_lab.predictors import flow_instability, motion, predict_next, round_trip_residual, seed_variance

MICRO = {"tokenizer.height": 16, "tokenizer.width": 16, "tokenizer.patch": 4, "tokenizer.d_model": 32,
         "tokenizer.n_heads": 2, "tokenizer.depth": 1, "tokenizer.n_latents": 4, "tokenizer.d_bottleneck": 8,
         "dynamics.d_model": 32, "dynamics.n_heads": 2, "dynamics.depth": 2, "dynamics.k_max": 8}


@pytest.fixture(scope="module")
def wm():
    torch.manual_seed(0)
    return WorldModel(preset("tiny", MICRO)).eval()


def test_predict_next_agrees_with_each_predictor_computed_alone(wm, threads_1):
    B, t, N = 2, 3, 3
    ctx = torch.randn(B, t, 2, 16).clamp(-1, 1)
    actions = torch.rand(B, t + 1, 16) * 2 - 1
    g = torch.Generator().manual_seed(5)
    p = predict_next(wm, ctx, actions, torch.ones(16), n_seeds=N, steps=4, tau_ctx=0.1, generator=g, maps=True)
    assert p.seeds.shape == (B, N, 2, 16) and torch.equal(p.z, p.seeds[:, 0])
    v = p.values
    torch.testing.assert_close(v["u_s"], seed_variance(p.seeds))
    torch.testing.assert_close(v["motion"], motion(p.seeds.mean(1), ctx[:, -1]))
    torch.testing.assert_close(v["u_r"], round_trip_residual(wm.tokenizer, p.z), atol=1e-6, rtol=1e-5)
    for k in ("u_r", "u_f", "u_s"):
        torch.testing.assert_close(v[f"{k}_norm"], v[k] / v["motion"].clamp(min=1e-3))
    torch.testing.assert_close(p.frame, wm.decode(p.z[:, None])[:, 0])
    assert set(p.maps) == {"u_r", "u_f", "u_s"}
    assert all(m.shape == (B, 16, 16) and (m >= 0).all() for m in p.maps.values())
    # the u_s map is the pixel variance of the decoded seeds
    frames = wm.decode(p.seeds.flatten(0, 1)[:, None])[:, 0].reshape(B, N, 3, 16, 16)
    torch.testing.assert_close(p.maps["u_s"], frames.var(1).mean(1), atol=1e-6, rtol=1e-4)


def test_u_f_of_the_same_euler_steps_as_the_sampler(wm, threads_1):
    from mmbench2_lab.sampler import sample_next
    ctx, actions = torch.randn(1, 2, 2, 16), torch.zeros(1, 3, 16)
    p = predict_next(wm, ctx, actions, n_seeds=1, steps=4, generator=torch.Generator().manual_seed(1))
    s = sample_next(wm.dynamics, ctx, actions, steps=4, tau_ctx=wm.config.sampler.tau_ctx,
                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p.values["u_f"], flow_instability(s.x1_traj))
    assert float(p.values["u_s"]) == 0.0  # one seed has no spread


def test_threshold_states_follow_the_paper_thresholds():
    mon = HallucinationMonitor()
    calm = {f"{k}_norm": 0.1 * t for k, t in PAPER_THRESHOLDS.items()}
    assert mon.update(calm)[0] == "stable"
    state, per = mon.update({**calm, "u_f_norm": 0.5})
    assert state == "hallucinating" and per["u_f"] == "hallucinating" and per["u_r"] == "stable"
    assert mon.update({**calm, "u_s_norm": 0.66 * 0.7})[0] == "drifting"


def test_zscore_states_calibrate_per_episode_then_score():
    mon = HallucinationMonitor(mode="zscore", calibration_steps=5)
    base = [1.0, 1.1, 0.9, 1.05, 0.95]
    for x in base:
        assert mon.update({"u_r_norm": x})[0] == "calibrating"
    # median 1.0, MAD 0.05 -> scale max(1.4826 * 0.05, 0.05) = 0.07413
    assert robust_z(1.2, base) == pytest.approx(0.2 / (1.4826 * 0.05))
    assert mon.update({"u_r_norm": 1.05})[0] == "stable"
    assert mon.update({"u_r_norm": 1.1})[0] == "drifting"
    assert mon.update({"u_r_norm": 1.3})[0] == "hallucinating"
    mon.reset()
    assert mon.update({"u_r_norm": 9.0})[0] == "calibrating"
    with pytest.raises(ValueError, match="mode"):
        HallucinationMonitor(mode="vibes")


def test_calibration_table_has_the_paper_columns_on_real_windows(wm, sim_data, threads_1):
    from mmbench2_lab.calibration import CALIBRATION_COLUMNS
    from mmbench2_lab.data.windows import DynamicsWindows
    from mmbench2_lab.evaluation import calibration_table
    windows = DynamicsWindows([sim_data], 4 + 4 - 1)
    rows, traces = calibration_table(wm, windows, n_sequences=5, ctx=4, horizon=4, batch_size=4,
                                     progress=False, return_traces=True)
    assert len(rows) == 5 and all(tuple(r) == CALIBRATION_COLUMNS for r in rows)
    assert all(math.isfinite(r[c]) for r in rows for c in CALIBRATION_COLUMNS[2:])
    assert all(len(tr["u_r_norm"]) == 4 for tr in traces)
    seqs = {}
    for r in rows:
        seqs.setdefault(r["task"], []).append(r["seq_idx"])
    assert all(v == list(range(len(v))) for v in seqs.values())


def test_calibration_table_adds_the_real_context_round_trip_when_asked(wm, sim_data, tmp_path, threads_1, capsys):
    """u_r_context is u_r of the last real context frame's latent, by hand; the CSV and report carry it."""
    from mmbench2_lab.calibration import CALIBRATION_COLUMNS, CONTEXT_RESIDUAL_COLUMN, write_calibration_csv
    from mmbench2_lab.cli import main
    from mmbench2_lab.data.windows import DynamicsWindows
    from mmbench2_lab.evaluation import calibration_table
    windows = DynamicsWindows([sim_data], 4 + 4 - 1)
    rows = calibration_table(wm, windows, n_sequences=4, ctx=4, horizon=4, batch_size=4, progress=False,
                             context_residual=True)
    assert all(tuple(r) == CALIBRATION_COLUMNS + (CONTEXT_RESIDUAL_COLUMN,) for r in rows)
    last_context = torch.stack([windows[i]["obs"][3] for i in range(len(windows))])
    frame = last_context[[0, len(windows) - 1]].float() / 255  # the first and last of the evenly spaced windows
    by_hand = round_trip_residual(wm.tokenizer, wm.encode(frame[:, None])[:, 0])
    assert [rows[0][CONTEXT_RESIDUAL_COLUMN], rows[-1][CONTEXT_RESIDUAL_COLUMN]] == pytest.approx(
        by_hand.tolist(), rel=1e-4)
    path = write_calibration_csv(rows, tmp_path / "ctx.csv")
    assert path.read_text().splitlines()[0].endswith(",rollout_psnr_gain_db,u_r_context")
    assert main(["calibration-report", str(path), "--json"]) == 0
    assert CONTEXT_RESIDUAL_COLUMN in capsys.readouterr().out


def test_calibration_table_normalises_by_the_real_frames_motion_when_asked(wm, sim_data, tmp_path, threads_1):
    """motion_ref="truth": m_t = RMS(Enc(x_t) - Enc(x_t-1)) of the real frames, by hand; u_const_norm is the
    mean of 1 / max(m, 1e-3); the same rollout's raw u are unchanged; the CSV carries the column."""
    from mmbench2_lab.calibration import CALIBRATION_COLUMNS, MOTION_BASELINE_COLUMN, write_calibration_csv
    from mmbench2_lab.data.windows import DynamicsWindows
    from mmbench2_lab.evaluation import calibration_table
    windows = DynamicsWindows([sim_data], 4 + 4 - 1)
    kw = dict(n_sequences=2, ctx=4, horizon=4, batch_size=2, progress=False, return_traces=True)
    rows_p, tr_p = calibration_table(wm, windows, **kw)
    rows_t, tr_t = calibration_table(wm, windows, motion_ref="truth", motion_baseline=True, **kw)
    assert all(tuple(r) == CALIBRATION_COLUMNS + (MOTION_BASELINE_COLUMN,) for r in rows_t)
    obs = torch.stack([windows[i]["obs"][:8] for i in (0, len(windows) - 1)]).float() / 255
    with torch.no_grad():
        z = wm.encode(obs)
    for j in range(2):
        m = [float((z[j, t] - z[j, t - 1]).pow(2).mean().sqrt()) for t in range(4, 8)]
        assert tr_t[j]["motion"] == pytest.approx(m, rel=1e-4)
        assert tr_t[j]["u_s"] == pytest.approx(tr_p[j]["u_s"], rel=1e-5)  # same rollout, other divisor
        for k in ("u_r", "u_f", "u_s"):
            norm = [u / max(mt, 1e-3) for u, mt in zip(tr_t[j][k], m)]
            assert rows_t[j][f"{k}_norm"] == pytest.approx(sum(norm) / 4, rel=1e-4)
        assert rows_t[j][MOTION_BASELINE_COLUMN] == pytest.approx(sum(1 / max(mt, 1e-3) for mt in m) / 4, rel=1e-4)
        assert rows_t[j]["rollout_psnr_gain_db"] == pytest.approx(rows_p[j]["rollout_psnr_gain_db"])
    path = write_calibration_csv(rows_t, tmp_path / "truth.csv")
    assert path.read_text().splitlines()[0].endswith(",rollout_psnr_gain_db,u_const_norm")
    with pytest.raises(ValueError, match="motion_ref 'real'.*predicted, truth"):
        calibration_table(wm, windows, motion_ref="real", **kw)


def test_rollout_predictors_score_each_step_against_the_history_it_was_sampled_from(wm, sim_data, threads_1):
    """Shared context: u_s is the one-step spread of seeds from one history, motion is measured from the
    followed seed's previous latent; independent seeds: motion from the previous seed mean."""
    from mmbench2_lab.data.windows import DynamicsWindows
    from mmbench2_lab.evaluation import rollout_gain, rollout_predictors
    it = [DynamicsWindows([sim_data], 7)[i] for i in range(2)]
    obs, act, mask = (torch.stack([x[k] for x in it]) for k in ("obs", "act", "act_mask"))
    for shared in (True, False):
        ro = rollout_gain(wm, obs, act, mask, ctx=4, horizon=4, n_seeds=3, shared_context=shared,
                          generator=torch.Generator().manual_seed(0))
        p = rollout_predictors(wm, ro)
        mean = ro.latents.mean(1)
        prev = (ro.latents[:, 0] if shared else mean)[:, 1]
        m = (mean[:, 2] - prev).pow(2).mean((-2, -1)).sqrt()
        torch.testing.assert_close(p["motion"][:, 2], m)
        torch.testing.assert_close(p["u_s"][:, 2], ro.latents[:, :, 2].var(1).mean((-2, -1)))
        torch.testing.assert_close(p["u_s_norm"], p["u_s"] / p["motion"].clamp(min=1e-3))


def test_rollout_gain_by_hand_per_window_and_pooled_as_the_reference_logs_it(wm, sim_data, threads_1):
    from mmbench2_lab.data.windows import DynamicsWindows
    from mmbench2_lab.evaluation import rollout_gain
    it = [DynamicsWindows([sim_data], 7)[i] for i in range(3)]
    obs, act, mask = (torch.stack([x[k] for x in it]) for k in ("obs", "act", "act_mask"))
    ro = rollout_gain(wm, obs, act, mask, ctx=4, horizon=3, n_seeds=2, generator=torch.Generator().manual_seed(0))
    frames = obs[:, :7].double() / 255
    truth, last = frames[:, 4:], frames[:, 3:4]
    mse_pred = ((ro.pred.double() - truth[:, None]) ** 2).mean((2, 3, 4, 5)).mean(1)
    mse_floor = ((last - truth) ** 2).mean((1, 2, 3, 4))
    db = lambda m: 10 * torch.log10(1 / m)
    torch.testing.assert_close(ro.gain_db, db(mse_pred) - db(mse_floor), rtol=1e-4, atol=1e-4)
    assert ro.pooled_gain_db() == pytest.approx(float(db(mse_pred.mean()) - db(mse_floor.mean())), abs=1e-4)
    assert ro.pooled_gain_db([1]) == pytest.approx(float(ro.gain_db[1]), abs=1e-4)


def test_calibrate_command_writes_the_table_and_reports_it(wm, sim_data, tmp_path, threads_1, capsys):
    from mmbench2_lab.calibration import load_calibration
    from mmbench2_lab.cli import main
    wm.save_pretrained(tmp_path / "model")
    out = tmp_path / "calib.csv"
    assert main(["calibrate", "--model", str(tmp_path / "model"), "--data", str(sim_data), "--out", str(out),
                 "--sequences", "4", "--ctx", "4", "--horizon", "4", "--context-residual", "--motion", "truth",
                 "--motion-baseline"]) == 0
    printed = capsys.readouterr().out
    table = load_calibration(out)
    assert len(table) == 4 and list(table.columns)[-3:] == ["rollout_psnr_gain_db", "u_r_context", "u_const_norm"]
    assert f"wrote 4 sequences to {out} (u normalised by the truth motion)" in printed
    assert all(f"{name:10} Spearman rho" in printed
               for name in ("u_r_norm", "u_f_norm", "u_s_norm", "u_r_context", "u_const_norm"))
    # each seed with its own corrupted context (the reference's draw) changes the seeds' spread, for a model
    # whose prediction depends on its context (a fresh flow head is zero: draw it at random)
    listening = WorldModel(wm.config).eval()
    listening.load_state_dict(wm.state_dict())
    torch.nn.init.normal_(listening.dynamics.flow_x_head.weight, std=0.3)
    listening.save_pretrained(tmp_path / "listening")
    spreads = []
    for flag in ([], ["--seed-context-noise"]):
        path = tmp_path / f"listening{len(flag)}.csv"
        assert main(["calibrate", "--model", str(tmp_path / "listening"), "--data", str(sim_data), "--out",
                     str(path), "--sequences", "4", "--ctx", "4", "--horizon", "4", *flag]) == 0
        spreads.append(load_calibration(path)["u_s_norm"])
    assert not spreads[0].equals(spreads[1])
