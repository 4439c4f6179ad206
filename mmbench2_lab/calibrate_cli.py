"""``mmbench2-lab calibrate``: run a model on held-out windows and write its per-sequence calibration CSV.

The CSV has the paper's columns, so ``mmbench2-lab calibration-report FILE.csv`` (and the notebooks)
read it like the paper's own table.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bundled",
                        help="bundled, base, coverage_aware, combined, or a world-model folder")
    parser.add_argument("--data", nargs="+", required=True, help="held-out raw partitions to evaluate on")
    parser.add_argument("--tasks", nargs="*", help="only these tasks (default: every task in --data)")
    parser.add_argument("--out", required=True, help="CSV to write (the paper's columns, then ours if asked for)")
    parser.add_argument("--sequences", type=int, help="evenly spaced windows to evaluate (default: all)")
    parser.add_argument("--ctx", type=int, default=8, help="context frames")
    parser.add_argument("--horizon", type=int, default=16, help="frames rolled out open-loop")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per rollout (u_s needs 2+)")
    parser.add_argument("--independent-seeds", action="store_true",
                        help="roll each seed out on its own (u_s then also grows as the rollouts diverge); "
                             "default: every step's seeds branch from one followed history, as the reference")
    parser.add_argument("--seed-context-noise", action="store_true",
                        help="draw the context corruption (tau_ctx) per seed, as the reference's sampler does, "
                             "so u_s also measures sensitivity to the past; default: one draw shared by the "
                             "seeds (one context pass, cheaper)")
    parser.add_argument("--context-residual", action="store_true",
                        help="add a u_r_context column (ours, beyond the paper): the round-trip residual of the "
                             "last real context frame, high on scenes the tokenizer cannot draw")
    parser.add_argument("--motion", choices=("predicted", "truth"), default="predicted",
                        help="the m that normalises u: predicted (the released code's RMS(z_hat - z_prev), all a "
                             "live rollout has) or truth (measured on the real frames; the paper's table looks "
                             "normalised this way, see evaluation.MOTION_REFERENCES)")
    parser.add_argument("--motion-baseline", action="store_true",
                        help="add a u_const_norm column (ours): 1 / m alone, what the normaliser scores without "
                             "any predictor, to read the predictors' rho against")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    import torch

    from mmbench2_lab.calibration import calibration_stats, load_calibration, write_calibration_csv
    from mmbench2_lab.checkpoints import load_pretrained
    from mmbench2_lab.data.windows import DynamicsWindows
    from mmbench2_lab.evaluation import calibration_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(args.model).to(device)
    windows = DynamicsWindows(args.data, args.ctx + args.horizon - 1, tasks=args.tasks or None,
                              lang_dim=model.config.dynamics.lang_dim)
    rows = calibration_table(model, windows, n_sequences=args.sequences, ctx=args.ctx, horizon=args.horizon,
                             n_seeds=args.seeds, batch_size=args.batch_size,
                             shared_context=not args.independent_seeds, context_residual=args.context_residual,
                             seed_context_noise=args.seed_context_noise, motion_ref=args.motion,
                             motion_baseline=args.motion_baseline)
    path = write_calibration_csv(rows, args.out)
    print(f"wrote {len(rows)} sequences to {path} (u normalised by the {args.motion} motion)")
    for name, s in calibration_stats(load_calibration(path)).items():
        print(f"  {name:10} Spearman rho {s.spearman:+.3f}  AUROC {s.auroc:.3f}  (n={s.n})")
    return 0
