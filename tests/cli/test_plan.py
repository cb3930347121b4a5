"""``dareflow plan``: the report, its exit codes, and that it downloads no weight."""

from __future__ import annotations

import shutil

import pytest
import torch

from dareflow.cli import main
from dareflow.cli.plan import duration, size
from tests.flows.conftest import pico_family, write_recipe  # noqa: F401
from tests.reliability.conftest import variant

UP = "model.layers.0.mlp.up_proj.weight"


def test_plan_over_the_hub_reports_sizes_and_exits_0(
        pico_family, tmp_path, fake_hub, monkeypatch, capsys):  # noqa: F811
    repos = {"org/base": tmp_path / "base", "org/ft": tmp_path / "ft"}
    shutil.copytree(pico_family["base"], repos["org/base"])
    shutil.copytree(pico_family["a"], repos["org/ft"])
    hub = fake_hub(repos)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "dare_linear", "base_model": "org/base",
        "models": [{"model": "org/ft", "parameters": {"drop_rate": 0.5}}]})
    store = tmp_path / "store"
    code = main(["plan", str(recipe), "--store", str(store), "--out", str(tmp_path / "out"),
                 "--max-workers", "3", "--download-mb-s", "10"])
    out = capsys.readouterr().out
    assert code == 0, out
    files = {rid: sum(p.stat().st_size for p in folder.iterdir()) for rid, folder in repos.items()}
    lines = out.splitlines()
    assert lines[0] == (f"pre-flight of {recipe}: dare_linear, 2 model(s) read from metadata "
                        "only (config.json, index, safetensors headers)")
    for role, rid in (("base", "org/base"), ("fine-tuned", "org/ft")):
        row = next(line for line in lines if line.startswith(role + " "))
        assert row.split() == [role, rid, hub.commit(rid)[:12], "hub",
                               *size(files[rid]).split(), *size(files[rid]).split()]
    assert "family: ok (21 tensors in 4 units, output float32)" in out
    total = sum(files.values())
    download = next(line for line in lines if line.startswith("  download"))
    assert download.split()[1:3] == size(total).split()
    assert "at 10 MB/s (assumed rate)" in download and duration(total / 10e6) in download
    memory = next(line for line in lines if line.startswith("  memory"))
    assert "largest unit 'layer_000' 111.4 kB" in memory and "x 3 unit(s) at once" in memory
    assert memory.split()[1:3] == size(3 * 111360).split()
    timing = next(line for line in lines if line.startswith("  time"))
    assert "64 MiB written with fsync and read back in" in timing and "x 1.54" in timing
    assert "settings: vocab_mismatch: refuse (default)" in out
    weight_gets = [r for r in hub.requests if r.path.endswith(".safetensors")]
    assert len(weight_gets) == 4 and all(r.range and r.status == 206 for r in weight_gets)
    assert not (store / "sources").exists()


def test_plan_lists_every_problem_and_exits_2(pico_family, tmp_path, capsys):  # noqa: F811
    def edit(ts):
        ts = dict(ts)
        del ts[UP]
        ts["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
        return ts
    odd = variant(pico_family["a"], tmp_path / "odd", tensors=edit)
    other = variant(pico_family["b"], tmp_path / "other", config={"model_type": "mistral"})
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(pico_family["base"]),
        "models": [{"model": str(odd)}, {"model": str(other)}]})
    assert main(["plan", str(recipe), "--store", str(tmp_path / "store")]) == 2
    out = capsys.readouterr().out
    assert "PROBLEMS (1): the merge would stop here" in out
    assert f"models cannot be merged with base '{pico_family['base']}' (3 problems)" in out
    extra = "'model.layers.0.mlp.extra_proj.weight'"
    for needle in (f"model '{odd}' ({odd}): missing 1 tensor(s) present in the base: {UP!r}",
                   f"model '{odd}' ({odd}): 1 tensor(s) not in the base: {extra}",
                   f"model '{other}' ({other}): model_type 'mistral' differs from the base's"):
        assert needle in out, needle
    rows = [line.split() for line in out.splitlines() if line.startswith(("base ", "fine-"))]
    assert [r[3:] for r in rows] == [["local", *size(_size(d)).split(), "in", "place"]
                                     for d in (pico_family["base"], odd, other)]


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_plan_refuses_a_bad_rate(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "r.yaml"), "--download-mb-s", "0"]) == 2
    assert "error: --download-mb-s must be > 0, got 0.0" in capsys.readouterr().err


@pytest.mark.parametrize(("nbytes", "text"), [(512, "512 B"), (1500, "1.5 kB"),
                                              (13.46e9, "13.5 GB"), (2e12, "2.0 TB")])
def test_sizes_are_decimal(nbytes, text):
    assert size(nbytes) == text


@pytest.mark.parametrize(("seconds", "text"), [(0.04, "0.0 s"), (12.4, "12 s"),
                                               (252, "4.2 min"), (4680, "78.0 min"),
                                               (9000, "2.5 h")])
def test_durations(seconds, text):
    assert duration(seconds) == text
