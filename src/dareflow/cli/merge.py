"""``dareflow merge RECIPE``: run a merge recipe."""

import argparse

STORE_HELP = ("artifact store for committed layers and caches "
              "(default: $DAREFLOW_STORE or ~/.cache/dareflow)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="run a merge recipe")
    p.add_argument("config", help="recipe YAML (see configs/)")
    p.add_argument("--out", help="output folder or URI (default: the recipe's output:)")
    p.add_argument("--store", default=None, help=STORE_HELP)
    p.add_argument("--max-workers", type=int, default=None,
                   help="parallel layer tasks (default: min(4, cores))")
    dask = p.add_mutually_exclusive_group()
    dask.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT",
                      help="run layer tasks on this Dask cluster's workers (they read and "
                           "write the shared --store; needs the 'dask' extra)")
    dask.add_argument("--dask-workers", type=int, default=None, metavar="N",
                      help="run layer tasks on a temporary local Dask cluster of N processes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output once the new merge is complete")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dareflow.flows.merge import run_merge  # heavy (torch, Prefect): only when merging

    manifest = run_merge(args.config, args.out, store=args.store,
                         max_workers=args.max_workers, overwrite=args.overwrite,
                         dask_address=args.dask_address, dask_workers=args.dask_workers)
    print(f"merged {len(manifest['shards'])} shard(s) into {manifest['out']}")
    return 0
