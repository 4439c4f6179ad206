"""``mmbench2-lab tasks``: list the tasks, by domain and split, with whether each runs here."""
from __future__ import annotations

import argparse
import csv
import sys

from mmbench2_lab.tasks import SPLITS, tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", help="only this domain (e.g. dmcontrol)")
    parser.add_argument("--split", choices=SPLITS, help="only this split")
    parser.add_argument("--runnable", action="store_true", help="only tasks whose simulator runs here")
    parser.add_argument("--format", choices=("table", "csv"), default="table",
                        help="csv prints the columns task,domain,split,runnable for scripts")


def run(args: argparse.Namespace) -> int:
    from mmbench2_lab.envs import is_runnable

    rows = [(t, is_runnable(t.name)) for t in tasks(domain=args.domain, split=args.split)]
    if args.runnable:
        rows = [(t, ok) for t, ok in rows if ok]
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["task", "domain", "split", "runnable"])
        for t, ok in rows:
            writer.writerow([t.name, t.domain, t.split, "true" if ok else "false"])
        return 0
    print(f"{'id':>3}  {'task':32} {'domain':14} {'split':8} {'adim':>4} {'steps':>5} {'frames':>7}  runs here")
    for t, ok in rows:
        print(f"{t.index:>3}  {t.name:32} {t.domain:14} {t.split:8} {t.action_dim:>4} "
              f"{t.max_episode_steps:>5} {t.frames:>7}  {'yes' if ok else 'no'}")
    print(f"{len(rows)} tasks, {sum(ok for _, ok in rows)} runnable on this machine")
    return 0
