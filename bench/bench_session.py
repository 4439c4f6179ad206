"""Interactive steps per second on this CPU: RolloutSession.step with every predictor on (target 15+).

    .venv/bin/python bench/bench_session.py [--task cheetah-run] [--steps 40] [--threads 1 2]

The model is the bundled one, or the tiny preset with random weights when it is not installed. Each step
samples the next frame with the interactive settings (K = 8, tau_ctx 0.01, warm start 0.125, 2 seeds, the
model's context window) and computes u_r, u_f, u_s. Settings, timed round-robin so load on the machine hits them
alike (median per step after the context has filled). Wall time is what a user sees on this machine now;
CPU time is the process's compute per step, so 1 / CPU time is the rate on an otherwise idle core (the two
agree on an idle machine with one thread; on a busy one, wall time grows and CPU time does not):
  scalars:       the three predictors and the state (the session default: context keys/values cached)
  no-ctx-cache:  scalars with the whole context re-run every step, as the reference demo (the baseline)
  maps:          + the u_r / u_f / u_s pixel maps (the overlay)
  side-by-side:  scalars + stepping and rendering the real simulator with the same action
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmbench2_lab.session import RolloutSession

TARGET = 15.0  # steps per second


def load_model():
    from mmbench2_lab.checkpoints import load_pretrained
    try:
        return "bundled", load_pretrained("bundled")
    except FileNotFoundError:
        from mmbench2_lab.config import preset
        from mmbench2_lab.model import WorldModel
        torch.manual_seed(0)
        return "tiny (random weights; no bundled model)", WorldModel(preset("tiny")).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cheetah-run", help="the task whose reset starts each session")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per setting (median reported)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help=f"torch intra-op thread counts to time (this machine's default: {torch.get_num_threads()})")
    args = parser.parse_args(argv)

    name, model = load_model()
    ctx = model.config.sampler.ctx_window
    sessions = {"scalars": RolloutSession(model, args.task),
                "no-ctx-cache": RolloutSession(model, args.task, cache_context=False),
                "maps": RolloutSession(model, args.task, maps=True),
                "side-by-side": RolloutSession(model, args.task, side_by_side=True)}
    print(f"model {name}; task {args.task}; torch {torch.__version__}; {ctx}-frame context, median of "
          f"{args.steps} steps")
    print(f"{'threads':>7} {'setting':>13} {'wall ms':>8} {'steps/s':>8} {'CPU ms':>8} {'steps/s idle':>13}")
    keys = [{"ArrowRight"}, {"ArrowUp", "d"}, set(), {"ArrowLeft", "w"}]
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        for s in sessions.values():  # fill the context so every timed step sees the full window
            s.reset()
            for i in range(ctx):
                s.step(keys=keys[i % len(keys)])
        wall, cpu = {label: [] for label in sessions}, {label: [] for label in sessions}
        for i in range(args.steps):
            for label, s in sessions.items():
                w, c = time.perf_counter(), time.process_time()
                s.step(keys=keys[i % len(keys)])
                wall[label].append(time.perf_counter() - w)
                cpu[label].append(time.process_time() - c)
        for label in sessions:
            w, c = statistics.median(wall[label]), statistics.median(cpu[label])
            mark = "" if 1 / w >= TARGET else f"  (wall: below the {TARGET:g} steps/s target)"
            print(f"{threads:>7} {label:>13} {w * 1e3:>8.1f} {1 / w:>8.1f} {c * 1e3:>8.1f} {1 / c:>13.1f}{mark}")
        base = statistics.median(cpu["no-ctx-cache"]) / statistics.median(cpu["scalars"])
        print(f"{threads:>7} context cache: {base:.2f}x the steps per CPU-second of re-running the context")
    for s in sessions.values():
        s.close()


if __name__ == "__main__":
    main()
