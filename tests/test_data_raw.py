"""The raw layout: <task>.pt + <task>-<i>.png strips, read and written exactly as the reference does."""
import numpy as np
import pytest
import torch
from PIL import Image

from _data_fixtures import all_frames_chw, make_episodes, write_episodes
from mmbench2_lab.data.raw import RawWriter, StripFrames, read_raw, strip_paths
from mmbench2_lab.tasks import UnknownTaskError


def test_writer_stores_incoming_convention_with_nan_at_episode_starts(tmp_path):
    eps = make_episodes("cheetah-run", [3, 5])
    write_episodes(tmp_path, "cheetah-run", eps)
    raw = read_raw(tmp_path, "cheetah-run")
    assert raw.episode.tolist() == [0] * 4 + [1] * 6
    assert raw.action.shape == (10, 16) and raw.action.dtype == torch.float32
    for start, ep in ((0, eps[0]), (4, eps[1])):
        t = len(ep["rewards"])
        assert torch.isnan(raw.action[start]).all() and torch.isnan(raw.reward[start])
        np.testing.assert_array_equal(raw.action[start + 1:start + 1 + t, :6].numpy(), ep["actions"])
        assert (raw.action[start + 1:start + 1 + t, 6:] == 0).all()
        np.testing.assert_array_equal(raw.reward[start + 1:start + 1 + t].numpy(), ep["rewards"])
    assert not raw.terminated.any()


def test_png_strips_hold_frames_in_order_and_split_at_frames_per_strip(tmp_path):
    eps = make_episodes("cheetah-run", [4, 6, 3])
    write_episodes(tmp_path, "cheetah-run", eps, frames_per_strip=5)
    frames = all_frames_chw(eps)
    paths = strip_paths(tmp_path, "cheetah-run")
    assert [Image.open(p).size for p in paths] == [(80, 16), (80, 16), (80, 16), (16, 16)]  # 16 frames, 5/strip
    strip0 = np.asarray(Image.open(paths[0]))  # (H, 5*W, 3) RGB, frame k at columns k*W..(k+1)*W
    np.testing.assert_array_equal(strip0[:, 16:32], frames[1].transpose(1, 2, 0))
    np.testing.assert_array_equal(StripFrames(tmp_path, "cheetah-run").read(3, 14).numpy(), frames[3:14])


def test_reads_reference_written_files_with_task_width_and_1d_actions(tmp_path):
    # The reference writes with torch.save; actions may be (N, action_dim) or 1-D, and `obs` may be present.
    n = 6
    ep = torch.tensor([0, 0, 0, 1, 1, 1])
    act6 = torch.randn(n, 6)
    act6[[0, 3]] = float("nan")
    torch.save({"episode": ep, "action": act6, "reward": torch.randn(n), "terminated": torch.zeros(n, dtype=bool),
                "obs": torch.randn(n, 17)}, tmp_path / "cheetah-run.pt")
    raw = read_raw(tmp_path, "cheetah-run")
    assert raw.action.shape == (6, 16) and raw.obs.shape == (6, 17)
    torch.testing.assert_close(raw.action[:, :6], act6, equal_nan=True)
    assert (raw.action[1:3, 6:] == 0).all()

    torch.save({"episode": ep, "action": torch.randn(n), "reward": torch.randn(n, 1),
                "terminated": torch.zeros(n, dtype=bool)}, tmp_path / "pendulum-swingup.pt")
    raw = read_raw(tmp_path, "pendulum-swingup")
    assert raw.action.shape == (6, 16) and raw.reward.shape == (6,)


def test_action_of_wrong_width_is_an_error_naming_the_shape(tmp_path):
    n = 4
    torch.save({"episode": torch.zeros(n, dtype=torch.int64), "action": torch.zeros(n, 5),
                "reward": torch.zeros(n)}, tmp_path / "cheetah-run.pt")
    with pytest.raises(ValueError, match=r"action has shape \(4, 5\).*\(N, 16\).*\(N, 6\)"):
        read_raw(tmp_path, "cheetah-run")
    w = RawWriter(tmp_path / "new", "cheetah-run")
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"actions have shape \(3, 5\)"):
        w.add_episode(frames, np.zeros((3, 5)), np.zeros(3))
    with pytest.raises(ValueError, match="rewards have 2 entries; expected 3"):
        w.add_episode(frames, np.zeros((3, 6)), np.zeros(2))


def test_unknown_task_is_an_error_with_suggestions(tmp_path):
    with pytest.raises(UnknownTaskError, match="cheetah-run"):
        RawWriter(tmp_path, "cheetah-rn")


def test_append_continues_episode_ids_and_strips(tmp_path):
    eps = make_episodes("cheetah-run", [3, 4, 5, 2])
    write_episodes(tmp_path, "cheetah-run", eps[:2], frames_per_strip=6)
    write_episodes(tmp_path, "cheetah-run", eps[2:], frames_per_strip=6, append=True)
    raw = read_raw(tmp_path, "cheetah-run")
    assert torch.unique(raw.episode).tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(StripFrames(tmp_path, "cheetah-run").read(0, len(raw)).numpy(), all_frames_chw(eps))
    with pytest.raises(ValueError, match="exists; pass append=True"):
        RawWriter(tmp_path, "cheetah-run")


def test_frames_written_after_the_last_pt_are_discarded_on_resume(tmp_path):
    # A crash after the strips but before the .pt leaves extra frames on disk; the .pt stays authoritative.
    eps = make_episodes("cheetah-run", [3, 3, 3])
    write_episodes(tmp_path, "cheetah-run", eps[:1], frames_per_strip=4)
    committed = (tmp_path / "cheetah-run.pt").read_bytes()
    write_episodes(tmp_path, "cheetah-run", eps[1:2], frames_per_strip=4, append=True)
    (tmp_path / "cheetah-run.pt").write_bytes(committed)  # as if the .pt write never happened
    assert len(read_raw(tmp_path, "cheetah-run")) == 4
    assert len(StripFrames(tmp_path, "cheetah-run")) == 8  # the orphaned frames are still in the strips
    write_episodes(tmp_path, "cheetah-run", eps[2:], frames_per_strip=4, append=True)
    raw = read_raw(tmp_path, "cheetah-run")
    assert raw.episode.tolist() == [0] * 4 + [1] * 4
    expected = all_frames_chw([eps[0], eps[2]])
    np.testing.assert_array_equal(StripFrames(tmp_path, "cheetah-run").read(0, 8).numpy(), expected)
    assert len(strip_paths(tmp_path, "cheetah-run")) == 2


def test_frame_size_must_match_the_directory(tmp_path):
    write_episodes(tmp_path, "cheetah-run", make_episodes("cheetah-run", [2], size=16))
    with RawWriter(tmp_path, "cheetah-run", append=True) as w:
        with pytest.raises(ValueError, match="holds 16x16 frames; collect at --size 16"):
            w.add_episode(np.zeros((3, 8, 8, 3), np.uint8), np.zeros((2, 6)), np.zeros(2))


def test_unreadable_task_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "cheetah-run.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"cheetah-run\.pt does not load with torch\.load\(weights_only=True\)"):
        read_raw(tmp_path, "cheetah-run")
