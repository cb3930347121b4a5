"""The `dareflow` command."""

import argparse
import sys
from collections.abc import Sequence

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, PermissionError)


def _cmd_merge(args: argparse.Namespace) -> int:
    from flows.merge import run_merge

    manifest = run_merge(args.config, args.out, store=args.store,
                         max_workers=args.max_workers, overwrite=args.overwrite)
    print(f"merged {len(manifest['shards'])} shard(s) into {manifest['out']}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from tasks.config import fine_tunes, load_recipe

    failed = 0
    for path in args.configs:
        try:
            recipe = load_recipe(path)
        except (ValueError, FileNotFoundError) as e:
            failed += 1
            print(f"FAIL {e}", file=sys.stderr)
        else:
            print(f"ok   {path}: {recipe.merge_method}, "
                  f"{len(fine_tunes(recipe))} fine-tuned model(s)")
    return 1 if failed else 0


def _cmd_ls(args: argparse.Namespace) -> int:
    from tasks.merge_math import METHODS

    width = max(len(m) for m in METHODS)
    for row in METHODS.values():
        print(f"{row.id:<{width}}  sparsify={row.sparsification:<9} "
              f"consensus={row.consensus:<4}  {row.summary}")
        if args.verbose:
            print(f"{'':<{width}}  paper: {row.reference}")
            print(f"{'':<{width}}  peers: {row.peer_notes}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    run_demo(args.workdir, drop_rate=args.drop_rate, max_workers=args.max_workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dareflow",
        description="Merge homologous fine-tuned LMs with DARE (drop and rescale) on Prefect.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="run a merge recipe")
    p.add_argument("config", help="recipe YAML (see configs/)")
    p.add_argument("--out", help="output folder or URI (default: the recipe's output:)")
    p.add_argument("--store", default=None,
                   help="artifact store for committed layers and caches "
                        "(default: $DAREFLOW_STORE or ~/.cache/dareflow)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="parallel layer tasks (default: min(4, cores))")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output once the new merge is complete")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("validate", help="check recipe files; reports every problem")
    p.add_argument("configs", nargs="+")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("ls", help="list merge methods")
    p.add_argument("-v", "--verbose", action="store_true", help="papers and peer notes")
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("demo", help="offline demo: build a tiny family, merge, compare")
    p.add_argument("--workdir", default="dareflow-demo", help="where the family and merges go")
    p.add_argument("--drop-rate", type=float, default=None, help="DARE p (default: the recipe's)")
    p.add_argument("--max-workers", type=int, default=None)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_workers", None) is not None and args.max_workers < 1:
        print(f"error: --max-workers must be >= 1, got {args.max_workers}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except EXPECTED_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
