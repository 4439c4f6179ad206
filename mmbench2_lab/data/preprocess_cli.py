"""``mmbench2-lab preprocess``: raw partition (PNG strips) -> frame shards with a completion index."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raw_dir", help="raw partition directory holding <task>.pt and <task>-<i>.png")
    parser.add_argument("out_dir", nargs="?", help="shard root to write (default: RAW_DIR-shards)")
    parser.add_argument("--tasks", nargs="+", help="only these tasks (default: every <task>.pt in RAW_DIR)")
    parser.add_argument("--codec", choices=("webp", "raw"), default="webp",
                        help="webp: lossless chunked .chunks (10-30x smaller); raw: uint8 .pt shards")
    parser.add_argument("--size", type=int, help="resize frames to SIZE x SIZE (bilinear); default: keep")
    parser.add_argument("--shard-size", type=int, default=4096, help="frames per shard file")
    parser.add_argument("--chunk-frames", type=int, default=16, help="frames per WebP chunk (.chunks only)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one task at a time each")


def run(args: argparse.Namespace) -> int:
    from mmbench2_lab.data.shards import preprocess

    out_dir = args.out_dir or args.raw_dir.rstrip("/") + "-shards"
    done = preprocess(args.raw_dir, out_dir, args.tasks, workers=args.workers, size=args.size, codec=args.codec,
                      shard_size=args.shard_size, chunk_frames=args.chunk_frames)
    wrote = sum(done.values())
    print(f"{out_dir}: {wrote} task(s) preprocessed, {len(done) - wrote} already complete")
    return 0
