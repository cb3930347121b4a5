"""``dareflow sweep|grid|similarity CONFIG``: the paper's experiments on the demo family."""

import argparse

EXPERIMENTS = {
    "sweep": "drop-rate sweep: DARE vs DropOnly vs magnitude pruning",
    "grid": "merge hyperparameter grid: select on validation, report test",
    "similarity": "hidden-state similarity of DARE / DropOnly versions",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, what in EXPERIMENTS.items():
        p = sub.add_parser(name, help=what)
        p.add_argument("config", help=f"{name} YAML (see configs/sweeps/)")
        p.add_argument("--store", default=None,
                       help="artifact store (default: $DAREFLOW_STORE or ~/.cache/dareflow)")
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # heavy: pandas (~0.4 s), the flow imports torch and Prefect (~2.4 s); only for this subcommand
    import pandas as pd

    from dareflow.flows.experiments import run_experiment

    result = run_experiment(args.command, args.config, store=args.store)
    with pd.option_context("display.max_rows", 200, "display.width", 200):
        print(pd.DataFrame(result["rows"]).round(4).to_string(index=False))
    if "selected" in result:
        print(f"selected on validation: {result['selected']}")
    for name, uri in result["paths"].items():
        print(f"{name}: {uri}")
    return 0
