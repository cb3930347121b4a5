"""``dareflow ls``: the merge methods, their papers and what each peer computes."""

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list merge methods")
    p.add_argument("-v", "--verbose", action="store_true", help="papers and peer notes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dareflow.methods import METHODS  # imports torch: only for this subcommand

    width = max(len(m) for m in METHODS)
    for row in METHODS.values():
        print(f"{row.id:<{width}}  sparsify={row.sparsification:<9} "
              f"consensus={row.consensus:<4}  {row.summary}")
        if args.verbose:
            print(f"{'':<{width}}  paper: {row.reference}")
            print(f"{'':<{width}}  peers: {row.peer_notes}")
    return 0
