"""Layer-task throughput with 1 vs N Dask worker processes (how many workers to give a merge).

    python -m dareflow.deployments.bench_dask --workers 1 3 --layers 8 --hidden 256

Builds a synthetic Llama family (a random base and two fine-tunes = base + small random
deltas, float32) in a temporary folder, starts a local Dask cluster of N single-threaded
worker processes (warmed: dareflow imported on every worker), runs the dare_ties merge with
``run_merge(dask_address=...)`` into a fresh store, and reads the merge-unit task runs back
from Prefect: throughput = units / (last unit end - first unit start). Every run's shards
are compared with the first's (same bytes whatever the worker count).
"""

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def build_family(root: Path, layers: int, hidden: int, seed: int = 0) -> dict[str, Path]:
    """base + fine-tunes ``a`` (delta ~ N(0, 0.002)) and ``b`` (delta ~ N(0, 0.003))."""
    # heavy: transformers (~3 s), only when the family is built (--help stays fast)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), vocab_size=2048,
                         max_position_embeddings=256, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    paths = {"base": root / "base"}
    gen = torch.Generator().manual_seed(seed + 1)
    for name, scale in (("a", 0.002), ("b", 0.003)):
        out = root / name
        out.mkdir()
        (out / "config.json").write_text((root / "base" / "config.json").read_text())
        tuned = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_file(tuned, out / "model.safetensors", metadata={"format": "pt"})
        paths[name] = out
    return paths


def unit_span(flow_name: str = "dare-merge") -> tuple[int, float]:
    """(units, seconds from the first unit start to the last unit end) of the latest run."""
    # Prefect (~1.2 s) only when reading the runs back (--help stays fast)
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                      sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
                 if t.name.startswith("merge-")]
    start = min(t.start_time for t in tasks)
    end = max(t.end_time for t in tasks)
    return len(tasks), (end - start).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()

    # optional: distributed (the dask extra, ~0.2 s); the merge flow imports Prefect (~1.3 s):
    # both only once the arguments are parsed (--help stays fast)
    import distributed

    from dareflow.flows.merge import run_merge

    with tempfile.TemporaryDirectory(prefix="dareflow-bench-") as tmp:
        root = Path(tmp)
        family = build_family(root / "family", args.layers, args.hidden)
        recipe = root / "recipe.yaml"
        recipe.write_text(json.dumps({
            "merge_method": "dare_ties", "base_model": str(family["base"]),
            "models": [{"model": str(family["a"]), "parameters": {"density": 0.3}},
                       {"model": str(family["b"]), "parameters": {"density": 0.3}}],
            "dtype": "float32", "seed": 0,
        }))
        reference = None
        for n in args.workers:
            with distributed.LocalCluster(n_workers=n, processes=True, threads_per_worker=1,
                                          dashboard_address=None) as cluster, \
                    distributed.Client(cluster) as client:
                client.run(lambda: __import__("dareflow.tasks.merge"))  # warm the workers
                started = time.perf_counter()
                out = root / f"out-{n}"
                result = run_merge(str(recipe), str(out), store=str(root / f"store-{n}"),
                                   dask_address=cluster.scheduler_address)
                wall = time.perf_counter() - started
            units, span = unit_span()
            shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(out.glob("*.safetensors"))}
            reference = reference or shards
            print(f"{n} worker(s): {units} unit tasks in {span:.2f} s = {units / span:.2f} units/s "
                  f"(flow wall {wall:.1f} s, {len(set(result['ran_on'].values()))} process(es) "
                  f"used, shards identical to first run: {shards == reference})", flush=True)


if __name__ == "__main__":
    main()
