"""``mmbench2-lab config``: print a preset (with overrides) or write it to a file to edit."""
from __future__ import annotations

import argparse
import json

from mmbench2_lab.config import PRESETS, Config, preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="starting preset")
    parser.add_argument("--from", dest="path", help="start from a saved JSON/YAML config instead")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. tokenizer.d_model=128 train.steps=500")
    parser.add_argument("--out", help="write to this .json/.yaml file instead of printing")


def run(args: argparse.Namespace) -> int:
    cfg = Config.load(args.path).override(args.set) if args.path else preset(args.preset, args.set)
    if args.out:
        print(f"wrote {cfg.save(args.out)}")
    else:
        print(json.dumps(cfg.to_dict(), indent=2))
    return 0
