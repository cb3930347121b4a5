"""``dareflow demo``: build the tiny family, merge it with and without DARE, compare."""

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline demo: build a tiny family, merge, compare")
    p.add_argument("--workdir", default="dareflow-demo", help="where the family and merges go")
    p.add_argument("--drop-rate", type=float, default=None, help="DARE p (default: the recipe's)")
    p.add_argument("--max-workers", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dareflow.flows.demo import run_demo  # heavy (torch, Prefect, transformers)

    run_demo(args.workdir, drop_rate=args.drop_rate, max_workers=args.max_workers)
    return 0
