"""``mmbench2-lab train-tokenizer`` / ``train-dynamics``: the training stages from the command line.

Works the same under ``torchrun --nproc_per_node=N -m mmbench2_lab.cli train-dynamics ...``.
"""
from __future__ import annotations

import argparse

from mmbench2_lab.config import PRESETS, Config, preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="starting configuration")
    parser.add_argument("--config", help="a saved JSON/YAML config to start from instead of a preset")
    parser.add_argument("--data", nargs="+", default=None, help="training data directories (raw layout or shards)")
    parser.add_argument("--val", nargs="+", default=None, help="held-out data directories")
    parser.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, exported weights)")
    parser.add_argument("--tokenizer", help="train-dynamics: the frozen tokenizer (folder or official tokenizer.pt)")
    parser.add_argument("--init-from", help="finetune: start from these weights (our run's export or official "
                                            "files); train-dynamics may add agent tokens and heads to them")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--weighting", choices=("valid_starts", "uniform", "targeted"),
                        help="task weighting: valid_starts (frame-proportional), uniform (coverage-aware), targeted")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. dynamics_train.batch_size=8 dynamics.depth=2")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--max-minutes", type=float, help="stop (checkpoint, evaluate, export) after this long")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, section: str) -> Config:
    """The run's config: preset or file, then the named options, then --set overrides."""
    cfg = Config.load(args.config) if args.config else preset(args.preset)
    named = {"data_dirs": args.data, "val_dirs": args.val, "out_dir": args.out, "steps": args.steps,
             "task_weighting": args.weighting, "init_from": args.init_from,
             "tokenizer_path": getattr(args, "tokenizer", None) if section == "dynamics_train" else None}
    return cfg.override({f"{section}.{k}": v for k, v in named.items() if v is not None}).override(args.set)


def run(args: argparse.Namespace) -> int:
    max_seconds = None if args.max_minutes is None else 60.0 * args.max_minutes
    kw = dict(resume=args.resume, device=args.device, progress=not args.no_progress, max_seconds=max_seconds)
    if args.command == "train-tokenizer":
        from mmbench2_lab.training.tokenizer import train_tokenizer
        out = train_tokenizer(config_from_args(args, "tokenizer_train"), **kw)
    else:
        from mmbench2_lab.training.dynamics import train_dynamics
        out = train_dynamics(config_from_args(args, "dynamics_train"), **kw)
    print(f"run output: {out}")
    return 0
