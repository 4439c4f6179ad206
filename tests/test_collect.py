"""Collection from a real simulator (dm_control cheetah-run at 32 px) through raw, shards and windows."""
import numpy as np
import pytest
import torch

from mmbench2_lab.cli import main
from mmbench2_lab.collect import PendulumSwingUp, collect, make_policy, run_episode
from mmbench2_lab.data.raw import StripFrames, read_raw
from mmbench2_lab.data.shards import preprocess
from mmbench2_lab.data.windows import DynamicsWindows, TokenizerWindows
from mmbench2_lab.envs import is_runnable, make_env
from mmbench2_lab.tasks import get_task

pytestmark = pytest.mark.skipif(not is_runnable("cheetah-run"), reason="needs dm_control (pip install '.[dmc]')")
KW = dict(policy="random", size=32, seed=7, max_steps=6)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """Two 6-step cheetah-run episodes collected to disk, and the same episodes re-run in memory."""
    out = tmp_path_factory.mktemp("collect") / "raw"
    assert collect("cheetah-run", 2, out, progress=False, **KW) == {"cheetah-run": 2}
    return out, [run_episode("cheetah-run", e, **KW) for e in range(2)]


def test_collected_raw_files_hold_the_episodes_in_the_dataset_convention(collected):
    out, episodes = collected
    raw = read_raw(out, "cheetah-run")
    assert raw.episode.tolist() == [0] * 7 + [1] * 7
    frames = StripFrames(out, "cheetah-run").read(0, 14).numpy()
    for e, ep in enumerate(episodes):  # re-running an episode reproduces it exactly
        rows = slice(7 * e + 1, 7 * e + 7)
        np.testing.assert_array_equal(frames[7 * e:7 * e + 7], ep["frames"].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(raw.action[rows].numpy(), ep["actions"])
        np.testing.assert_array_equal(raw.reward[rows].numpy(), ep["rewards"])
        assert torch.isnan(raw.action[7 * e]).all() and torch.isnan(raw.reward[7 * e])
    assert (raw.action[1:7, :6].abs() <= 1).all() and (raw.action[1:7, 6:] == 0).all()
    assert ep["frames"].shape == (7, 32, 32, 3) and len(np.unique(frames)) > 10  # real rendered pixels


@pytest.mark.parametrize("codec", ["raw", "webp"])
def test_round_trip_collect_raw_shards_windows_is_exact(collected, tmp_path, codec):
    out, episodes = collected
    preprocess(out, tmp_path / "shards", codec=codec, shard_size=5, chunk_frames=2, progress=False)
    ds = DynamicsWindows(out, 4, frame_dirs=[tmp_path / "shards"])
    assert [ds.locate(i)[1] for i in range(len(ds))] == [0, 1, 2, 7, 8, 9]  # no window crosses episodes
    for i in range(len(ds)):
        _, start = ds.locate(i)
        ep, k = episodes[start // 7], start % 7
        item = ds[i]
        np.testing.assert_array_equal(item["obs"].numpy(), ep["frames"][k:k + 5].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(item["act"].numpy(), ep["actions"][k:k + 4])
        np.testing.assert_array_equal(item["rew"].numpy(), ep["rewards"][k:k + 4])
        assert item["task_idx"].item() == get_task("cheetah-run").index
    tok = TokenizerWindows(tmp_path / "shards", 3)
    _, start = tok.locate(len(tok) - 1)
    expected = np.concatenate([e["frames"] for e in episodes])[start:start + 3].transpose(0, 3, 1, 2)
    torch.testing.assert_close(tok[len(tok) - 1]["frames"], torch.from_numpy(expected).float() / 255)


def test_resume_continues_an_interrupted_collection_identically(collected, tmp_path):
    out, _ = collected
    collect("cheetah-run", 1, tmp_path, progress=False, **KW)
    assert collect("cheetah-run", 2, tmp_path, resume=True, progress=False, **KW) == {"cheetah-run": 1}
    a, b = read_raw(out, "cheetah-run"), read_raw(tmp_path, "cheetah-run")
    torch.testing.assert_close(a.action, b.action, equal_nan=True)
    assert torch.equal(StripFrames(out, "cheetah-run").read(0, 14), StripFrames(tmp_path, "cheetah-run").read(0, 14))
    assert collect("cheetah-run", 2, tmp_path, resume=True, progress=False, **KW) == {"cheetah-run": 0}


def test_collect_command_line(tmp_path, capsys):
    args = ["collect", "--task", "cheetah-run", "--episodes", "1", "--policy", "zero", "--out", str(tmp_path),
            "--size", "32", "--max-steps", "3"]
    assert main(args) == 0
    raw = read_raw(tmp_path, "cheetah-run")
    assert raw.episode.tolist() == [0] * 4 and (raw.action[1:] == 0).all()
    assert main(args) == 2 and "pass append=True (--resume)" in capsys.readouterr().err
    assert main(args + ["--resume", "--episodes", "2"]) == 0 and len(read_raw(tmp_path, "cheetah-run")) == 8


def test_policies_respect_the_task_action_dims():
    rng = np.random.default_rng(0)
    rand = make_policy("random", "cheetah-run", rng)
    a = np.stack([rand(None, {}) for _ in range(200)])
    assert a.shape == (200, 16) and (a[:, 6:] == 0).all() and a[:, :6].min() < -0.9 and a[:, :6].max() > 0.9
    walk = make_policy("brownian", "cheetah-run", rng)
    walk.reset()
    w = np.stack([walk(None, {}) for _ in range(200)])
    assert (np.abs(w) <= 1).all() and (w[:, 6:] == 0).all()
    assert np.abs(np.diff(w[:, :6], axis=0)).mean() < 0.5 * np.abs(np.diff(a[:, :6], axis=0)).mean()
    assert (make_policy("zero", "cheetah-run", rng)(None, {}) == 0).all()
    with pytest.raises(ValueError, match="no scripted controller for 'cheetah-run'.*pendulum-swingup"):
        make_policy("scripted", "cheetah-run", rng)


def test_scripted_pendulum_swings_up_and_balances():
    env = make_env("pendulum-swingup", seed=0, render=False)
    policy = PendulumSwingUp(get_task("pendulum-swingup"), np.random.default_rng(0))
    _, info = env.reset(seed=1)
    total = 0.0
    for _ in range(300):
        _, r, _, _, info = env.step(policy(None, info))
        total += r
    assert total > 300  # of at most 600: upright for most of the episode (random actions score ~0)



@pytest.mark.slow  # two spawned processes each import torch and dm_control
def test_worker_processes_write_the_same_data_as_one_process(collected, tmp_path):
    out, _ = collected
    assert collect("cheetah-run", 2, tmp_path, workers=2, progress=False, **KW) == {"cheetah-run": 2}
    torch.testing.assert_close(read_raw(out, "cheetah-run").action, read_raw(tmp_path, "cheetah-run").action,
                               equal_nan=True)
    assert torch.equal(StripFrames(out, "cheetah-run").read(0, 14), StripFrames(tmp_path, "cheetah-run").read(0, 14))
