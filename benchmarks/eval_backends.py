"""Backend parity: one real model, the v1 tasks, hf against vLLM, differences in stderr units.

    python -m benchmarks.eval_backends --device cuda --model DIR --limit 100   # a GPU machine
    python -m benchmarks.eval_backends --device cpu --model DIR --limit 2      # hf only

Each backend evaluates ``--model`` on the Open LLM Leaderboard v1 tasks of the offline mirror
(``--tasks`` for a subset), each benchmark in its own child process, with the settings
``dareflow eval`` would use on that device (``backends.plan_run``: hf in bfloat16 with batch
size auto on a GPU, float32 on the CPU; vLLM batched). Results are committed to ``--store``
(default: a temporary folder), so a rerun with the same store only prints. The table gives,
per task, each backend's primary metric with its standard error and

    z = |hf - vllm| / sqrt(se_hf² + se_vllm²)

(two independent estimates of one score: z above ~2 on a task says the backends disagree by
more than sampling noise; the same documents are scored by both, so z is conservative).
Without a GPU or without the vllm package, vLLM is skipped with the reason and the hf scores
are printed alone. Exit code 0 unless a benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

V1_SUITE = "openllm_v1"


def vllm_skip_reason(requested: str, device: str, vllm_installed: bool) -> str | None:
    """Why vLLM cannot run here (None: it can), from the requested and resolved devices."""
    if requested == "cpu":
        return "--device cpu (vLLM runs on a GPU)"
    if device != "cuda":
        return "torch sees no CUDA GPU"
    if not vllm_installed:
        return "the vllm package is not installed (`pip install -e '.[vllm]'`)"
    return None


def z_score(a: float, se_a: float, b: float, se_b: float) -> float:
    """``|a - b| / sqrt(se_a² + se_b²)``: 0 when equal, inf for a difference with no error,
    NaN when a standard error is unknown."""
    diff = abs(a - b)
    se = math.sqrt(se_a ** 2 + se_b ** 2)
    if math.isnan(se):
        return math.nan
    if se == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / se


def parity_rows(table: Any, metrics: Mapping[str, str],
                backends: Sequence[str]) -> list[dict[str, Any]]:
    """One row per task: each backend's value and stderr of the task's primary metric, and
    (with two backends) their difference and z (see :func:`z_score`).

    Args:
        table: ``results.tidy_results`` of ``{backend: [raw results]}``.
        metrics: ``{task: primary metric}`` (``Suite.primary_metrics()``).
        backends: the backends evaluated (the table's ``model`` labels), first is the base.
    """
    rows = []
    for task, metric in metrics.items():
        row: dict[str, Any] = {"task": task, "metric": metric}
        for b in backends:
            hit = table[(table.model == b) & (table.task == task) & (table.metric == metric)]
            row[b] = float(hit["value"].iloc[0]) if len(hit) else math.nan
            row[f"{b}_se"] = float(hit["stderr"].iloc[0]) if len(hit) else math.nan
        if len(backends) == 2:
            a, b = backends
            row["diff"] = row[b] - row[a]
            row["z"] = z_score(row[a], row[f"{a}_se"], row[b], row[f"{b}_se"])
        rows.append(row)
    return rows


def format_rows(rows: Sequence[Mapping[str, Any]], backends: Sequence[str]) -> str:
    """The rows as a markdown table (scores in percent)."""
    head = ["task", "metric"] + [f"{b} (± se)" for b in backends]
    if len(backends) == 2:
        head += ["diff", "z"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], r["metric"]]
        cells += [f"{100 * r[b]:.2f} ± {100 * r[f'{b}_se']:.2f}" for b in backends]
        if len(backends) == 2:
            cells += [f"{100 * r['diff']:+.2f}", f"{r['z']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_backends",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local HF model folder")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--limit", type=int, default=100, help="documents per (sub)task")
    parser.add_argument("--tasks", nargs="+", default=None, help="v1 task names (default all)")
    parser.add_argument("--store", default=None, help="store for the mirror and the results "
                        "(default: a temporary folder)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)

    # heavy (torch, lm-eval's stack, pandas): after --help
    from dareflow.evaluation.backends import BackendOptions, plan_here
    from dareflow.evaluation.child import EvaluationError
    from dareflow.evaluation.fingerprint import model_fingerprint
    from dareflow.evaluation.mirror_store import ensure_mirror
    from dareflow.evaluation.results import tidy_results
    from dareflow.evaluation.runner import vllm_available
    from dareflow.evaluation.runs import evaluate_benchmark
    from dareflow.evaluation.suite import load_suite
    from dareflow.io import storage

    suite = load_suite(V1_SUITE)
    entries = [suite.task(n) for n in args.tasks] if args.tasks else list(suite.tasks)
    hf = plan_here("hf", args.device, BackendOptions(max_model_len=args.max_model_len),
                   max_workers=1, timeout_s=args.timeout)
    plans = {"hf": hf}
    skip = vllm_skip_reason(args.device, hf["device"], vllm_available())
    if skip is None:
        plans["vllm"] = plan_here(
            "vllm", "cuda", BackendOptions(args.tensor_parallel_size, 1, args.max_model_len,
                                           args.gpu_memory_utilization),
            max_workers=1, timeout_s=args.timeout)
    else:
        print(f"vllm: skipped ({skip})")

    with tempfile.TemporaryDirectory(prefix="dareflow-parity-") as tmp:
        store = args.store or tmp
        mirror_dir = ensure_mirror(store, [e.task for e in entries])["mirror_dir"]
        fp = model_fingerprint(args.model)
        raws: dict[str, list[dict]] = {b: [] for b in plans}
        failed = []
        for backend, plan in plans.items():
            print(f"{backend}: device {plan['device']}, batch size {plan['batch_size']}, "
                  f"model args {plan['model_args']}", flush=True)
            for entry in entries:
                try:
                    out = evaluate_benchmark(
                        {"label": backend, **fp}, entry.model_dump(mode="json"), store=store,
                        limit=args.limit, backend=backend, mirror_dir=mirror_dir, run=plan)
                except EvaluationError as e:
                    failed.append(f"{backend}/{entry.name}: {e}")
                    print(f"FAILED {e}", file=sys.stderr)
                    continue
                print(f"  {entry.name}: {'evaluated' if out['launched'] else 'cached'} in "
                      f"{out['seconds']:.1f} s", flush=True)
                raws[backend].append(json.loads(storage.read_bytes(out["uri"])))
    table = tidy_results(raws)
    rows = parity_rows(table, {e.name: e.metric for e in entries}, list(plans))
    print(format_rows(rows, list(plans)), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
