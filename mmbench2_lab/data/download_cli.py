"""``mmbench2-lab download``: fetch MMBench2 partitions (or some tasks of them) from the Hugging Face Hub."""
from __future__ import annotations

import argparse

from mmbench2_lab.data.hub import PARTITIONS, REPO_ID


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partitions", nargs="+", metavar="NAME",
                        help=f"partitions to fetch ({', '.join(PARTITIONS)}); default: all")
    parser.add_argument("--tasks", nargs="+", help="only these tasks (default: every task)")
    parser.add_argument("--local-dir", default="data", help="where the partitions go (default: ./data)")
    parser.add_argument("--repo-id", default=REPO_ID, help="Hub dataset repository")
    parser.add_argument("--revision", help="branch, tag or commit of the dataset repository")
    parser.add_argument("--offline", action="store_true",
                        help="use only files already in --local-dir or the Hugging Face cache (as HF_HUB_OFFLINE=1)")


def run(args: argparse.Namespace) -> int:
    from mmbench2_lab.data.hub import download_dataset

    root = download_dataset(args.partitions, args.tasks, args.local_dir, repo_id=args.repo_id,
                            revision=args.revision, local_files_only=args.offline)
    print(f"MMBench2 ready in {root}")
    return 0
