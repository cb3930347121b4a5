"""``dareflow inspect BASE FINETUNED``: delta statistics of a fine-tune against its base."""

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="delta statistics of a fine-tune against its base")
    p.add_argument("base", help="base model folder or URI")
    p.add_argument("finetuned", help="fine-tuned model folder or URI")
    p.add_argument("--plot", default=None, help="save a PNG plot here (path or URI)")
    p.add_argument("--sample", type=int, default=1_000_000,
                   help="pooled sample size for the overall percentiles (exact below it)")
    p.add_argument("--all", action="store_true", help="print every tensor (default: 40 worst)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dareflow import delta_stats  # imports torch: only for this subcommand

    stats = delta_stats.delta_stats(args.base, args.finetuned, overall_sample=args.sample)
    print(delta_stats.format_table(stats, max_rows=None if args.all else 40))
    if args.plot:
        print(f"plot: {delta_stats.plot_delta_stats(stats, args.plot)}")
    return 0
