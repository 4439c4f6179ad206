"""The bundled default model ships inside the package and drives a live rollout with the predictors on."""
import torch

from mmbench2_lab.checkpoints import BUNDLED_DIR, load_pretrained


def test_bundled_model_loads_and_rolls_out_with_predictors_from_a_live_simulator(threads_1):
    from mmbench2_lab.session import RolloutSession
    assert (BUNDLED_DIR / "MODEL_CARD.md").is_file()
    model = load_pretrained("bundled")
    assert model.config.tokenizer.height == 64 and not model.training
    with RolloutSession(model, "atari-pong", seed=0) as session:
        frames = [session.step(torch.tensor([1.0, 0.5, 1.0] + [0.0] * 13)) for _ in range(3)]
    last = frames[-1]
    assert last.frame.shape == (64, 64, 3)
    assert all(k in last.values for k in ("u_r_norm", "u_f_norm", "u_s_norm"))
    assert last.state in ("stable", "drifting", "hallucinating", "calibrating")


def test_bundled_model_beats_the_repeat_last_frame_floor_on_fresh_episodes_of_a_trained_task(tmp_path, threads_1):
    """12 evenly spaced windows (8 + 16 frames) of cheetah-run episodes collected live, with seeds its training
    never used."""
    from mmbench2_lab.collect import collect
    from mmbench2_lab.data.windows import DynamicsWindows
    from mmbench2_lab.evaluation import calibration_table
    model = load_pretrained("bundled")
    collect(["cheetah-run"], 2, tmp_path, policy="random", size=64, max_steps=96, seed=9000, progress=False)
    windows = DynamicsWindows([tmp_path], 23, lang_dim=model.config.dynamics.lang_dim)
    rows = calibration_table(model, windows, n_sequences=12, n_seeds=2, batch_size=12, progress=False)
    gains = torch.tensor([r["rollout_psnr_gain_db"] for r in rows])
    assert len(rows) == 12
    assert gains.mean() > 0, f"bundled model dPSNR {gains.mean():+.2f} dB on fresh cheetah-run episodes"


def test_bundled_model_u_r_is_higher_on_its_held_out_maze_than_on_the_trained_maze(tmp_path, threads_1):
    """og-point-var1 (an MMBench2 unseen layout, held out of training) against og-point-maze (trained): the
    normalised round-trip residual of the predictions, median over fresh windows (seed never used)."""
    from mmbench2_lab.collect import collect
    from mmbench2_lab.data.windows import DynamicsWindows
    from mmbench2_lab.evaluation import calibration_table
    model = load_pretrained("bundled")
    collect(["og-point-maze", "og-point-var1"], 1, tmp_path, policy="random", size=64, max_steps=100, seed=9000,
            progress=False)
    windows = DynamicsWindows([tmp_path], 23, lang_dim=model.config.dynamics.lang_dim)
    rows = calibration_table(model, windows, n_sequences=16, n_seeds=2, batch_size=16, progress=False)
    u_r = {task: torch.tensor([r["u_r_norm"] for r in rows if r["task"] == task]).median()
           for task in ("og-point-maze", "og-point-var1")}
    assert u_r["og-point-var1"] > u_r["og-point-maze"], f"median u_r_norm {u_r}"
