"""What the hallucination predictors cost: wall time of one rollout step with and without them, on this CPU.

    .venv/bin/python bench/bench_predictors.py [--presets tiny] [--ctx 8 24] [--repeats 15] [--threads N]

Per model (each preset with random weights, plus the bundled model when it is installed) and context length:
  (a) plain:    sample_next with 1 seed + decode of the new frame (what a rollout without predictors does)
  (b) scalars:  predict_next with 2 seeds: u_r, u_f, u_s (+ motion and the normalised values)
  (c) maps:     predict_next with 2 seeds and the three pixel maps
and the ratios (b)/(a) (target <= 1.5) and (c)/(a). All calls (with the parts of ``--breakdown``) are timed
round-robin in one run, so load on the machine hits them alike; each figure is the median of ``--repeats``
calls after a warm-up.
``--breakdown`` also times the parts of (b): 2 seeds sharing one context prefill (predict_next) and with a
prefill per seed (the reference), the prefill alone, the decode, the re-encode for u_r.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmbench2_lab.config import preset
from mmbench2_lab.model import WorldModel
from mmbench2_lab.predictors import predict_next, reencode
from mmbench2_lab.sampler import expand_seeds, sample_next


def step_inputs(wm: WorldModel, ctx: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, ctx, S, D) context of latents in (-1, 1) and (1, ctx + 1, 16) led-to actions."""
    c = wm.config.dynamics
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, ctx, c.n_spatial, c.d_spatial, generator=g).tanh(),
            torch.rand(1, ctx + 1, c.action_dim, generator=g) * 2 - 1)


def plain_step(wm: WorldModel, context: torch.Tensor, actions: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(a): one seed, no predictors; the new frame decoded for display."""
    sc = wm.config.sampler
    s = sample_next(wm.dynamics, context, actions, steps=sc.steps, tau_ctx=sc.tau_ctx, tau_init=sc.tau_init,
                    z_prev=context[:, -1], kv_cache=sc.kv_cache, generator=g)
    return wm.decode(s.z[:, None])


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, called round-robin after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def breakdown(wm: WorldModel, context: torch.Tensor, actions: torch.Tensor) -> dict:
    """Calls that time the parts of (b): sampling 2 seeds that share one context prefill (as predict_next
    does), the same with the context expanded per seed (the reference's way: a prefill and a context
    corruption per seed), the prefill alone, the decode and the re-encode for u_r."""
    sc, dc, N = wm.config.sampler, wm.config.dynamics, 2
    g = torch.Generator().manual_seed(0)
    kw = dict(steps=sc.steps, tau_ctx=sc.tau_ctx, tau_init=sc.tau_init, kv_cache=sc.kv_cache, generator=g)
    z = sample_next(wm.dynamics, context, actions, **kw).z
    frame = wm.decode(z[:, None])[:, 0]
    t = context.shape[1]
    return {
        "sample, 1 seed": lambda: sample_next(wm.dynamics, context, actions, z_prev=context[:, -1], **kw),
        "sample, 2 seeds, 1 prefill": lambda: sample_next(wm.dynamics, context, actions, z_prev=context[:, -1],
                                                          n_seeds=N, **kw),
        "sample, 2 seeds, 2 prefills": lambda: sample_next(wm.dynamics, expand_seeds(context, N),
                                                           expand_seeds(actions, N),
                                                           z_prev=expand_seeds(context[:, -1], N), **kw),
        "context prefill": lambda: wm.dynamics(actions[:, :t], torch.full((1, t), dc.emax), torch.full((1, t), dc.k_max),
                                               context, return_kv_cache=True),
        "decode 1 frame": lambda: wm.decode(z[:, None]),
        "re-encode 1 frame (u_r)": lambda: reencode(wm.tokenizer, frame, wm.packing_factor),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="config presets to time (random weights)")
    parser.add_argument("--no-bundled", action="store_true", help="skip the bundled model even if installed")
    parser.add_argument("--ctx", nargs="+", type=int, default=[8, 24],
                        help="context lengths (8: calibration rollouts; 24: the interactive sampler's window)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per setting (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of (b)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {}
    for name in args.presets:
        torch.manual_seed(0)
        models[name] = WorldModel(preset(name)).eval()
    if not args.no_bundled:
        from mmbench2_lab.checkpoints import load_pretrained
        try:
            models["bundled"] = load_pretrained("bundled")
        except FileNotFoundError as err:
            print(f"(no bundled model: {str(err).split(';')[0]})")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} calls, ms per step")
    print(f"{'model':8} {'ctx':>4} {'K':>2} {'(a) plain':>10} {'(b) scalars':>12} {'(c) maps':>9} "
          f"{'(b)/(a)':>8} {'(c)/(a)':>8}")
    with torch.inference_mode():
        for name, wm in models.items():
            for ctx in args.ctx:
                context, actions = step_inputs(wm, ctx)
                g = torch.Generator().manual_seed(0)
                calls = {
                    "a": lambda: plain_step(wm, context, actions, g),
                    "b": lambda: predict_next(wm, context, actions, n_seeds=2, generator=g),
                    "c": lambda: predict_next(wm, context, actions, n_seeds=2, generator=g, maps=True),
                }
                if args.breakdown:
                    calls.update(breakdown(wm, context, actions))
                t = median_times(calls, args.repeats)
                print(f"{name:8} {ctx:>4} {wm.config.sampler.steps:>2} {t['a'] * 1e3:>10.2f} {t['b'] * 1e3:>12.2f} "
                      f"{t['c'] * 1e3:>9.2f} {t['b'] / t['a']:>8.2f} {t['c'] / t['a']:>8.2f}")
                if args.breakdown:
                    for part in list(calls)[3:]:
                        print(f"{'':14}{part:28} {t[part] * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
