"""Training windows: exact pixels/actions/rewards, the reference validity rule, sources, splits, errors."""
import numpy as np
import pytest
import torch

from _data_fixtures import all_frames_chw, make_episodes, write_episodes
from mmbench2_lab.data.shards import preprocess
from mmbench2_lab.data.windows import DynamicsWindows, TokenizerWindows, held_out_episodes, valid_starts
from mmbench2_lab.tasks import UnknownTaskError, get_task


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """cheetah-run (3 episodes) and pendulum-swingup (2), raw plus both shard formats."""
    root = tmp_path_factory.mktemp("windows")
    eps = {"cheetah-run": make_episodes("cheetah-run", [6, 9, 4], seed=1),
           "pendulum-swingup": make_episodes("pendulum-swingup", [7, 5], seed=2)}
    for task, e in eps.items():
        write_episodes(root / "raw", task, e, frames_per_strip=7)
    for codec in ("raw", "webp"):
        preprocess(root / "raw", root / f"shards-{codec}", codec=codec, shard_size=6, chunk_frames=4, progress=False)
    return root, eps


def _episode_table(episodes):
    """Per frame: (episode index, step within episode) in storage order."""
    return [(e, k) for e, ep in enumerate(episodes) for k in range(len(ep["frames"]))]


@pytest.mark.parametrize("frames", ["raw", "shards-raw", "shards-webp"])
def test_dynamics_windows_return_exactly_what_was_written(dataset, frames):
    root, eps = dataset
    ds = DynamicsWindows(root / "raw", 3, frame_dirs=[root / frames])
    assert sorted(ds.tasks) == ["cheetah-run", "pendulum-swingup"]
    for idx in range(len(ds)):
        task, start = ds.locate(idx)
        item, table = ds[idx], _episode_table(eps[task])
        e, k = table[start]
        ep = eps[task][e]
        assert table[start + 3] == (e, k + 3)  # never crosses an episode boundary
        np.testing.assert_array_equal(item["obs"].numpy(), ep["frames"][k:k + 4].transpose(0, 3, 1, 2))
        adim = get_task(task).action_dim
        np.testing.assert_array_equal(item["act"][:, :adim].numpy(), ep["actions"][k:k + 3])
        assert (item["act"][:, adim:] == 0).all() and (item["act_mask"].sum(1) == adim).all()
        np.testing.assert_array_equal(item["rew"].numpy(), ep["rewards"][k:k + 3])
        assert item["task_idx"].item() == get_task(task).index
        assert item["obs"].dtype == torch.uint8 and item["obs"].shape == (4, 3, 16, 16)


def test_dynamics_windows_cover_every_valid_start(dataset):
    root, eps = dataset
    ds = DynamicsWindows(root / "raw", 3, tasks=["cheetah-run"])
    # episodes of 7, 10 and 5 frames give 4 + 7 + 2 windows of 4 frames
    assert len(ds) == 13 and [ds.locate(i)[1] for i in range(len(ds))][:5] == [0, 1, 2, 3, 7]


def test_valid_starts_follows_the_reference_rule():
    episode = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    action = torch.zeros(9, 16)
    reward = torch.zeros(9)
    action[[0, 5]] = float("nan")
    reward[[0, 5]] = float("nan")
    assert valid_starts(episode, action, reward, 2).tolist() == [0, 1, 2, 5, 6]
    reward[2] = float("nan")  # a NaN inside an episode invalidates the windows that step through it
    assert valid_starts(episode, action, reward, 2).tolist() == [2, 5, 6]
    assert valid_starts(episode, action, reward, 9).tolist() == []


@pytest.mark.parametrize("frames", ["raw", "shards-webp"])
def test_tokenizer_windows_return_exact_frames_within_one_block(dataset, frames):
    root, eps = dataset
    ds = TokenizerWindows(root / frames, 4, tasks=["cheetah-run"])
    all_frames = all_frames_chw(eps["cheetah-run"])
    for idx in range(len(ds)):
        _, start = ds.locate(idx)
        item = ds[idx]
        assert item["frames"].dtype == torch.float32 and item["frames"].shape == (4, 3, 16, 16)
        torch.testing.assert_close(item["frames"], torch.from_numpy(all_frames[start:start + 4]).float() / 255)
    block = 7 if frames == "raw" else 6  # strip or shard length
    assert len(ds) == sum(max(0, min(block, 22 - s) - 3) for s in range(0, 22, block))


def test_several_sources_concatenate_with_episode_offsets(dataset, tmp_path):
    root, eps = dataset
    extra = make_episodes("cheetah-run", [5], seed=9)
    write_episodes(tmp_path / "more", "cheetah-run", extra)
    ds = DynamicsWindows([root / "raw", tmp_path / "more"], 3, tasks=["cheetah-run"])
    tok = TokenizerWindows([root / "raw", tmp_path / "more"], 3, tasks=["cheetah-run"])
    assert tok.starts_per_task == {"cheetah-run": len(TokenizerWindows(root / "raw", 3, tasks=["cheetah-run"])) + 4}
    assert torch.unique(ds.episodes("cheetah-run")).tolist() == [0, 1, 2, 3]
    starts = [ds.locate(i)[1] for i in range(len(ds))]
    assert starts[-3:] == [22, 23, 24]  # the second source's episode begins at frame 22
    np.testing.assert_array_equal(ds[len(ds) - 1]["obs"].numpy(), extra[0]["frames"][2:6].transpose(0, 3, 1, 2))


def test_train_and_val_splits_hold_out_whole_episodes(dataset):
    root, _ = dataset
    kw = dict(tasks=["cheetah-run"], val_fraction=0.34, split_seed=3)
    train, val = DynamicsWindows(root / "raw", 3, split="train", **kw), DynamicsWindows(root / "raw", 3, split="val", **kw)
    ep = train.episodes("cheetah-run")
    train_eps = {int(ep[train.locate(i)[1]]) for i in range(len(train))}
    val_eps = {int(ep[val.locate(i)[1]]) for i in range(len(val))}
    assert len(val_eps) == 1 and not train_eps & val_eps and train_eps | val_eps == {0, 1, 2}
    assert len(train) + len(val) == len(DynamicsWindows(root / "raw", 3, tasks=["cheetah-run"]))


def test_held_out_episodes_is_seeded_and_keeps_training_data():
    ids = torch.arange(20).repeat_interleave(3)
    a, b = held_out_episodes(ids, 0.2, seed=1), held_out_episodes(ids, 0.2, seed=1)
    assert len(a) == 4 and np.array_equal(a, b)
    assert len(held_out_episodes(torch.zeros(5), 0.5)) == 0  # a single episode is never held out


def test_task_embeddings_are_returned_with_a_flag(dataset):
    root, _ = dataset
    emb = torch.arange(8, dtype=torch.float32)
    ds = DynamicsWindows(root / "raw", 3, task_embeddings={"cheetah-run": emb}, lang_dim=8)
    by_task = {ds.locate(i)[0]: ds[i] for i in range(len(ds))}
    assert torch.equal(by_task["cheetah-run"]["lang_emb"], emb) and by_task["cheetah-run"]["has_lang"]
    assert not by_task["pendulum-swingup"]["has_lang"] and (by_task["pendulum-swingup"]["lang_emb"] == 0).all()
    with pytest.raises(ValueError, match="has 8 values, expected lang_dim=512"):
        DynamicsWindows(root / "raw", 3, task_embeddings={"cheetah-run": emb})


def test_missing_partition_is_an_error_naming_it_and_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"partition directory .*expert does not exist.*--partitions expert"):
        DynamicsWindows(tmp_path / "expert", 3)
    with pytest.raises(FileNotFoundError, match=r"expert-shards does not exist.*--partitions expert "):
        TokenizerWindows(tmp_path / "expert-shards", 3)


def test_unknown_or_absent_task_is_an_error_naming_it(dataset):
    root, _ = dataset
    with pytest.raises(UnknownTaskError, match="'cheetah-rn'.*cheetah-run"):
        DynamicsWindows(root / "raw", 3, tasks=["cheetah-rn"])
    with pytest.raises(FileNotFoundError, match="task 'walker-walk' is not in"):
        TokenizerWindows(root / "shards-webp", 3, tasks=["walker-walk"])


def test_shard_dir_as_data_dir_and_stale_shards_are_explained(dataset, tmp_path):
    root, eps = dataset
    with pytest.raises(ValueError, match="is a shard directory.*frame_dirs"):
        DynamicsWindows(root / "shards-webp", 3)
    write_episodes(tmp_path, "cheetah-run", eps["cheetah-run"][:2])
    with pytest.raises(ValueError, match="describes 17 frames but .* holds 22.*rerun preprocess"):
        DynamicsWindows(tmp_path, 3, frame_dirs=[root / "shards-raw"], tasks=["cheetah-run"])


def test_windows_batch_through_a_dataloader(dataset):
    root, _ = dataset
    ds = DynamicsWindows(root / "raw", 3, frame_dirs=[root / "shards-webp"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True)))
    assert batch["obs"].shape == (5, 4, 3, 16, 16) and batch["act"].shape == (5, 3, 16)
    assert batch["has_lang"].dtype == torch.bool
