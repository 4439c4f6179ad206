"""``mmbench2-lab collect``: run a policy in live simulators and save the episodes in the raw layout."""
from __future__ import annotations

import argparse
import sys

from mmbench2_lab.collect import POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="one task, e.g. cheetah-run")
    which.add_argument("--tasks", nargs="+", help="several tasks")
    parser.add_argument("--episodes", type=int, required=True, help="episodes per task (total, counting resumed ones)")
    parser.add_argument("--policy", choices=POLICIES, default="random",
                        help="zero (no-op), random (U[-1,1]), brownian (smooth random walk), scripted (a few tasks)")
    parser.add_argument("--out", required=True, help="raw partition directory to write (<task>.pt + PNG strips)")
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels (224 official, 64 for tiny)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; each episode's seed derives from it")
    parser.add_argument("--max-steps", type=int, help="cut episodes after this many steps (default: the task's limit)")
    parser.add_argument("--workers", type=int, default=1, help="simulator processes")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted collection in --out")


def run(args: argparse.Namespace) -> int:
    from mmbench2_lab.collect import collect

    tasks = [args.task] if args.task else args.tasks
    try:
        added = collect(tasks, args.episodes, args.out, policy=args.policy, size=args.size, seed=args.seed,
                        max_steps=args.max_steps, workers=args.workers, resume=args.resume)
    except (ImportError, NotImplementedError) as err:  # a simulator that is missing or not supported here
        print(f"mmbench2-lab collect: error: {err}", file=sys.stderr)
        return 2
    for task, n in added.items():
        print(f"{task}: {n} episode(s) added to {args.out}")
    return 0
