"""``dareflow eval MODEL...`` and ``dareflow merge-eval RECIPE``: lm-eval on a suite."""

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models with lm-eval on a suite; compare them")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="LABEL=PATH or PATH (a local HF folder; the label names the row)")
    p.add_argument("--suite", required=True, help="suite name (configs/suites/) or file")
    p.add_argument("--limit", type=int, default=None, help="documents per benchmark")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers (CPU); vllm: GPU")
    p.add_argument("--store", default=None, help="artifact store (default: $DAREFLOW_STORE "
                   "or ~/.cache/dareflow): mirror, cached runs, results")
    p.add_argument("--offline-mirror", action="store_true",
                   help="read the offline v1 data mirror in the store (prepared if missing)")
    p.add_argument("--merged", default=None, help="label of the first row (default: first)")
    p.add_argument("--results", default=None, help="results folder or URI "
                   "(default: {store}/results/<suite>-<time>-<run>)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="benchmarks evaluated at once (default: half the cores)")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("merge-eval", help="merge a recipe, then evaluate it next to its "
                       "base and sources")
    p.add_argument("config", help="recipe YAML")
    p.add_argument("--out", default=None, help="local output folder (default: output:)")
    p.add_argument("--suite", required=True, help="suite name or file")
    p.add_argument("--limit", type=int, default=None, help="documents per benchmark")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--store", default=None, help="artifact store")
    p.add_argument("--offline-mirror", action="store_true", help="use the offline v1 mirror")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run_merge_eval)


def run_eval(args: argparse.Namespace) -> int:
    # heavy (Prefect, pandas, lm-eval's checks): imported only when evaluating
    from dareflow.evaluation.checks import parse_model_specs
    from dareflow.flows.evaluate import run_evaluate

    out = run_evaluate(parse_model_specs(args.models), args.suite, limit=args.limit,
                       backend=args.backend, store=args.store, mirror=args.offline_mirror,
                       merged=args.merged, results=args.results, max_workers=args.max_workers)
    return print_evaluation(out)


def run_merge_eval(args: argparse.Namespace) -> int:
    from dareflow.flows.merge_and_evaluate import run_merge_and_evaluate  # heavy: see run_eval

    out = run_merge_and_evaluate(args.config, args.out, suite=args.suite, limit=args.limit,
                                 store=args.store, backend=args.backend,
                                 mirror=args.offline_mirror, overwrite=args.overwrite)
    return print_evaluation(out["evaluation"])


def print_evaluation(out: dict) -> int:
    """Print the comparison table and each failed benchmark; exit code 1 if any failed."""
    print(out["markdown"], end="")
    for f in out["failures"]:
        print(f"FAILED {f['model']}/{f['task']}: {f['error'][:500]}", file=sys.stderr)
    print(f"results: {out['results_uri']}")
    return 1 if out["failures"] else 0
