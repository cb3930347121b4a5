import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dareflow.flows.merge import run_merge
from dareflow.methods import derive_key, keep_mask
from tests.flows.conftest import write_recipe


def _merged_tensors(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / file))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def _shard_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*.safetensors"))}


def test_task_arithmetic_gives_base_plus_deltas(pico_family, tmp_path):
    recipe = write_recipe(tmp_path / "ta.yaml", {
        "merge_method": "task_arithmetic",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"])},
                   {"model": str(pico_family["b"]), "parameters": {"weight": 2.0}}],
        "parameters": {"lambda": 0.5},
        "dtype": "float32",
    })
    out = tmp_path / "merged"
    manifest = run_merge(str(recipe), str(out), max_workers=2)
    base = load_file(pico_family["base"] / "model.safetensors")
    a = load_file(pico_family["a"] / "model.safetensors")
    b = load_file(pico_family["b"] / "model.safetensors")
    merged = _merged_tensors(out)
    assert set(merged) == set(base)
    for name, t in base.items():
        expected = t + 0.5 * ((a[name] - t) + 2.0 * (b[name] - t))
        assert torch.equal(merged[name], expected), name
    assert set(manifest["shards"]) == {p.name for p in out.glob("*.safetensors")}
    assert not list(tmp_path.glob("merged.partial*"))


def test_dare_linear_uses_the_keyed_masks(pico_family, tmp_path):
    recipe = write_recipe(tmp_path / "dare.yaml", {
        "merge_method": "dare_linear",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"]), "parameters": {"drop_rate": 0.5}}],
        "parameters": {"rescale": "inverse"},  # the paper's 1/(1 - p)
        "dtype": "float32",
        "seed": 11,
    })
    out = tmp_path / "merged"
    run_merge(str(recipe), str(out), max_workers=1)
    base = load_file(pico_family["base"] / "model.safetensors")
    a = load_file(pico_family["a"] / "model.safetensors")
    merged = _merged_tensors(out)
    name = "model.layers.1.mlp.up_proj.weight"
    mask = keep_mask(base[name].shape, 0.5, derive_key(11, "ft-a", name))
    expected = base[name] + torch.where(mask, (a[name] - base[name]) * 2.0, 0.0)
    assert torch.equal(merged[name], expected)
    kept = (merged[name] != base[name]).float().mean().item()
    assert 0.4 < kept < 0.6


def test_one_and_four_workers_give_identical_bytes(pico_family, tmp_path):
    recipe = write_recipe(tmp_path / "dare_ties.yaml", {
        "merge_method": "dare_ties",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"]), "parameters": {"density": 0.3}},
                   {"model": str(pico_family["b"]), "parameters": {"density": 0.7}}],
        "parameters": {"trim_after_dare": 0.0},
        "dtype": "bfloat16",
        "seed": 3,
    })
    one, four = tmp_path / "one", tmp_path / "four"
    first = run_merge(str(recipe), str(one), store=str(tmp_path / "s1"), max_workers=1)
    second = run_merge(str(recipe), str(four), store=str(tmp_path / "s4"), max_workers=4)
    assert not any(first["cached"].values()) and not any(second["cached"].values())
    assert _shard_bytes(one) == _shard_bytes(four)
    assert len(_shard_bytes(one)) == 4  # embeddings, 2 layers, final
    assert (one / "model.safetensors.index.json").read_bytes() == (
        four / "model.safetensors.index.json").read_bytes()


def test_merged_folder_loads_in_transformers_and_generates(pico_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "dare_linear",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"]), "parameters": {"drop_rate": 0.3}},
                   {"model": str(pico_family["b"]), "parameters": {"drop_rate": 0.3}}],
        "parameters": {"lambda": 0.8},
        "seed": 5,
    })
    out = tmp_path / "merged"
    run_merge(str(recipe), str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("w3 w4 w5", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    card = (out / "README.md").read_text()
    for needle in ("dare_linear", "0.3", "seed", str(pico_family["a"]),
                   ("**Rescale:** l1 — kept deltas rescaled to the L1 norm of the full delta "
                   "(mergekit since 2025) · *mergekit default for dare_linear*"),
                   "**Scale λ:** 0.8 · *set in the recipe*"):
        assert needle in card, needle


def test_vocabulary_mismatch_is_refused_before_any_output(pico_family, tmp_path):
    bad = tmp_path / "bigger-vocab"
    shutil.copytree(pico_family["a"], bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.embed_tokens.weight"
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(bad)}],
    })
    out = tmp_path / "merged"
    with pytest.raises(ValueError) as info:
        run_merge(str(recipe), str(out))
    message = str(info.value)
    assert name in message and "[64, 32]" in message and "[65, 32]" in message
    assert "vocabulary" in message
    assert not out.exists() and not list(tmp_path.glob("merged.partial*"))


def test_existing_output_is_not_overwritten(pico_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"])}],
    })
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty.*--overwrite"):
        run_merge(str(recipe), str(out))
    assert (out / "keep.txt").read_text() == "mine"
    run_merge(str(recipe), str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_finished_keeps_the_edge_and_drops_the_result():
    """wait_for=[finished(f)] records f's task run as the upstream (the UI's edge) but hands
    the task runner a state, not a future: no Dask data dependency pins the waiting tasks to
    the worker holding f's result, and the result's contents make no extra edges."""
    from prefect import flow, task
    from prefect.client.schemas.objects import TaskRunResult
    from prefect.futures import PrefectFuture
    from prefect.utilities.engine import collect_task_run_inputs_sync

    from dareflow.flows.merge import finished

    @task
    def make_plan():
        return {"units": ["embeddings", "layer_000"]}

    @flow
    def one_task():
        planned = make_plan.submit()
        assert planned.result() == {"units": ["embeddings", "layer_000"]}
        state = finished(planned)
        assert not isinstance(state, PrefectFuture) and state.is_completed()
        assert state.state_details.task_run_id == planned.task_run_id
        assert state.data == "completed"
        assert planned.state.result() == {"units": ["embeddings", "layer_000"]}  # untouched
        return collect_task_run_inputs_sync([state]), planned.task_run_id

    inputs, upstream = one_task()
    assert inputs == {TaskRunResult(id=upstream)}
