"""``dareflow inspect BASE FINETUNED``: delta statistics of a fine-tune against its base,
as a flow run (``dareflow.flows.experiments.inspect_flow``): the table and the plot are
Prefect artifacts and files in the store."""

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="delta statistics of a fine-tune against its base")
    p.add_argument("base", help="base model folder or URI")
    p.add_argument("finetuned", help="fine-tuned model folder or URI")
    p.add_argument("--plot", default=None, help="also save the PNG plot here (path or URI)")
    p.add_argument("--store", default=None,
                   help="artifact store for the table and plot (default $DAREFLOW_STORE)")
    p.add_argument("--sample", type=int, default=1_000_000,
                   help="pooled sample size for the overall percentiles (exact below it)")
    p.add_argument("--all", action="store_true", help="print every tensor (default: 40 worst)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dareflow.flows.experiments import inspect_flow  # imports torch and Prefect
    from dareflow.flows.runtime import api_ready
    from dareflow.io import storage

    api_ready()
    result = inspect_flow(base=args.base, finetuned=args.finetuned, store=args.store,
                          sample=args.sample, max_rows=None if args.all else 40)
    print(result["table"])
    for kind in ("csv", "parquet", "plot"):
        print(f"{kind}: {result['paths'][kind]}")
    if args.plot:
        storage.write_bytes_atomic(args.plot, storage.read_bytes(result["paths"]["plot"]))
        print(f"plot: {args.plot}")
    print(f"Prefect artifacts: {result['artifact_key']} (table), "
          f"{result['artifact_key']}-plot (plot)")
    return 0
