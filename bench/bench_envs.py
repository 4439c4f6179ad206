"""Simulator speed on this machine: agent steps per second (step + render) per domain, at 224 and 64 px.

    .venv/bin/python bench/bench_envs.py [--tasks cheetah-run mw-push ...] [--steps 20] [--sizes 224 64]

For each task (default: one per runnable domain) ``make_env`` is built once per size, reset, and stepped
``--steps`` times with random actions after one warm-up step; "build" is construction plus the first
reset. A row with ``render=False`` (size "state") shows the simulator alone. Rendering through Mesa on a
CPU dominates the MuJoCo-based domains.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from mmbench2_lab.envs import is_runnable, make_env
from mmbench2_lab.tasks import get_task

DEFAULT_TASKS = ["cheetah-run", "mujoco-walker", "bipedal-walker-hills", "mw-push", "og-point-maze",
                 "atari-pong", "rd-push-red"]


def steps_per_second(task: str, size: int | None, steps: int) -> tuple[float, float]:
    """(build seconds, agent steps per second); ``size`` None means state only (no rendering)."""
    start = time.perf_counter()
    env = make_env(task, size=size or 224, render=size is not None, seed=0)
    env.reset()
    build = time.perf_counter() - start
    rng = np.random.default_rng(0)
    env.step(rng.uniform(-1, 1, 16).astype(np.float32))
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, 16).astype(np.float32))
    rate = steps / (time.perf_counter() - start)
    env.close()
    return build, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, help="MMBench2 task names")
    parser.add_argument("--steps", type=int, default=20, help="timed agent steps per measurement")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 64], help="frame sizes to time")
    args = parser.parse_args()

    sizes: list[int | None] = [*args.sizes, None]
    print(f"{'task':26} {'domain':10} " + " ".join(f"{'steps/s @' + str(s or 'state'):>16}" for s in sizes)
          + f" {'build s':>8}")
    for task in args.tasks:
        if not is_runnable(task):
            print(f"{task:26} (simulator not installed here)")
            continue
        results = [steps_per_second(task, size, args.steps) for size in sizes]
        print(f"{task:26} {get_task(task).domain:10} " + " ".join(f"{rate:16.1f}" for _, rate in results)
              + f" {results[0][0]:8.1f}", flush=True)


if __name__ == "__main__":
    main()
