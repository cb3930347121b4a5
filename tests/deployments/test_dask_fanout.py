"""Unit tasks fanned out over a real local Dask cluster of worker processes."""

import hashlib
import os
from pathlib import Path

import pytest

from dareflow.flows.merge import run_merge, task_runner_for
from tests.flows.conftest import write_recipe

distributed = pytest.importorskip("distributed", reason="needs the 'dask' extra")


def _bytes_of(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow  # ~25 s alone on 2 cores (3 worker processes import torch and prefect), ~55 s loaded
def test_units_run_on_several_dask_workers_and_match_the_thread_pool(pico_family, tmp_path):
    recipe = write_recipe(tmp_path / "dare_ties.yaml", {
        "merge_method": "dare_ties",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"]), "parameters": {"density": 0.4}},
                   {"model": str(pico_family["b"]), "parameters": {"density": 0.6}}],
        "dtype": "bfloat16",
        "seed": 7,
    })
    threads = run_merge(str(recipe), str(tmp_path / "threads"),
                        store=str(tmp_path / "store-threads"), max_workers=1)
    with distributed.LocalCluster(n_workers=3, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            worker_pids = set(client.run(os.getpid).values())
        dask = run_merge(str(recipe), str(tmp_path / "dask"), store=str(tmp_path / "store-dask"),
                         dask_address=cluster.scheduler_address)

    assert len(worker_pids) == 3 and os.getpid() not in worker_pids
    ran_on = {int(where.rsplit(":", 1)[1]) for where in dask["ran_on"].values()}
    assert ran_on <= worker_pids, (ran_on, worker_pids)
    assert len(ran_on) > 1, dask["ran_on"]
    assert {int(w.rsplit(":", 1)[1]) for w in threads["ran_on"].values()} == {os.getpid()}
    assert not any(dask["cached"].values())
    # Same bytes: shards, index, config, tokenizer, model card, manifest.
    assert _bytes_of(tmp_path / "threads") == _bytes_of(tmp_path / "dask")
    assert len(list((tmp_path / "dask").glob("model-*.safetensors"))) == 4


def test_one_task_runner_at_a_time():
    with pytest.raises(ValueError, match=r"^max_workers and dask_address were both given; "):
        task_runner_for(max_workers=2, dask_address="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match=r"^dask_workers must be >= 1, got 0$"):
        task_runner_for(dask_workers=0)
