"""``mmbench2-lab calibration-report``: how well each predictor ranks rollouts by ΔPSNR (per-sequence CSV)."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", nargs="?", metavar="FILE.csv",
                        help="per-sequence calibration table (columns task, seq_idx, predictor columns u_* or "
                             "*_norm, rollout_psnr_gain_db); default: the bundled paper base-model table")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object keyed by predictor column, each {spearman, auroc, n}, plus "
                             "combined_rank_mean / combined_logistic with held-out-task figures")
    parser.add_argument("--folds", type=int, default=5, help="task-grouped folds for the combined predictor")
    parser.add_argument("--seed", type=int, default=0, help="seed for dealing tasks into folds")
    parser.add_argument("--per-task", action="store_true", help="also print per-task ρ and AUROC as CSV")


def run(args: argparse.Namespace) -> int:
    from mmbench2_lab.calibration import (all_combined_stats, calibration_report, calibration_stats, gain_range,
                                          in_gain_range, load_calibration, paper_calibration, per_task_stats,
                                          predictor_agreement)

    df = load_calibration(args.csv)
    if args.json:
        print(json.dumps(calibration_report(df, args.folds, args.seed), indent=2))
        return 0
    stats = calibration_stats(df)
    combined = all_combined_stats(df, args.folds, args.seed)

    source = args.csv or "the bundled paper base-model table (calibration_perseq_base.csv)"
    print(f"calibration of {source}: {len(df)} sequences, {df['task'].nunique()} tasks")
    print(f"{'predictor':24} {'n':>6} {'Spearman rho':>12} {'AUROC':>7} {'dPSNR<0':>8} {'0 dB at u':>10}")
    for name, s in stats.items():
        print(f"{name:24} {s.n:>6} {s.spearman:>12.3f} {s.auroc:>7.3f} {s.n_hallucinating:>8} "
              f"{s.zero_crossing:>10.3f}")
    print("(rho: Spearman of u vs rollout dPSNR; AUROC: u as a score for dPSNR < 0; "
          "0 dB at u: where the decile median dPSNR curve crosses 0)")
    agreement = predictor_agreement(df)
    if agreement:
        print("agreement between predictors (Spearman; near 1 = one signal): "
              + ", ".join(f"{a}~{b} {rho:.3f}" for (a, b), rho in agreement.items()))
    if args.csv:
        lo, hi = gain_range(df)
        paper = calibration_stats(in_gain_range(paper_calibration(), lo, hi))
        shared = [c for c in stats if c in paper]
        if shared:
            print(f"\nthe paper's base model on its sequences within this table's dPSNR range ({lo:+.2f} to "
                  f"{hi:+.2f} dB, 5th-95th percentile; n={paper[shared[0]].n}): "
                  + ", ".join(f"{c} rho {paper[c].spearman:.3f}" for c in shared))
    if len(stats) >= 2 and not combined:
        print("\ncombined predictors: not computed (they need two or more tasks and sequences on both sides "
              "of dPSNR = 0)")
    if combined:
        first = next(iter(combined.values()))
        print(f"\ncombined predictors, each task scored by a model fitted on other tasks "
              f"({first.k} task-grouped folds, n={first.n}):")
        for c, s in combined.items():
            print(f"  {c:10} rho {s.spearman:.3f} (best single {s.best_single_by_spearman} "
                  f"{s.best_single_spearman:.3f}: {'beats' if s.beats_best_single_spearman else 'does not beat'})"
                  f"   AUROC {s.auroc:.3f} (best single {s.best_single_by_auroc} {s.best_single_auroc:.3f}: "
                  f"{'beats' if s.beats_best_single_auroc else 'does not beat'})")
    if args.per_task:
        print()
        print(per_task_stats(df).to_csv(float_format="%.4f"), end="")
    return 0
