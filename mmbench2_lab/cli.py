"""The ``mmbench2-lab`` command.

Each subcommand lives beside the concept it drives, in a module that exposes
``add_arguments(parser)`` and ``run(args) -> int | None``. Those modules keep heavy imports (torch,
simulators) inside ``run`` so that ``mmbench2-lab --help`` and ``mmbench2-lab tasks`` start instantly.
Add a subcommand by adding one line to ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "tasks": ("mmbench2_lab.tasks_cli", "list the 210 MMBench2 tasks and which run on this machine"),
    "config": ("mmbench2_lab.config_cli", "print or write a preset configuration (JSON or YAML)"),
    "calibrate": ("mmbench2_lab.calibrate_cli", "write a model's per-sequence calibration CSV on held-out data"),
    "calibration-report": ("mmbench2_lab.calibration_cli", "predictor Spearman rho and AUROC vs rollout dPSNR"),
    "collect": ("mmbench2_lab.collect_cli", "run a policy in live simulators and save episodes (raw layout)"),
    "preprocess": ("mmbench2_lab.data.preprocess_cli", "convert a raw partition into .chunks / .pt frame shards"),
    "train-tokenizer": ("mmbench2_lab.training.train_cli", "train the video tokenizer (masked auto-encoding)"),
    "train-dynamics": ("mmbench2_lab.training.train_cli", "train the dynamics on a frozen tokenizer"),
    "download": ("mmbench2_lab.data.download_cli", "fetch MMBench2 partitions or tasks from the Hugging Face Hub"),
    "app": ("mmbench2_lab.app_cli", "serve the Gradio app that steers a world model live in the browser"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmbench2-lab",
        description="Workbench for hallucination in generative world models (MMBench2).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        code = importlib.import_module(args._module).run(args)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as err:
        # Library errors carry a message that names the problem and the fix; show it without a traceback.
        print(f"mmbench2-lab {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
