"""Training throughput on this machine: frames per second and matmul utilisation of one optimizer step of
the tokenizer and of the dynamics, for each preset.

    .venv/bin/python bench/bench_training.py [--presets tiny small] [--steps 5] [--threads N]
    .venv/bin/python bench/bench_training.py --presets small --max-pixels 0     # the preset's full batches (GPU)

Each step is what the trainers run (MAE masks and the patch MSE; shortcut flow matching with its bootstrap
rows), forward + backward + AdamW, on random inputs of the preset's shapes with the preset's batch and
window (random weights and data: speed does not depend on them). FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` on one step; utilisation = FLOPs / step time / peak, where the
peak is the best fp32 square-matmul rate measured in the same run. The paper preset's shapes need a GPU.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_sampler import matmul_peak
from mmbench2_lab.config import Config, preset
from mmbench2_lab.flow_matching import dynamics_pretrain_loss
from mmbench2_lab.model.dynamics import Dynamics
from mmbench2_lab.model.layers import patchify
from mmbench2_lab.model.tokenizer import Tokenizer
from mmbench2_lab.training.tokenizer import mae_masks, masked_patch_mse


def tokenizer_step(cfg: Config):
    """(step function, frames per step) for one tokenizer training step."""
    c, tc = cfg.tokenizer, cfg.tokenizer_train
    model = Tokenizer(c)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    frames = torch.rand(tc.batch_size, tc.seq_len, c.channels, c.height, c.width)
    g = torch.Generator().manual_seed(0)

    def step():
        patches = patchify(frames, c.patch)
        masked = mae_masks(patches.shape[:3], tc.mae_p_max, g)
        pred = model.decoder(model.encoder(patches, mae_mask=masked)[0])
        loss = masked_patch_mse(pred, patches, masked)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, tc.batch_size * tc.seq_len


def dynamics_step(cfg: Config):
    """(step function, frames per step) for one dynamics training step on cached latents."""
    c, tc = cfg.dynamics, cfg.dynamics_train
    model = Dynamics(c)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    B, T = tc.batch_size, tc.seq_len
    z1 = torch.rand(B, T, c.n_spatial, c.d_spatial) * 2 - 1
    actions = torch.rand(B, T, c.action_dim) * 2 - 1
    mask = torch.ones_like(actions)
    b_self = min(max(round(tc.self_fraction * B), 0), B - 1)
    g = torch.Generator().manual_seed(0)

    def step():
        loss, _ = dynamics_pretrain_loss(model, z1, actions, mask, b_self=b_self, step=1, bootstrap_start=0,
                                         generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, B * T


def measure(step, steps: int) -> tuple[float, float]:
    """(median seconds per step, matmul FLOPs of one step)."""
    step()  # warm up (allocations, AdamW state)
    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], help="config presets to time")
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU recipe of this project)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--max-pixels", type=int, default=16 * 128 * 128,
                   help="cap the tokenizer's pixels per step (batch x T x H x W) by shrinking its batch: the small "
                        "preset's full batch (256 frames at 128 px) needs more than 24 GB of CPU memory, 16 such "
                        "frames about 13 GB; 0 = no cap")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak()
    print(f"fp32 matmul peak, {args.threads} thread(s): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'preset':8} {'stage':10} {'batch x T':>10} {'s/step':>8} {'frames/s':>9} {'GFLOP/step':>11} "
          f"{'util':>6}")
    for name in args.presets:
        cfg = preset(name, args.set)
        tok = cfg.tokenizer_train
        if args.max_pixels:
            per_sequence = tok.seq_len * cfg.tokenizer.height * cfg.tokenizer.width
            tok.batch_size = max(1, min(tok.batch_size, args.max_pixels // per_sequence))
        for stage, build, tc in (("tokenizer", tokenizer_step, cfg.tokenizer_train),
                                 ("dynamics", dynamics_step, cfg.dynamics_train)):
            step, frames = build(cfg)
            seconds, flops = measure(step, args.steps)
            print(f"{name:8} {stage:10} {f'{tc.batch_size} x {tc.seq_len}':>10} {seconds:8.3f} "
                  f"{frames / seconds:9.0f} {flops / 1e9:11.2f} {flops / seconds / peak:6.1%}")


if __name__ == "__main__":
    main()
