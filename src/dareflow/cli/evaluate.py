"""``dareflow eval MODEL...`` and ``dareflow merge-eval RECIPE``: lm-eval on a suite."""

import argparse
import sys


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batch-size must be a positive int or 'auto', got {text!r}") from None


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Where and how the benchmarks run: the same flags on `eval` and `merge-eval`."""
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers (CPU or GPU); vllm: GPU only")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                   help="auto (default): cuda when torch sees a GPU, else cpu. On cuda each "
                   "benchmark's process is pinned to its own GPU(s)")
    p.add_argument("--batch-size", type=_batch_size, default=None,
                   help="lm-eval batch size, an int or auto (default: 1 for hf on the CPU, "
                   "auto on a GPU)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vllm: GPUs per engine (one benchmark per group of GPUs)")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="vllm: engine replicas per benchmark (needs ray)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest context in tokens (default: the model's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vllm: fraction of each GPU's memory (default: vLLM's, 0.9)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="benchmarks evaluated at once (default: one per GPU slot; on the CPU "
                   "half the cores, at most 4)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="kill a benchmark's process after this long and report it failed, "
                   "without retrying (default: 21600 = 6 h; 0: no limit)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models with lm-eval on a suite; compare them")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="LABEL=PATH or PATH (a local HF folder; the label names the row)")
    p.add_argument("--suite", required=True, help="suite name (configs/suites/) or file")
    p.add_argument("--limit", type=int, default=None, help="documents per benchmark")
    p.add_argument("--store", default=None, help="artifact store (default: $DAREFLOW_STORE "
                   "or ~/.cache/dareflow): mirror, cached runs, results")
    p.add_argument("--offline-mirror", action="store_true",
                   help="read the offline v1 data mirror in the store (prepared if missing)")
    p.add_argument("--merged", default=None, help="label of the first row (default: first)")
    p.add_argument("--results", default=None, help="results folder or URI "
                   "(default: {store}/results/<suite>-<time>-<run>)")
    _add_run_options(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("merge-eval", help="merge a recipe, then evaluate it next to its "
                       "base and sources")
    p.add_argument("config", help="recipe YAML")
    p.add_argument("--out", default=None, help="local output folder (default: output:)")
    p.add_argument("--suite", required=True, help="suite name or file")
    p.add_argument("--limit", type=int, default=None, help="documents per benchmark")
    p.add_argument("--store", default=None, help="artifact store")
    p.add_argument("--offline-mirror", action="store_true", help="use the offline v1 mirror")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_run_options(p)
    p.set_defaults(func=run_merge_eval)


def _run_options(args: argparse.Namespace) -> dict:
    """The flows' run options from the flags (called once the evaluation stack is imported)."""
    from dareflow.evaluation.backends import DEFAULT_TIMEOUT_S, BackendOptions

    timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    return {"backend": args.backend, "device": args.device, "batch_size": args.batch_size,
            "max_workers": args.max_workers, "timeout": timeout or None,
            "options": BackendOptions(args.tensor_parallel_size, args.data_parallel_size,
                                      args.max_model_len, args.gpu_memory_utilization)}


def run_eval(args: argparse.Namespace) -> int:
    # heavy (Prefect, pandas, lm-eval's checks): imported only when evaluating
    from dareflow.evaluation.checks import parse_model_specs
    from dareflow.flows.evaluate import run_evaluate

    out = run_evaluate(parse_model_specs(args.models), args.suite, limit=args.limit,
                       store=args.store, mirror=args.offline_mirror, merged=args.merged,
                       results=args.results, **_run_options(args))
    return print_evaluation(out)


def run_merge_eval(args: argparse.Namespace) -> int:
    from dareflow.flows.merge_and_evaluate import run_merge_and_evaluate  # heavy: see run_eval

    out = run_merge_and_evaluate(args.config, args.out, suite=args.suite, limit=args.limit,
                                 store=args.store, mirror=args.offline_mirror,
                                 overwrite=args.overwrite, **_run_options(args))
    return print_evaluation(out["evaluation"])


def print_evaluation(out: dict) -> int:
    """Print the comparison table and each failed benchmark; exit code 1 if any failed."""
    print(out["markdown"], end="")
    for f in out["failures"]:
        print(f"FAILED {f['model']}/{f['task']}: {f['error'][:500]}", file=sys.stderr)
    print(f"results: {out['results_uri']}")
    return 1 if out["failures"] else 0
