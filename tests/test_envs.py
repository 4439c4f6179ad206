"""make_env: live simulators behind one gymnasium contract (real simulators, small frames)."""
import gc
import sys

import gymnasium
import numpy as np
import pytest

from mmbench2_lab.envs import UnsupportedTaskError, is_runnable, make_env, runnable_domains
from mmbench2_lab.tasks import UnknownTaskError, get_task, tasks

SIZE = 64
# One representative task per domain: it must reset, step and render here.
DOMAIN_SAMPLES = {
    "dmcontrol": "cheetah-run",
    "mujoco": "mujoco-reacher",
    "box2d": "lunarlander-hover",
    "metaworld": "mw-push",
    "ogbench": "og-point-maze",
    "atari": "atari-pong",
    "robodesk": "rd-push-red",
}


def needs(task: str):
    """Skip when the task's simulator is not installed (e.g. a minimal install without extras)."""
    return pytest.mark.skipif(not is_runnable(task), reason=f"simulator for {task} not installed")


def assert_frame(frame: np.ndarray, size: int = SIZE):
    assert frame.shape == (size, size, 3) and frame.dtype == np.uint8
    assert frame.std() > 5, "frame is blank"


def assert_info(info: dict, task: str):
    spec = get_task(task)
    assert 0.0 <= info["score"] <= 1.0
    assert isinstance(info["success"], bool)
    assert info["action_mask"].dtype == np.float32
    np.testing.assert_array_equal(info["action_mask"], spec.action_mask)
    assert info["state"].dtype == np.float32 and info["state"].ndim == 1 and np.all(np.isfinite(info["state"]))
    assert info["task"] == task


@pytest.mark.parametrize("domain,task", sorted(DOMAIN_SAMPLES.items()))
def test_each_domain_resets_steps_and_renders(domain, task):
    if not is_runnable(task):
        pytest.skip(f"{domain} simulator not installed")
    env = make_env(task, size=SIZE, seed=0)
    assert env.task_spec.name == task and env.task_spec.domain == domain
    assert env.action_space.shape == (16,) and env.observation_space.shape == (SIZE, SIZE, 3)
    frame, info = env.reset()
    assert_frame(frame)
    assert_info(info, task)
    frames = [frame]
    for _ in range(3):
        frame, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert np.isfinite(reward) and not terminated and not truncated
        assert_frame(frame)
        assert_info(info, task)
        frames.append(frame)
    assert any(not np.array_equal(frames[0], f) for f in frames[1:]), "random actions changed nothing on screen"
    env.close()


@needs("cartpole-balance")
def test_frame_is_the_224_reference_by_default_and_resized_on_request():
    full, _ = make_env("cartpole-balance", seed=1).reset()
    assert_frame(full, 224)
    small, _ = make_env("cartpole-balance", size=32, seed=1).reset()
    assert_frame(small, 32)


@needs("cartpole-balance")
def test_same_seed_gives_the_same_initial_state():
    a = make_env("cartpole-balance", seed=3, render=False).reset()[1]["state"]
    b = make_env("cartpole-balance", seed=3, render=False).reset()[1]["state"]
    c = make_env("cartpole-balance", seed=4, render=False).reset()[1]["state"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@needs("pendulum-swingup")
def test_render_false_observes_the_state_vector():
    env = make_env("pendulum-swingup", render=False, seed=0)
    obs, info = env.reset()
    np.testing.assert_array_equal(obs, info["state"])
    assert env.observation_space.shape == obs.shape


@needs("pendulum-swingup")
def test_episode_truncates_at_max_episode_steps():
    env = make_env("pendulum-swingup", render=False, seed=0)
    env.reset()
    steps, truncated = 0, False
    while not truncated:
        _, _, terminated, truncated, info = env.step(np.zeros(16, np.float32))
        steps += 1
        assert not terminated
    assert steps == get_task("pendulum-swingup").max_episode_steps == 500
    assert 0.0 <= info["score"] <= 1.0


@needs("cartpole-swingup")
def test_wrong_size_or_nan_action_raises_naming_the_shape():
    env = make_env("cartpole-swingup", render=False, seed=0)
    env.reset()
    with pytest.raises(ValueError, match=r"\(16,\)"):
        env.step(np.zeros(1, np.float32))
    bad = np.zeros(16, np.float32)
    bad[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        env.step(bad)


@needs("cartpole-swingup")
def test_padding_dimensions_are_ignored():
    a = make_env("cartpole-swingup", render=False, seed=5)
    b = make_env("cartpole-swingup", render=False, seed=5)
    a.reset(), b.reset()
    act = np.zeros(16, np.float32)
    act[0] = 0.7
    noisy = act.copy()
    noisy[1:] = np.random.default_rng(0).uniform(-1, 1, 15)
    for _ in range(3):
        sa = a.step(act)[4]["state"]
        sb = b.step(noisy)[4]["state"]
    np.testing.assert_array_equal(sa, sb)


def test_unknown_task_names_close_matches():
    with pytest.raises(UnknownTaskError, match="walker-walk"):
        make_env("walker-wlak")


def test_out_of_scope_task_says_which_simulator_it_needs():
    with pytest.raises(UnsupportedTaskError, match="ManiSkill.*does not run yet"):
        make_env("ms-pick-cube")
    with pytest.raises(NotImplementedError, match="pygame"):
        make_env("pygame-pong")
    assert not is_runnable("ms-pick-cube") and not is_runnable("walker-walk-backward")


@pytest.mark.parametrize("task", ["walker-walk", "cup-catch-var1", "pygame-pong", "ms-reach"])
def test_is_runnable_agrees_with_make_env(task):
    if is_runnable(task):
        env = make_env(task, size=SIZE, render=False, seed=0)
        env.reset()
        env.step(np.zeros(16, np.float32))
    else:
        with pytest.raises((NotImplementedError, ImportError)):
            make_env(task, size=SIZE, render=False)


def test_runnable_domains_are_the_installed_ones():
    doms = runnable_domains()
    assert set(doms) <= {"dmcontrol", "mujoco", "box2d", "metaworld", "ogbench", "atari", "robodesk"}
    for d in doms:
        assert any(is_runnable(t.name) for t in tasks(domain=d))


@pytest.mark.skipif("dmcontrol" not in runnable_domains(), reason="dm_control not installed")
def test_every_runnable_dmcontrol_task_builds_and_steps():
    runnable = [t.name for t in tasks(domain="dmcontrol") if is_runnable(t.name)]
    assert len(runnable) == 23
    for task in runnable:
        env = make_env(task, render=False, seed=0)
        env.reset()
        _, reward, _, _, info = env.step(env.action_space.sample())
        assert np.isfinite(reward) and info["state"].size > 0
        env.close()


@needs("finger-turn-easy-var1")
@pytest.mark.parametrize("variant,stock", [("finger-turn-easy-var1", "finger-turn-easy"),
                                           ("cup-catch-var1", "cup-catch")])
def test_var1_variant_is_its_stock_task_with_a_dark_sky_and_purple_floor(variant, stock):
    """Same seed and actions give the same states and rewards; only the look differs."""
    runs = {}
    for task in (variant, stock):
        env = make_env(task, size=SIZE, seed=4)
        frame, info = env.reset()
        states, rewards = [info["state"]], []
        for t in range(6):
            frame, reward, _, _, info = env.step(np.full(16, 0.5 if t % 2 else -0.5, np.float32))
            states.append(info["state"])
            rewards.append(reward)
        runs[task] = frame.astype(float), np.stack(states), rewards
        env.close()
    np.testing.assert_array_equal(runs[variant][1], runs[stock][1])
    assert runs[variant][2] == runs[stock][2]
    sky_var1, sky_stock = runs[variant][0][:4].mean((0, 1)), runs[stock][0][:4].mean((0, 1))
    assert np.ptp(sky_var1) < 10 and sky_stock[2] - sky_stock[0] > 20, "var1 sky is grey, stock sky is blue"
    floor_var1 = runs[variant][0][-12:].mean((0, 1))
    assert floor_var1[2] > floor_var1[1] and floor_var1[0] > floor_var1[1], "var1 floor is purple"


@pytest.mark.skipif("box2d" not in runnable_domains(), reason="Box2D not installed")
def test_every_box2d_task_builds_steps_and_scores():
    for t in tasks(domain="box2d"):
        env = make_env(t.name, size=SIZE, seed=0)
        frame, info = env.reset()
        assert_frame(frame)
        for _ in range(2):
            frame, reward, _, _, info = env.step(env.action_space.sample())
        assert_frame(frame)
        assert_info(info, t.name)
        env.close()


@needs("bipedal-walker-obstacles")
def test_walker_terrains_differ_as_named():
    flat = make_env("bipedal-walker-flat", render=False, seed=0)
    flat.reset()
    assert len(set(flat.unwrapped.terrain_y)) == 1
    rough = make_env("bipedal-walker-rugged", render=False, seed=0)
    rough.reset()
    assert np.ptp(rough.unwrapped.terrain_y) > 0.5
    obstacles = make_env("bipedal-walker-obstacles", render=False, seed=0)
    obstacles.reset()
    walker = obstacles.unwrapped
    assert len(walker.terrain) > len(walker.terrain_x) - 1, "no stumps or pits were added"


@needs("lunarlander-takeoff")
def test_lander_goal_variants_add_the_goal_to_the_state_and_reward_in_unit_range():
    env = make_env("lunarlander-takeoff", render=False, seed=0)
    state, info = env.reset()
    assert state.shape == (10,)
    lander = env.unwrapped
    assert lander.lander.position[1] < lander.helipad_y + 1.5, "takeoff should start on the pad"
    for _ in range(20):
        _, reward, _, _, info = env.step(env.action_space.sample())
        assert 0.0 <= reward <= 2.0  # two simulator steps, each in [0, 1]


@needs("og-point-arena")
def test_reaching_the_maze_goal_is_success_and_full_score():
    env = make_env("og-point-arena", render=False, seed=0)
    _, info = env.reset()
    assert not info["success"] and info["score"] == 0.0
    for _ in range(60):
        to_goal = -info["state"][6:8] * 20  # state = (xy, velocity, goal, xy - goal, distance) / 20
        action = np.zeros(16, np.float32)
        action[:2] = np.clip(to_goal, -1, 1)
        _, reward, _, _, info = env.step(action)
        if info["success"]:
            break
    assert info["success"] and info["score"] == 1.0 and reward > 0.5


@needs("og-point-spiral")
def test_custom_maze_uses_its_layout_and_leaves_the_callers_rng_alone():
    env = make_env("og-point-spiral", render=False, seed=0)
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    env.reset()
    env.step(np.zeros(16, np.float32))
    assert np.random.rand() == expected
    maze = env.unwrapped.maze_map
    assert maze.shape == (8, 8) and maze[2, 2] == 1 and maze[1, 1] == 0 and maze[0].all()


@needs("mw-reach")
def test_metaworld_reach_with_a_scripted_arm_succeeds():
    env = make_env("mw-reach", render=False, seed=0)
    _, info = env.reset()
    for _ in range(60):
        state = info["state"]
        action = np.zeros(16, np.float32)
        action[:3] = np.clip((state[36:39] - state[0:3]) * 10, -1, 1)  # hand -> goal
        _, _, _, _, info = env.step(action)
        if info["success"]:
            break
    assert info["success"] and info["score"] == 1.0


@needs("atari-pong")
def test_atari_screen_sits_centred_on_a_black_canvas():
    frame, info = make_env("atari-pong", seed=0).reset()
    assert frame.shape == (224, 224, 3)
    assert not frame[:, :32].any() and not frame[:, 192:].any() and not frame[:7].any()
    assert frame[7:217, 32:192].any()
    assert info["state"].shape == (128,) and info["state"].max() <= 1.0


@needs("rd-push-red")
def test_robodesk_import_does_not_leave_gymnasium_posing_as_gym():
    from mmbench2_lab.envs.robodesk import _import_robodesk

    _import_robodesk()
    assert sys.modules.get("gym") is not gymnasium


@pytest.mark.skipif(not {"mujoco", "dmcontrol"} <= set(runnable_domains()), reason="needs MuJoCo and dm_control")
def test_envs_sharing_a_process_do_not_blank_each_others_frames():
    """Several MuJoCo OpenGL contexts in one process: creating, using or freeing one must not break another."""
    reacher = make_env("mujoco-reacher", size=SIZE, seed=0)
    cartpole = make_env("cartpole-balance", size=SIZE, seed=0)
    reacher.reset(), cartpole.reset()
    pendulum = make_env("mujoco-inverted-pendulum", size=SIZE, seed=0)
    pendulum.reset()
    pendulum.close()
    for _ in range(2):
        assert_frame(reacher.step(np.zeros(16, np.float32))[0])
        assert_frame(cartpole.step(np.zeros(16, np.float32))[0])
    reacher.close(), cartpole.close()


@needs("mujoco-reacher")
def test_a_closed_env_collected_later_does_not_blank_a_live_one():
    old = make_env("mujoco-inverted-pendulum", size=SIZE, seed=0)
    old.reset()
    old.close()
    live = make_env("mujoco-reacher", size=SIZE, seed=0)
    live.reset()
    del old
    gc.collect()
    assert_frame(live.step(np.zeros(16, np.float32))[0])


@pytest.mark.skipif("atari" not in runnable_domains(), reason="ale-py not installed")
def test_every_atari_game_loads_and_steps():
    for t in tasks(domain="atari"):
        env = make_env(t.name, render=False, seed=0)
        env.reset()
        _, reward, _, _, info = env.step(env.action_space.sample())
        assert np.isfinite(reward) and info["state"].shape == (128,)
        env.close()
