"""Loader throughput (frames/s) and size on disk for each frame format: raw PNG strips, .pt and .chunks shards.

    .venv/bin/python bench/bench_loader.py                          # synthetic 64 px episodes
    .venv/bin/python bench/bench_loader.py --size 224 --frames 4096
    .venv/bin/python bench/bench_loader.py --raw-dir data/val --task cheetah-run   # a real partition

Without --raw-dir it writes smooth synthetic episodes (a lit ball moving over a gradient floor, like a
rendered simulator frame, so PNG/WebP compress realistically) to a temporary directory. Windows are drawn
at random, as training draws them, with ``samples_per_shard`` locality as in the reference defaults.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmbench2_lab.data import DynamicsWindows, RawWriter, TokenizerWindows, preprocess
from mmbench2_lab.data.sampling import make_sampler


def synthetic_episode(rng: np.random.Generator, steps: int, size: int) -> np.ndarray:
    """(steps+1, size, size, 3) uint8: a shaded ball on a gradient floor, moving smoothly."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    floor = np.stack([0.3 + 0.4 * yy, 0.35 + 0.2 * xx, 0.5 - 0.2 * yy], -1)
    pos, vel = rng.uniform(0.2, 0.8, 2), rng.normal(0, 0.02, 2)
    frames = []
    for _ in range(steps + 1):
        vel = np.clip(vel + rng.normal(0, 0.004, 2), -0.05, 0.05)
        pos = np.clip(pos + vel, 0.1, 0.9)
        d2 = (yy - pos[0]) ** 2 + (xx - pos[1]) ** 2
        ball = np.clip(1 - d2 / 0.01, 0, 1)[..., None]
        frames.append(floor * (1 - ball) + ball * np.array([0.9, 0.4, 0.2]))
    return (np.stack(frames) * 255).astype(np.uint8)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def throughput(ds, samples: int, samples_per_shard: int, frames_per_item: int) -> float:
    """Frames per second of random window reads (one process, no DataLoader workers)."""
    idx = list(make_sampler(ds, num_samples=samples, samples_per_shard=samples_per_shard, seed=0))
    ds[idx[0]]  # open files / caches outside the timing
    t0 = time.perf_counter()
    for i in idx:
        ds[i]
    return samples * frames_per_item / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-dir", type=Path, help="an existing raw partition (default: synthetic data)")
    p.add_argument("--task", default="cheetah-run", help="task to write or read")
    p.add_argument("--size", type=int, default=64, help="synthetic frame size")
    p.add_argument("--frames", type=int, default=4000, help="synthetic frames (episodes of --episode-steps)")
    p.add_argument("--episode-steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=16, help="window length T")
    p.add_argument("--samples", type=int, default=200, help="windows read per format")
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--chunk-frames", type=int, default=16)
    p.add_argument("--keep", action="store_true", help="keep the written files (default: delete them)")
    args = p.parse_args()
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    raw_dir = args.raw_dir
    if raw_dir is None:
        raw_dir, rng = work / "raw", np.random.default_rng(0)
        t0 = time.perf_counter()
        with RawWriter(raw_dir, args.task) as w:
            for _ in range(max(1, args.frames // (args.episode_steps + 1))):
                frames = synthetic_episode(rng, args.episode_steps, args.size)
                w.add_episode(frames, rng.uniform(-1, 1, (args.episode_steps, 16)), rng.normal(size=args.episode_steps))
        print(f"wrote synthetic raw data in {time.perf_counter() - t0:.1f}s")
    sources = {"raw PNG strips": raw_dir}
    for codec, name in (("raw", ".pt shards"), ("webp", ".chunks shards")):
        out = work / f"shards-{codec}"
        t0 = time.perf_counter()
        preprocess(raw_dir, out, [args.task], codec=codec, shard_size=args.shard_size,
                   chunk_frames=args.chunk_frames, progress=False)
        print(f"preprocess {name}: {time.perf_counter() - t0:.1f}s")
        sources[name] = out

    n_frames = len(DynamicsWindows(raw_dir, 1, tasks=[args.task]).episodes(args.task))
    print(f"\n{args.task}: {n_frames} frames, windows of T={args.seq_len}, {args.samples} random windows per format, "
          f"samples_per_shard={args.samples_per_shard}")
    print(f"{'format':18} {'on disk':>10} {'bytes/frame':>12} {'tokenizer f/s':>14} {'dynamics f/s':>13}")
    for name, path in sources.items():
        size = disk_bytes(path) if path != raw_dir else sum(
            f.stat().st_size for f in raw_dir.glob(f"{args.task}*") if f.suffix in (".png", ".pt"))
        tok = TokenizerWindows(path, args.seq_len, tasks=[args.task])
        dyn = DynamicsWindows(raw_dir, args.seq_len, frame_dirs=[path], tasks=[args.task])
        tok_fps = throughput(tok, args.samples, args.samples_per_shard, args.seq_len)
        dyn_fps = throughput(dyn, args.samples, args.samples_per_shard, args.seq_len + 1)
        print(f"{name:18} {size / 2**20:>8.1f}MB {size / n_frames:>12.0f} {tok_fps:>14.0f} {dyn_fps:>13.0f}")
    if args.keep:
        print(f"\n(files under {work})")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
