"""Frame shards: both formats bit-exact, the reference's .chunks readable, corruption and interruption caught."""
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _data_fixtures import all_frames_chw, make_episodes, write_episodes
from mmbench2_lab.data.shards import (ChunkedShard, CorruptShardError, ShardFrames, list_shards, load_shard,
                                      preprocess, preprocess_task, read_index, resize_frames, write_shard)

FIXTURES = Path(__file__).parent / "fixtures" / "data_plane"


def expected_fixture_frames(n=11, size=8):
    """The frames in reference_cv2.chunks (see make_reference_chunks.py): channel-dependent values."""
    k, c, y, x = np.meshgrid(np.arange(n), np.arange(3), np.arange(size), np.arange(size), indexing="ij")
    return ((k * 37 + c * 80 + y * 11 + x * 3) % 256).astype(np.uint8)


def random_frames(n, size=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def _header(path):
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<I", raw[8:12])
    return json.loads(raw[12:12 + hlen]), 12 + hlen


@pytest.mark.parametrize("codec,suffix", [("raw", ".pt"), ("webp", ".chunks")])
def test_both_shard_formats_round_trip_bit_exact(tmp_path, codec, suffix):
    frames = random_frames(37)
    path = tmp_path / f"t_shard0000{suffix}"
    assert write_shard(frames, path, codec, chunk_frames=8) == 37
    shard = load_shard(path)
    assert tuple(shard.shape) == (37, 3, 16, 16)
    assert torch.equal(shard[:], frames)
    assert torch.equal(shard[5:21], frames[5:21]) and torch.equal(shard[36], frames[36])


def test_chunked_header_matches_the_reference_layout(tmp_path):
    path = tmp_path / "t_shard0000.chunks"
    write_shard(random_frames(20), path, chunk_frames=8)
    assert path.read_bytes()[:8] == b"WMCHUNK1"
    header, base = _header(path)
    assert {k: header[k] for k in ("format", "version", "codec", "num_frames", "H", "W", "chunk_frames")} == {
        "format": "wm-chunked", "version": 1, "codec": "webp", "num_frames": 20, "H": 16, "W": 16,
        "chunk_frames": 8}
    assert [c[2] for c in header["chunks"]] == [8, 8, 4]
    assert header["chunks"][1][0] == header["chunks"][0][1]  # offsets are relative to the first blob
    blob = path.read_bytes()[base + header["chunks"][2][0]:base + header["chunks"][2][0] + header["chunks"][2][1]]
    assert zlib.crc32(blob) == header["crc32"][2]


def test_reads_a_chunks_file_encoded_like_the_reference(tmp_path):
    shard = ChunkedShard(FIXTURES / "reference_cv2.chunks")  # OpenCV, BGR-flipped input, quality 101
    np.testing.assert_array_equal(shard[:].numpy(), expected_fixture_frames())


def test_chunk_blobs_store_rgb_in_the_same_pixel_order_as_the_reference(tmp_path):
    # Any standard decoder must see the same image in our blobs as in the reference's.
    ref_header, ref_base = _header(FIXTURES / "reference_cv2.chunks")
    path = tmp_path / "t_shard0000.chunks"
    write_shard(torch.from_numpy(expected_fixture_frames()), path, chunk_frames=4)
    ours_header, ours_base = _header(path)
    for path_, header, base in ((FIXTURES / "reference_cv2.chunks", ref_header, ref_base), (path, ours_header, ours_base)):
        off, nb, n = header["chunks"][0]
        strip = np.asarray(Image.open(BytesIO(path_.read_bytes()[base + off:base + off + nb])))
        np.testing.assert_array_equal(strip[:, :8], expected_fixture_frames()[0].transpose(1, 2, 0))


def test_crc_mismatch_names_the_file_and_the_chunk(tmp_path):
    path = tmp_path / "t_shard0000.chunks"
    write_shard(random_frames(24), path, chunk_frames=8)
    header, base = _header(path)
    data = bytearray(path.read_bytes())
    data[base + header["chunks"][1][0] + header["chunks"][1][1] // 2] ^= 0x01  # flip a bit inside chunk 1
    path.write_bytes(bytes(data))
    shard = ChunkedShard(path)
    assert torch.equal(shard[0:8], random_frames(24)[0:8])  # chunk 0 untouched: a read touches only its chunks
    with pytest.raises(CorruptShardError, match=r"t_shard0000\.chunks: chunk 1 fails its CRC32 check"):
        shard[6:10]


def test_truncated_shards_are_errors_naming_the_file(tmp_path):
    path = tmp_path / "t_shard0000.chunks"
    write_shard(random_frames(24), path, chunk_frames=8)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptShardError, match=r"t_shard0000\.chunks: truncated"):
        ChunkedShard(path)
    pt = tmp_path / "t_shard0000.pt"
    write_shard(random_frames(4), pt, "raw")
    pt.write_bytes(pt.read_bytes()[:200])
    with pytest.raises(CorruptShardError, match=r"t_shard0000\.pt: cannot be loaded"):
        load_shard(pt)


def test_webp_width_limit_is_checked_before_writing(tmp_path):
    with pytest.raises(ValueError, match="1 to 73 frames per chunk"):
        write_shard(torch.zeros(2, 3, 224, 224, dtype=torch.uint8), tmp_path / "x.chunks", chunk_frames=74)


@pytest.mark.parametrize("codec", ["raw", "webp"])
def test_preprocess_writes_shards_and_index_and_reads_back_exact(tmp_path, codec):
    eps = make_episodes("cheetah-run", [6, 9, 4])
    write_episodes(tmp_path / "raw", "cheetah-run", eps, frames_per_strip=7)
    done = preprocess(tmp_path / "raw", tmp_path / "shards", codec=codec, shard_size=8, chunk_frames=3,
                      progress=False)
    assert done == {"cheetah-run": True}
    task_dir = tmp_path / "shards" / "cheetah-run"
    ext = ".pt" if codec == "raw" else ".chunks"
    assert read_index(task_dir) == {f"cheetah-run_shard000{i}{ext}": n for i, n in enumerate([8, 8, 6])}
    assert [p.name for p in list_shards(task_dir)] == list(read_index(task_dir))
    frames = ShardFrames(task_dir)
    np.testing.assert_array_equal(frames.read(0, 22).numpy(), all_frames_chw(eps))
    np.testing.assert_array_equal(frames.read(5, 19).numpy(), all_frames_chw(eps)[5:19])  # across shards
    assert preprocess(tmp_path / "raw", tmp_path / "shards", codec=codec, progress=False) == {"cheetah-run": False}


def test_preprocess_resizes_with_bilinear_truncation(tmp_path):
    eps = make_episodes("cheetah-run", [3], size=16)
    write_episodes(tmp_path / "raw", "cheetah-run", eps)
    preprocess_task(tmp_path / "raw", tmp_path / "out", "cheetah-run", size=8, codec="raw")
    got = ShardFrames(tmp_path / "out" / "cheetah-run").read(0, 4)
    x = torch.nn.functional.interpolate(torch.from_numpy(all_frames_chw(eps)).float() / 255, size=(8, 8),
                                        mode="bilinear", align_corners=False)
    assert torch.equal(got, (x.clamp(0, 1) * 255).to(torch.uint8))
    assert torch.equal(resize_frames(got, 8), got)


def test_preprocess_killed_midway_leaves_no_index_and_a_rerun_completes(tmp_path):
    eps = make_episodes("cheetah-run", [30, 30])
    write_episodes(tmp_path / "raw", "cheetah-run", eps)
    # The child SIGKILLs itself while writing its third shard: no cleanup code gets to run.
    script = textwrap.dedent(f"""
        import os, signal
        from mmbench2_lab.data import shards
        real, calls = shards.write_shard, []
        def dying(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        shards.write_shard = dying
        shards.preprocess({str(tmp_path / 'raw')!r}, {str(tmp_path / 'shards')!r}, shard_size=8, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    task_dir = tmp_path / "shards" / "cheetah-run"
    assert len(list(task_dir.glob("*_shard*.chunks"))) == 2 and not (task_dir / "cheetah-run_index.json").exists()
    with pytest.raises(FileNotFoundError, match="preprocessing of task 'cheetah-run' did not finish"):
        ShardFrames(task_dir)
    assert preprocess(tmp_path / "raw", tmp_path / "shards", shard_size=8, progress=False) == {"cheetah-run": True}
    np.testing.assert_array_equal(ShardFrames(task_dir).read(0, 62).numpy(), all_frames_chw(eps))


def test_preprocess_failing_to_write_a_shard_leaves_no_index(tmp_path):
    write_episodes(tmp_path / "raw", "cheetah-run", make_episodes("cheetah-run", [20]))
    blocker = tmp_path / "shards" / "cheetah-run" / "cheetah-run_shard0001.pt"
    blocker.mkdir(parents=True)  # os.replace onto a directory fails: a real I/O error mid-run
    with pytest.raises(IsADirectoryError):
        preprocess_task(tmp_path / "raw", tmp_path / "shards", "cheetah-run", codec="raw", shard_size=8)
    task_dir = tmp_path / "shards" / "cheetah-run"
    assert (task_dir / "cheetah-run_shard0000.pt").is_file()  # it failed midway, after the first shard
    assert not (task_dir / "cheetah-run_index.json").exists() and not list(task_dir.glob(".*.tmp"))
