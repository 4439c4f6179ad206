"""RolloutSession on a real simulator and a tiny random world model: steering, modes and recording."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _session_fixtures import OTHER_TASK, TASK, tiny_world_model
from mmbench2_lab.envs import make_env
from mmbench2_lab.hallucination import HallucinationMonitor
from mmbench2_lab.predictors import round_trip_residual
from mmbench2_lab.session import (SMOOTHING, STATE_COLOURS, RolloutSession, TaskNotRunnableError,
                                  action_from_keys, overlay, save_video, smooth_action)
from mmbench2_lab.tasks import UnknownTaskError


@pytest.fixture(scope="module")
def model():
    return tiny_world_model()


@pytest.fixture(autouse=True)
def _one_thread(threads_1):
    """One intra-op thread: several torch threads on a busy 2-core machine are many times slower."""


@pytest.fixture
def session(model):
    with RolloutSession(model, TASK, seed=0) as s:
        yield s


# -- keys, smoothing, pictures ---------------------------------------------------------------------
def test_keys_map_to_the_reference_dims_and_opposing_keys_cancel():
    assert action_from_keys({"ArrowRight"})[:4].tolist() == [1, 0, 0, 0]
    assert action_from_keys({"ArrowLeft", "ArrowDown"})[:4].tolist() == [-1, -1, 0, 0]
    assert action_from_keys({"d", "S"})[:4].tolist() == [0, 0, 1, -1]  # letters in either case
    assert action_from_keys({"ArrowUp", "ArrowDown", "a"})[:4].tolist() == [0, 0, -1, 0]
    assert not action_from_keys(set()).any()


def test_keys_beyond_the_tasks_action_dim_are_ignored():
    assert action_from_keys({"ArrowRight", "ArrowUp", "d", "w"}, action_dim=3)[:4].tolist() == [1, 1, 1, 0]


def test_unknown_key_is_an_error_naming_the_steering_keys():
    with pytest.raises(ValueError, match="ArrowRight"):
        action_from_keys({"q"})


def test_smoothing_is_the_reference_ema():
    a = np.zeros(16, np.float32)
    raw = action_from_keys({"ArrowRight"})
    for n in range(1, 6):
        a = smooth_action(a, raw)
        assert a[0] == pytest.approx(1 - SMOOTHING ** n, abs=1e-6)
    assert smooth_action(a, raw, beta=0.0)[0] == 1.0


def test_overlay_draws_the_state_border_and_tints_where_the_map_is_high():
    frame = np.full((16, 16, 3), 100, np.uint8)
    heat = np.zeros((16, 16), np.float32)
    heat[8, 8] = 1.0
    out = overlay(frame, heat, "drifting", scale=2, border=2)
    assert out.shape == (32, 32, 3)
    assert tuple(out[0, 0]) == tuple(out[-1, 16]) == STATE_COLOURS["drifting"]
    assert tuple(out[16, 16]) == (193, 40, 40)  # the hottest pixel: 0.4 frame + 0.6 red (alpha 0.6)
    assert tuple(out[10, 10]) == (100, 100, 100)  # cold pixels unchanged
    with pytest.raises(ValueError, match="unknown state"):
        overlay(frame, state="panicking")


# -- stepping ------------------------------------------------------------------------------------
def test_starts_from_a_simulator_reset_at_the_models_size(session):
    r = session.last
    assert r.step == 0 and r.frame.shape == (64, 64, 3) and r.frame.dtype == np.uint8
    assert session.task == TASK and session.action_dim == 3 and session.history_len == 1


def test_stepping_changes_frames_and_scores_each_one(session):
    frames = [session.last.frame]
    for _ in range(3):
        r = session.step(keys={"ArrowRight"})
        frames.append(r.frame)
        assert set(r.values) == {"u_r", "u_f", "u_s", "motion", "u_r_norm", "u_f_norm", "u_s_norm"}
        assert all(np.isfinite(v) for v in r.values.values())
        assert r.state in STATE_COLOURS
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))
    assert [rec["step"] for rec in session.records] == [1, 2, 3]
    assert session.history_len == 4


def test_held_keys_are_masked_and_smoothed_into_the_action(session):
    r = session.step(keys={"ArrowRight", "w"})  # w drives dim 3, beyond pong's 3 dims
    assert r.action[0] == pytest.approx(1 - SMOOTHING) and not r.action[1:].any()
    r = session.step(keys={"ArrowRight", "w"})
    assert r.action[0] == pytest.approx(1 - SMOOTHING ** 2)


def test_action_of_the_tasks_width_is_padded_and_padding_dims_ignored(session):
    r = session.step(np.array([1.0, -1.0, 0.5]))
    assert r.action[:3] == pytest.approx((1 - SMOOTHING) * np.array([1.0, -1.0, 0.5]))
    full = np.ones(16, np.float32)
    r = session.step(full)
    assert not r.action[3:].any()


def test_wrong_size_action_is_an_error_naming_the_sizes(session):
    with pytest.raises(ValueError, match=r"16 values .* or 3 .* got 5"):
        session.step(np.zeros(5))
    assert session.last.step == 0  # nothing happened


def test_pause_holds_the_frame_and_resume_continues(session):
    first = session.step()
    session.pause()
    held = session.step(keys={"ArrowUp"})
    assert held.paused and held.step == first.step and np.array_equal(held.frame, first.frame)
    assert session.history_len == 2
    session.resume()
    assert session.step().step == first.step + 1


def test_reset_starts_a_new_episode(session):
    for _ in range(2):
        session.step()
    episode = session.episode
    r = session.reset()
    assert r.step == 0 and session.history_len == 1 and session.records == []
    assert session.episode == episode + 1 and not session.last.action.any()


def test_history_is_capped_at_ctx_window(model):
    with RolloutSession(model, TASK, ctx_window=3) as s:
        for _ in range(5):
            s.step()
        assert s.history_len == 3 and s.last.step == 5


def test_cached_context_steps_as_rerunning_it_until_the_window_fills_then_stays_within_it(model):
    kw = dict(seed=3, tau_ctx=0.0, ctx_window=4)
    with RolloutSession(model, TASK, **kw) as cached, \
            RolloutSession(model, TASK, cache_context=False, **kw) as rerun:
        for i in range(3):  # context 1 -> 4 frames: both see the same frames at the same positions
            a = np.full(16, (-1) ** i * 0.7, np.float32)
            np.testing.assert_allclose(cached.step(a).frame, rerun.step(a).frame, atol=1)
        lengths = []
        for _ in range(6):
            cached.step(np.zeros(16, np.float32))
            lengths.append(cached._context_cache.length)
    assert min(lengths) == 3 and max(lengths) == 4  # rebuilt from the newest window // 2 + 1 when full


def test_switch_task_validates_the_name_and_keeps_the_episode_on_error(session):
    session.step()
    with pytest.raises(UnknownTaskError, match="Did you mean atari-pong"):
        session.switch_task("atari-pongg")
    with pytest.raises(TaskNotRunnableError, match="tasks --runnable"):
        session.switch_task("pygame-cartpole-balance")
    assert session.task == TASK and session.last.step == 1
    r = session.switch_task(OTHER_TASK)
    assert session.task == OTHER_TASK and r.step == 0
    assert session.step().step == 1


def test_starts_from_given_frames_resized_to_the_model(model):
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    with RolloutSession(model, frames=frames) as s:
        assert s.history_len == 5 and s.action_dim == 16 and s.last.frame.shape == (64, 64, 3)
        assert s.step(np.zeros(16)).step == 1
        with pytest.raises(ValueError, match="need a task's simulator"):
            s.set_mode(side_by_side=True)


# -- the real simulator beside the model ----------------------------------------------------------
def test_side_by_side_steps_the_real_simulator_with_the_same_actions(model):
    env = make_env(TASK, size=64, seed=3)
    expected = [env.reset()[0]]
    with RolloutSession(model, TASK, seed=3, side_by_side=True) as s:
        got = [s.last.real_frame]
        for keys in ({"ArrowRight"}, {"ArrowUp"}, set()):
            r = s.step(keys=keys)
            got.append(r.real_frame)
            expected.append(env.step(r.action)[0])
    env.close()
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert not np.array_equal(expected[0], expected[-1])  # the real game moved


def test_guarded_mode_reanchors_on_the_real_frame_when_hallucinating(model):
    always = HallucinationMonitor(thresholds={"u_r": 0.0, "u_f": 0.0, "u_s": 0.0})
    with RolloutSession(model, TASK, guarded=True, monitor=always) as s:
        assert s.side_by_side
        for n in range(1, 4):
            r = s.step()
            assert r.state == "hallucinating" and r.reanchored and s.reanchors == n
        with torch.no_grad():
            real = model.encode(torch.tensor(r.real_frame).permute(2, 0, 1)[None, None].float() / 255)[0, 0]
        torch.testing.assert_close(s.context[-1], real)
        assert r.scene_u_r == pytest.approx(float(round_trip_residual(model.tokenizer, real[None])[0]), rel=1e-5)


def test_every_step_reports_the_round_trip_of_the_real_frame_it_was_anchored_on(model):
    env = make_env(TASK, size=64, seed=5)
    first = env.reset()[0]
    env.close()
    with torch.no_grad():
        z = model.encode(torch.tensor(first).permute(2, 0, 1)[None, None].float() / 255)[0, 0]
        by_hand = float(round_trip_residual(model.tokenizer, z[None])[0])
    with RolloutSession(model, TASK, seed=5) as s:
        assert s.last.scene_u_r == pytest.approx(by_hand, rel=1e-5)
        r = s.step()
        assert r.scene_u_r == s.last.scene_u_r == pytest.approx(by_hand, rel=1e-5)
        assert r.summary().endswith(f"scene u_r {by_hand:.3f}") and s.records[-1]["scene_u_r"] == r.scene_u_r


def test_guarded_mode_leaves_a_stable_rollout_alone(model):
    never = HallucinationMonitor(thresholds={"u_r": 1e9, "u_f": 1e9, "u_s": 1e9})
    with RolloutSession(model, TASK, guarded=True, monitor=never) as s:
        for _ in range(2):
            assert not s.step().reanchored
        assert s.reanchors == 0


# -- recording -------------------------------------------------------------------------------------
def test_recording_writes_a_playable_mp4_of_model_and_real_frames(model, tmp_path):
    import imageio.v2 as imageio
    with RolloutSession(model, TASK, side_by_side=True, record=True) as s:
        for _ in range(3):
            s.step(keys={"ArrowUp"})
        path = s.save_recording(tmp_path / "episode.mp4", fps=10)
        assert [r["step"] for r in s.records] == [1, 2, 3] and "u_s_norm" in s.records[0]
    assert path.suffix == ".mp4"
    with imageio.get_reader(path) as reader:
        frames = list(reader.iter_data())
        assert reader.get_meta_data()["codec"] == "h264"
    assert len(frames) == 4 and frames[0].shape == (64, 128, 3)  # start + 3 steps, model | real


def test_gif_recording_and_nothing_recorded_is_an_error(tmp_path):
    from PIL import Image
    frames = [np.full((8, 8, 3), v, np.uint8) for v in (0, 128, 255)]
    path = save_video(frames, tmp_path / "clip.gif", fps=5)
    with Image.open(path) as im:
        assert im.n_frames == 3
    with pytest.raises(ValueError, match="no frames"):
        save_video([], tmp_path / "empty.mp4")


def test_reward_head_predicts_a_reward_each_step():
    model = tiny_world_model(**{"dynamics.n_agent": 1, "dynamics.reward_head": True})
    with RolloutSession(model, TASK) as s:
        r = s.step()
    assert isinstance(r.reward, float) and np.isfinite(r.reward)
