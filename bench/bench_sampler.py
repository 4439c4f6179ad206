"""Sampler speed on this machine: ms per generated frame with and without the KV cache, and how much of
the machine's matmul throughput the dynamics reaches.

    .venv/bin/python bench/bench_sampler.py [--presets tiny small] [--ctx 24] [--batch 1] [--threads N]

Each preset's dynamics (random weights: speed does not depend on them) predicts one frame after ``--ctx``
context frames with the preset's sampler settings (K Euler steps). Utilisation = estimated matmul FLOPs /
time / peak, where the peak is the best fp32 square-matmul rate measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import torch

from mmbench2_lab.config import DynamicsConfig, preset
from mmbench2_lab.model import WorldModel
from mmbench2_lab.sampler import sample_next


def matmul_peak(seconds: float = 0.5) -> float:
    """Best fp32 matmul rate (FLOP/s) over a few square sizes."""
    best = 0.0
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


def forward_flops(cfg: DynamicsConfig, batch: int, frames: int, keys: int) -> float:
    """Matmul FLOPs of one dynamics forward over ``frames`` new frames whose time attention sees ``keys``
    frames (keys = frames without a cache). Attention counts the full score rectangle."""
    D, S, h = cfg.d_model, 2 + cfg.n_spatial + cfg.n_register + cfg.n_agent, int(cfg.d_model * cfg.mlp_ratio * 2 / 3)
    tokens = batch * frames * S
    per_layer = 2 * tokens * (3 * D * D + D * D + 2 * h * D + h * D) + 4 * tokens * S * D
    time_layers = sum((i + 1) % cfg.time_every == 0 for i in range(cfg.depth))
    time_attn = time_layers * (2 * tokens * (4 * D * D) + 4 * tokens * keys * D)  # qkv/out + scores/values
    io = 2 * batch * frames * (2 * cfg.n_spatial * cfg.d_spatial * D + cfg.action_dim * 2 * D + 2 * D * D)
    return cfg.depth * per_layer + time_attn + io


def time_frame(wm: WorldModel, batch: int, ctx: int, kv_cache: bool, repeats: int) -> float:
    """Median seconds to sample one frame."""
    c, sc = wm.config.dynamics, wm.config.sampler
    context = torch.randn(batch, ctx, c.n_spatial, c.d_spatial).tanh()
    actions = torch.rand(batch, ctx + 1, c.action_dim) * 2 - 1
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        sample_next(wm.dynamics, context, actions, steps=sc.steps, tau_ctx=sc.tau_ctx, kv_cache=kv_cache, generator=g)
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], help="config presets to time")
    parser.add_argument("--ctx", type=int, default=24, help="context frames before the new one")
    parser.add_argument("--batch", type=int, default=1, help="frames sampled in parallel (seeds x candidates)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per setting (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'preset':8} {'K':>2} {'kv cache':>8} {'ms/frame':>9} {'GFLOP/frame':>12} {'GFLOP/s':>8} {'util':>6}")
    with torch.no_grad():
        for name in args.presets:
            wm = WorldModel(preset(name)).eval()
            c, K, B, t = wm.config.dynamics, wm.config.sampler.steps, args.batch, args.ctx
            flops = {True: forward_flops(c, B, t, t) + K * forward_flops(c, B, 1, t + 1),
                     False: K * forward_flops(c, B, t + 1, t + 1)}
            for kv in (True, False):
                sec = time_frame(wm, B, t, kv, args.repeats)
                rate = flops[kv] / sec
                print(f"{name:8} {K:>2} {'on' if kv else 'off':>8} {sec * 1e3 / B:>9.1f} {flops[kv] / B / 1e9:>12.3f} "
                      f"{rate / 1e9:>8.1f} {rate / peak:>6.1%}")


if __name__ == "__main__":
    main()
